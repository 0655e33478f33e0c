"""Checkpoint I/O of :class:`gpavatar.model.GPAvatar`.

* ``GPAvatar.from_official_checkpoint(path)`` reads the official Lightning-style
  ``one_model.ckpt`` (a plain ``torch.save`` dict: ``state_dict``, ``config_dict``,
  ``data_meta_info``, ``step``, ``metric``) with ``torch.load(weights_only=True)``: no code
  from the file runs.  Config objects of foreign classes (e.g. an ``EasyDict``) are read as
  inert dicts.  ``percep_loss.*`` (the frozen AlexNet of the training loss) is dropped; every
  other key must match the paper model key for key and shape for shape, else a
  :class:`CheckpointError` lists what is missing, unexpected or mis-shaped.  The model gets the
  official PEF normalization (``"queries"``) and the focal length of ``data_meta_info``.
* ``save_pretrained(dir)`` / ``from_pretrained(dir)``: ``model.safetensors`` + ``config.json``,
  each written to a temporary file and renamed into place (a crash never leaves a torn file).
* Every load (official, pretrained, :meth:`CheckpointMixin.load_checked_state_dict`) warns with a
  :class:`NonFiniteWeightsWarning` naming the tensors that hold NaN or inf.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from gpavatar.model.config import GPAvatarConfig
from gpavatar.ops.knn_blend import OFFICIAL_EPS

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
OFFICIAL_PREFIXES = ("style_tplane.", "nerf_mlp.", "up_renderer.", "query_style_tplane", "attn_module.")
DROPPED_SUBSTRINGS = ("percep_loss",)
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not match the model (or that cannot be read)."""


class NonFiniteWeightsWarning(UserWarning):
    """Loaded weights hold NaN or inf values (a diverged training run, a corrupt file)."""


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())  # NaN propagates; no tensor-sized temporary (10x isfinite)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf."""
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not _finite(v)]


def compare_state_dict(expected: Mapping[str, torch.Size], given: Mapping[str, Any]):
    """(missing, unexpected, mismatched) between expected shapes and a state dict.

    ``mismatched`` holds (key, expected shape, given shape)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [(k, tuple(expected[k]), tuple(given[k].shape)) for k in expected
                  if k in given and tuple(given[k].shape) != tuple(expected[k])]
    return missing, unexpected, mismatched


def describe_mismatch(missing, unexpected, mismatched, source: str) -> str:
    def listed(items, fmt):
        shown = [fmt(i) for i in items[:_MAX_LISTED]]
        more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        return ", ".join(shown) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listed(missing, str)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected, str)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): "
                     + listed(mismatched, lambda m: f"{m[0]} expected {list(m[1])}, got {list(m[2])}"))
    return f"{source} does not match the model: " + "; ".join(parts)


class _InertObject(dict):
    """Stands in for any foreign config class found in a checkpoint (an ``EasyDict``, ...):
    it accepts any constructor arguments and keeps pickled state as plain dict data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        if len(args) == 1 and isinstance(args[0], Mapping):
            self.update(args[0])
        self.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.update(state)
        else:
            self["__state__"] = state


_NEVER_STUBBED = {"torch", "numpy", "builtins", "collections", "os", "posix", "nt", "sys", "subprocess", "shutil",
                  "importlib", "pickle", "runpy", "code", "functools", "operator", "types", "io"}
# What a torch.save of tensors, containers and numpy scalars needs: nothing that can run code.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


def _stubbable(module: str, name: str) -> bool:
    """A foreign *class* (CamelCase, outside the standard library's dangerous corners) may be
    read as an inert dict; functions (os.system, eval, ...) are refused."""
    return bool(module) and name[:1].isupper() and module.split(".")[0] not in _NEVER_STUBBED


