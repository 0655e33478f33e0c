"""Every size of the GPAvatar model in one dataclass, with two presets.

``paper``: the official sizes (SPEC section 2, stylegan.md section 1); a model built from it
loads the official ``one_model.ckpt`` strictly.  ``tiny``: every size small enough that a full
forward + backward runs on two CPU cores in a few seconds (tests, CI, the CPU benchmark).

    >>> from gpavatar.model.config import GPAvatarConfig
    >>> cfg = GPAvatarConfig.preset("tiny", render_size=12)
    >>> cfg.render_size, cfg.plane_channels
    (12, 8)
    >>> GPAvatarConfig.from_dict(cfg.to_dict()) == cfg
    True

A YAML (or JSON) file holds a mapping of fields, optionally with ``preset: tiny`` as the base;
unknown fields are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

NORMALIZATIONS = ("neighbors", "queries")
NOISE_SETTINGS = ("auto", "fresh", "stored", "off")
BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "torch")


@dataclass(frozen=True)
class GPAvatarConfig:
    """Sizes and switches of :class:`gpavatar.model.GPAvatar` (defaults = ``paper``).

    Encoder (``style_tplane``, a StyleUNet):
        image_size: source image side (512); plane_size: tri-plane side (256, the encoder's
        output size); plane_channels: C per plane (32; the encoder emits 3C channels);
        encoder_narrow: channel-table multiplier of the encoder (1.0 = official tables).
    Point expression field and decoder (``nerf_mlp``):
        num_points: FLAME vertices (5023); point_feature_dim: learned feature per point (32);
        pef_dim: PEF output (32, hidden 2·pef_dim); K: neighbours (8); pef_normalize:
        "queries" (the official code, needed for its checkpoint) or "neighbors" (the paper's
        formula); pef_eps: added to squared distances before inverting (1e-30: the official
        code has none; this one changes no float32 weight of d² >= 3e-23 and keeps a query on
        a point finite; see ``gpavatar.ops.knn_blend.OFFICIAL_EPS``); decoder_hidden: width of
        ``feature_layers`` (128); value_hidden: hidden width of ``rgb_layers`` (64);
        render_channels: value channels rendered (32: RGB + 29 features).
    Renderer: render_size (128 rays per side), focal (12.0), n_coarse / n_fine (32 + 32).
    Super-resolution (``up_renderer``): output_size (512), sr_narrow (channel multiplier).
    Both StyleUNets: num_style_feat (512), num_mlp (8).
    Run-time switches (not architecture; may change after loading weights):
        noise: "auto" (fresh StyleGAN noise in training, the stored buffers in eval: eval is
        deterministic), "fresh" (the official behaviour, training and inference), "stored",
        "off"; query_chunk: field queries per chunk (0 = one pass; results are identical
        either way, the PEF "queries" sums run over the whole pass); backend: kernel backend
        of every op (None = ``$GPAVATAR_BACKEND`` or auto); single_source_prob: probability
        that a training step keeps only the first source and skips MTA (0.3).
    """

    image_size: int = 512
    plane_size: int = 256
    plane_channels: int = 32
    encoder_narrow: float = 1.0
    num_points: int = 5023
    point_feature_dim: int = 32
    pef_dim: int = 32
    K: int = 8
    pef_normalize: str = "queries"
    pef_eps: float = 1e-30
    decoder_hidden: int = 128
    value_hidden: int = 64
    render_channels: int = 32
    render_size: int = 128
    focal: float = 12.0
    n_coarse: int = 32
    n_fine: int = 32
    output_size: int = 512
    sr_narrow: float = 1.0
    num_style_feat: int = 512
    num_mlp: int = 8
    noise: str = "auto"
    query_chunk: int = 0
    backend: Optional[str] = None
    single_source_prob: float = 0.3

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy / other integral and real numbers become plain int / float
            value = getattr(self, f.name)
            if f.type == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, f.name, int(value))
            elif f.type == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        for name in ("image_size", "plane_size", "output_size"):
            size = getattr(self, name)
            _check_int(size, name, 4)
            if size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 4 (a StyleUNet size), got {size}")
        if self.image_size > 2 * self.plane_size:
            raise ValueError(f"image_size must be <= 2 * plane_size (StyleUNet in_size <= 2 * out_size), "
                             f"got image_size={self.image_size}, plane_size={self.plane_size}")
        for name in ("plane_channels", "num_points", "point_feature_dim", "pef_dim", "decoder_hidden",
                     "value_hidden", "render_size", "num_style_feat", "num_mlp"):
            _check_int(getattr(self, name), name, 1)
        _check_int(self.render_channels, "render_channels", 3)
        _check_int(self.n_coarse, "n_coarse", 2)
        _check_int(self.n_fine, "n_fine", 2)
        _check_int(self.K, "K", 1)
        _check_int(self.query_chunk, "query_chunk", 0)
        if self.K > self.num_points:
            raise ValueError(f"K must be <= num_points ({self.num_points}), got {self.K}")
        if self.render_size > self.output_size:
            raise ValueError(f"render_size must be <= output_size (the super-resolution input is resized "
                             f"up to output_size), got {self.render_size} > {self.output_size}")
        for name in ("encoder_narrow", "sr_narrow", "focal"):
            _check_positive(getattr(self, name), name)
        _check_positive(self.pef_eps, "pef_eps")
        if not 1e-30 <= self.pef_eps <= 1e30:
            raise ValueError(f"pef_eps must be in [1e-30, 1e30] (the knn_blend op's range), got {self.pef_eps!r}")
        if self.pef_normalize not in NORMALIZATIONS:
            raise ValueError(f"pef_normalize must be one of {NORMALIZATIONS}, got {self.pef_normalize!r}")
        if self.noise not in NOISE_SETTINGS:
            raise ValueError(f"noise must be one of {NOISE_SETTINGS}, got {self.noise!r}")
        if self.backend is not None and self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got {self.backend!r}")
        p = self.single_source_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"single_source_prob must be a float in [0, 1], got {p!r}")

    # -- presets and (de)serialization ---------------------------------------------------
    @classmethod
    def preset(cls, name: str = "paper", **overrides: Any) -> "GPAvatarConfig":
        """``"paper"`` or ``"tiny"``, with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPAvatarConfig":
        """Fields from a mapping; an optional ``"preset"`` entry names the base preset."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a mapping of field names, got {type(data).__name__}")
        data = dict(data)
        base = data.pop("preset", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        if base is not None:
            return cls.preset(base, **data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "GPAvatarConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | Path) -> "GPAvatarConfig":
        """Read a ``.yaml`` / ``.yml`` (needs PyYAML) or ``.json`` file; ValueError naming the file when it
        does not parse or holds no valid config."""
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}); YAML files must end in .yaml or .yml") \
                    from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of config fields (e.g. 'preset: tiny'), got "
                             f"{type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def preset_name(self) -> Optional[str]:
        """The preset whose architecture this config has ("paper", "tiny"), or None (custom sizes).
        Run-time switches and the PEF / camera constants are not compared."""
        ignored = {"noise", "query_chunk", "backend", "single_source_prob", "pef_normalize", "pef_eps", "focal"}
        mine = {k: v for k, v in self.to_dict().items() if k not in ignored}
        for name in PRESETS:
            base = {k: v for k, v in GPAvatarConfig.preset(name).to_dict().items() if k not in ignored}
            if base == mine:
                return name
        return None

    def dump(self, path: str | Path) -> None:
        """Write JSON (``.json``) or YAML (``.yaml`` / ``.yml``)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    # -- derived sizes -----------------------------------------------------------------
    @property
    def queries_per_frame(self) -> int:
        return self.render_size**2 * (self.n_coarse + self.n_fine)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": dict(image_size=64, plane_size=32, plane_channels=8, encoder_narrow=1 / 16, point_feature_dim=8,
                 pef_dim=8, decoder_hidden=32, value_hidden=16, render_channels=8, render_size=16, n_coarse=8,
                 n_fine=8, output_size=64, sr_narrow=1 / 16, num_style_feat=32, num_mlp=2),
}


def _check_int(value: Any, name: str, low: int) -> None:
    """An integral number (int, numpy integer; never a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