class _RestrictedUnpickler(pickle.Unpickler):
    """Tensors, containers and numpy scalars; foreign classes become inert dicts; anything
    else is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        if _stubbable(module, name):
            return type(name, (_InertObject,), {"__module__": "gpavatar.model.checkpoint.stub"})
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a checkpoint")


_restricted_pickle = types.ModuleType("gpavatar_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.Pickler = pickle.Pickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = "gpavatar_restricted_pickle"


def read_official_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict[str, Any]:
    """Load an official checkpoint without running code from it.

    ``torch.load(weights_only=True)`` first; if the file holds config objects of foreign
    classes (which that loader refuses), a restricted unpickler reads them as inert dicts and
    refuses every function or class outside a short allow-list of tensor-rebuilding helpers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first:  # pickle.UnpicklingError in recent torch, RuntimeError in older
        try:
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=_restricted_pickle)
        except Exception as err:
            raise CheckpointError(f"cannot read {path} safely (weights-only load: {first}; restricted load: "
                                  f"{err})") from err


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``
    (readers never see a torn file; on error nothing is left behind). Mode 0o666 & ~umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CheckpointMixin:
    """Loading and saving for GPAvatar (mixed into the nn.Module)."""

    def load_checked_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Strict load with a readable error: every key present, none extra, every shape equal.
        Tensors holding NaN / inf are loaded but named in a :class:`NonFiniteWeightsWarning`."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing, unexpected, mismatched = compare_state_dict(expected, state_dict)
        if missing or unexpected or mismatched:
            raise CheckpointError(describe_mismatch(missing, unexpected, mismatched, source))
        self.load_state_dict(state_dict, strict=True)
        bad = non_finite_tensors(state_dict)
        if bad:
            shown = ", ".join(bad[:_MAX_LISTED]) + (f" ... and {len(bad) - _MAX_LISTED} more"
                                                     if len(bad) > _MAX_LISTED else "")
            warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or inf values, the model will render "
                          f"garbage: {shown}", NonFiniteWeightsWarning, stacklevel=2)

    @classmethod
    def from_official_checkpoint(cls, path: Union[str, os.PathLike], *, map_location: Any = "cpu",
                                 **overrides: Any):
        """Build the paper model and load the official ``one_model.ckpt`` strictly.

        ``overrides`` change run-time fields of the config (backend, noise, query_chunk);
        the PEF is the official one (``"queries"`` normalization, ``pef_eps`` = 1e-30, i.e.
        the official 1 / d²) unless overridden."""
        ckpt = read_official_checkpoint(path, map_location)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors (the official format)")
        state = {k: v for k, v in state.items() if not any(s in k for s in DROPPED_SUBSTRINGS)}
        for wrapper in ("module.", "model."):  # saved from a DDP / Lightning wrapper
            if state and all(k.startswith(wrapper) for k in state):
                state = {k[len(wrapper):]: v for k, v in state.items()}
        # The official PEF: "queries" normalization and 1 / d² (the smallest epsilon, which
        # changes no float32 weight of any d² >= 3e-23; see OFFICIAL_EPS).
        settings: dict[str, Any] = {"pef_normalize": "queries", "pef_eps": OFFICIAL_EPS}
        meta = ckpt.get("data_meta_info") if isinstance(ckpt, Mapping) else None
        if isinstance(meta, Mapping) and isinstance(meta.get("focal_length"), (int, float)):
            settings["focal"] = float(meta["focal_length"])
        model = cls(GPAvatarConfig.preset("paper", **{**settings, **overrides}))
        model.load_checked_state_dict(state, source=f"official checkpoint {path}")
        return model

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        import gpavatar

        atomic_write(directory / WEIGHTS_NAME,
                      lambda tmp: save_file(state, tmp, metadata={"format": "pt", "gpavatar": gpavatar.__version__}))
        text = json.dumps({"gpavatar_version": gpavatar.__version__, **self.config.to_dict()}, indent=1) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, map_location: Optional[str] = "cpu",
                        **overrides: Any):
        """Load what :meth:`save_pretrained` wrote; ``overrides`` replace config fields."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (save_pretrained writes {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME})")
        data = json.loads((directory / CONFIG_NAME).read_text())
        data.pop("gpavatar_version", None)
        model = cls(GPAvatarConfig.from_dict({**data, **overrides}))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location or "cpu"))
        model.load_checked_state_dict(state, source=str(directory / WEIGHTS_NAME))
        return model
