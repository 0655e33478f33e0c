"""Reader of the official GPAvatar dataset layout (SPEC pipeline.md 2.1-2.11); real or synthetic data.

``root/img_lmdb/`` (key ``img_<video>_<frame>`` -> PNG / JPEG bytes, or a ``torch.save``d
uint8 (3, H, W) tensor), ``root/dataset.pkl`` (``records`` + ``meta_info`` splits) and
``root/camera.json``.  :class:`OfficialDataset` reproduces the official sampling
(``core/data/MVLightningPoints.py``):

* ``stage="train"``: for target key k, ``n_sources`` sources drawn uniformly without replacement
  from the other frames of k's video in the same split (the official ``SAMPLE_NUMBER`` = 2);
* ``stage="val"`` / ``"test"``: deterministic sources of the target's video (1: first frame;
  2: first, last; 3: first, n//2, last; 4: 0, ⌊0.3n⌋, ⌊0.6n⌋, last; other counts: random), the
  target not excluded; ``test`` drops targets whose frame index is 0.

Every image: decode -> optional resize (``resize``; the official loader resizes the shorter side
to 512, a no-op for its 512 frames) -> divide by ``pixel_scale``.  **Default 256**, as the
official training loader (values in [0, 255/256]); 255 is what official inference uses for its
source images.  Sources are then perspective-warped with their own ``transform_matrix``
(:func:`perspective_warp`, SPEC 2.9; the model flips them vertically itself).  No augmentation.

Hostile and broken files fail cleanly: ``dataset.pkl`` is read with a restricted unpickler
(:mod:`gpavatar.data.safe_pickle`: data only, never code) and the LMDB is checked for truncation
before it is mapped (:mod:`gpavatar.data.lmdb_store`).

    >>> ds = OfficialDataset("data/synth", split="train", n_sources=2)  # doctest: +SKIP
    >>> sample = ds[0]; sample["f_images"].shape, sample["d_images"].shape  # doctest: +SKIP
    (torch.Size([2, 3, 256, 256]), torch.Size([3, 256, 256]))
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from gpavatar.data.lmdb_store import ImageLMDB, close_lmdb, decode_image, open_lmdb_checked  # noqa: F401
from gpavatar.data.safe_pickle import safe_load_path

__all__ = ["FIELD_SHAPES", "SPLITS", "DatasetReport", "ImageLMDB", "OfficialDataset", "check_dataset", "check_record",
           "close_lmdb", "decode_image", "flame_points", "load_camera", "load_dataset_pkl", "open_lmdb_checked",
           "parse_key", "perspective_warp", "source_positions"]

FIELD_SHAPES = {"bbox": (4,), "kps": (5, 2), "mica_shape": (100,), "emoca_expression": (50,), "emoca_pose": (6,),
                "transform_matrix": (3, 4)}
SPLITS = ("train", "val", "test")
CAMERA_KEYS = ("flame_scale", "focal_length", "principal_point")


def parse_key(key: str) -> tuple[str, int]:
    """``img_<video>_<frame>`` -> (video id = 2nd token, frame index = int of the last token)."""
    tokens = key.split("_") if isinstance(key, str) else []
    try:
        if len(tokens) < 3 or not tokens[1]:
            raise ValueError
        return tokens[1], int(tokens[-1])
    except ValueError:
        raise ValueError(f"frame key {key!r} is not of the form img_<video>_<frame>") from None


def load_camera(root: Union[str, os.PathLike]) -> dict:
    """``camera.json`` with ``flame_scale``, ``focal_length``, ``principal_point`` (ValueError naming a missing key)."""
    path = Path(root) / "camera.json"
    camera = json.loads(path.read_text())
    missing = [k for k in CAMERA_KEYS if k not in camera]
    if missing:
        raise ValueError(f"{path} is missing {missing}")
    return camera


def load_dataset_pkl(root: Union[str, os.PathLike]) -> tuple[dict, dict]:
    """``dataset.pkl`` -> (records, meta_info); ValueError when the top level is malformed.

    Read with :func:`gpavatar.data.safe_pickle.safe_load_path`: only dicts, lists, strings, numbers and
    numpy arrays; any other global (``os.system``, a class) raises ``pickle.UnpicklingError`` naming it
    before anything runs, as does a truncated or malformed file."""
    path = Path(root) / "dataset.pkl"
    data = safe_load_path(path)
    if not isinstance(data, dict) or not isinstance(data.get("records"), dict) \
            or not isinstance(data.get("meta_info"), dict):
        raise ValueError(f"{path} must hold a dict with a 'records' dict and a 'meta_info' dict")
    return data["records"], data["meta_info"]


def check_record(key: str, record) -> dict[str, np.ndarray]:
    """The record's fields of :data:`FIELD_SHAPES` as float32 arrays; KeyError / ValueError name key and field."""
    if not isinstance(record, dict):
        raise ValueError(f"record {key!r} must be a dict, got {type(record).__name__}")
    out = {}
    for field, shape in FIELD_SHAPES.items():
        if field not in record:
            raise KeyError(f"record {key!r} is missing field {field!r}")
        value = record[field]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if value.shape != shape or value.dtype.kind not in "fiu":
            raise ValueError(f"record {key!r} field {field!r} must be a numeric array of shape {shape}, "
                             f"got {value.dtype} {value.shape}")
        value = value.astype(np.float32)
        if not np.isfinite(value).all():
            raise ValueError(f"record {key!r} field {field!r} has non-finite values")
        out[field] = value
    return out


def source_positions(n: int, n_sources: int, rng=random) -> list[int]:
    """Validation / test source positions within a video of ``n`` sorted frames (SPEC 2.8)."""
    fixed = {1: [0], 2: [0, n - 1], 3: [0, n // 2, n - 1], 4: [0, int(0.3 * n), int(0.6 * n), n - 1]}
    if n_sources in fixed:
        return fixed[n_sources]
    return sorted(rng.sample(range(n), n_sources)) if n_sources <= n else [rng.randrange(n) for _ in range(n_sources)]


def _perspective_coeffs(start: list, end: list) -> list[float]:
    """torchvision's ``_get_perspective_coeffs``: 8 coefficients mapping output (end) to input (start) pixels."""
    a = torch.zeros(8, 8, dtype=torch.float64)
    for i, ((ex, ey), (sx, sy)) in enumerate(zip(end, start)):
        a[2 * i] = torch.tensor([ex, ey, 1, 0, 0, 0, -sx * ex, -sx * ey], dtype=torch.float64)
        a[2 * i + 1] = torch.tensor([0, 0, 0, ex, ey, 1, -sy * ex, -sy * ey], dtype=torch.float64)
    b = torch.tensor(start, dtype=torch.float64).view(8)
    return torch.linalg.lstsq(a, b, driver="gels").solution.to(torch.float32).tolist()


def perspective_warp(images: torch.Tensor, transform, focal: float = 12.0) -> torch.Tensor:
    """The official source warp (SPEC 2.9): the square [-1, 1]² on world z = 0 fills the image.

    The corners (-1, 1, 0), (1, 1, 0), (1, -1, 0), (-1, -1, 0) are projected with ``transform`` ([R|T],
    X_cam = X·R + T), ``focal`` and PyTorch3D's screen convention u = (S/2)(1 - x_ndc),
    v = (S/2)(1 - y_ndc), truncated to integers, and mapped to (0, 0), (S-1, 0), (S-1, S-1), (0, S-1)
    with torchvision's ``perspective`` (bilinear, fill 0: border pixels are scaled by the sampled
    in-image fraction as torchvision does).

    Args:
        images: (..., 3, S, S) float; transform: (3, 4)
    Returns:
        (..., 3, S, S) warped, same dtype
    """
    S = images.shape[-1]
    if images.dim() < 3 or images.shape[-2] != S:
        raise ValueError(f"images must have shape (..., C, S, S) (square), got {tuple(images.shape)}")
    transform = torch.as_tensor(transform, dtype=torch.float64)
    corners = torch.tensor([[-1.0, 1, 0], [1, 1, 0], [1, -1, 0], [-1, -1, 0]], dtype=torch.float64)
    cam = corners @ transform[:, :3] + transform[:, 3]
    if not bool((cam[:, 2] > 0).all()):
        raise ValueError("perspective_warp: the warp square is not in front of the camera")
    ndc = focal * cam[:, :2] / cam[:, 2:]
    start = torch.trunc(S / 2 * (1 - ndc)).tolist()
    end = [[0, 0], [S - 1, 0], [S - 1, S - 1], [0, S - 1]]
    c = _perspective_coeffs(start, end)
    # torchvision's _perspective_grid: output pixel centres (x + 0.5, y + 0.5) -> input, normalised
    base = torch.arange(S, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(base, base, indexing="ij")
    denominator = c[6] * x + c[7] * y + 1.0
    grid = torch.stack([(c[0] * x + c[1] * y + c[2]) / denominator / (0.5 * S) - 1.0,
                        (c[3] * x + c[4] * y + c[5]) / denominator / (0.5 * S) - 1.0], dim=-1)
    flat = images.reshape(-1, *images.shape[-3:]).float()
    flat = torch.cat([flat, torch.ones_like(flat[:, :1])], dim=1)
    out = F.grid_sample(flat, grid.expand(flat.shape[0], S, S, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    out = out[:, :-1] * out[:, -1:]  # fill 0 with torchvision's mask
    return out.reshape(images.shape).to(images.dtype)


class OfficialDataset(torch.utils.data.Dataset):
    """GPAvatar training / validation samples from the official layout (module docstring).

    Args:
        root: folder with ``img_lmdb/``, ``dataset.pkl``, ``camera.json``
        split: ``meta_info`` list to use ("train", "val", "test"); sources come from it too
        n_sources: V source images per sample (official training: 2)
        stage: sampling rules, "train" | "val" | "test"; default: "train" for the train split, else the split
        pixel_scale: images are divided by it: 256 (default, official training) or 255 (official inference)
        resize: side to resize every (square) image to, bilinear with antialias like the official
            ``norm_transform`` (which makes the shorter side 512); None keeps the stored size
        warp_sources: apply :func:`perspective_warp` to the sources (official: yes)
        flame: optional FLAME layer (scale 5, :class:`gpavatar.flame.FLAME`) -> ``d_points``
        seed: None: train sources from Python's ``random`` (DataLoader seeds it per worker, as the
            official loader); an int: from ``random.Random(f"{seed}/{epoch}/{index}")`` (:meth:`set_epoch`)

    Each item (``S`` = stored or resized side, V = ``n_sources``):
        ``f_images`` (V, 3, S, S) warped sources, ``of_images`` (V, 3, S, S) unwarped, ``f_keys`` V str,
        ``f_shape`` (100,) mean source ``mica_shape``, ``f_transforms`` (V, 3, 4),
        ``d_images`` (3, S, S) target, ``d_shape`` (100,), ``d_expressions`` (50,), ``d_poses`` (6,),
        ``d_transforms`` (3, 4), ``d_bbox`` (4,), ``d_kps`` (5, 2), ``d_points`` (5023, 3) with ``flame``,
        ``background`` 0.0, ``key`` str; floats are float32 tensors.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", n_sources: int = 2,
                 stage: Optional[str] = None, pixel_scale: float = 256.0, resize: Optional[int] = None,
                 warp_sources: bool = True, flame: Optional[torch.nn.Module] = None, seed: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        stage = stage if stage is not None else ("train" if split == "train" else split)
        if stage not in SPLITS:
            raise ValueError(f"stage must be one of {SPLITS}, got {stage!r}")
        if isinstance(n_sources, bool) or not isinstance(n_sources, int) or n_sources < 1:
            raise ValueError(f"n_sources must be an int >= 1, got {n_sources!r}")
        if not float(pixel_scale) > 0:
            raise ValueError(f"pixel_scale must be positive (256 or 255), got {pixel_scale!r}")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise ValueError(f"resize must be None or a positive int, got {resize!r}")
        self.root, self.split, self.stage, self.n_sources = Path(root), split, stage, n_sources
        self.pixel_scale, self.resize, self.warp_sources = float(pixel_scale), resize, warp_sources
        self.flame, self.seed, self.epoch = flame, seed, 0
        self.camera = load_camera(self.root)
        self.records, meta_info = load_dataset_pkl(self.root)
        if split not in meta_info:
            raise KeyError(f"{self.root / 'dataset.pkl'} meta_info has no split {split!r} (has {sorted(meta_info)})")
        keys = list(meta_info[split])
        for key in keys:
            if key not in self.records:
                raise KeyError(f"split {split!r} lists frame {key!r} that has no record in dataset.pkl")
        self.videos: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            self.videos[parse_key(key)[0]].append(key)
        for frames in self.videos.values():
            frames.sort(key=lambda k: parse_key(k)[1])
        if stage == "train":
            short = sorted((v, len(f)) for v, f in self.videos.items() if len(f) <= n_sources)
            if short:
                listed = ", ".join(f"{v!r} ({n} frames)" for v, n in short[:5])
                raise ValueError(f"stage 'train' draws {n_sources} sources besides the target, but split "
                                 f"{split!r} has {len(short)} videos with <= {n_sources} frames: {listed}")
        self.keys = [k for k in keys if not (stage == "test" and parse_key(k)[1] == 0)]
        self.lmdb = ImageLMDB(self.root / "img_lmdb")

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """With ``seed``: a different deterministic source draw per epoch."""
        self.epoch = int(epoch)

    def sources(self, index: int) -> list[str]:
        """Source keys of target ``index`` (the sampling rules in the module docstring)."""
        key = self.keys[index]
        frames = self.videos[parse_key(key)[0]]
        rng = random if self.seed is None else random.Random(f"{self.seed}/{self.epoch}/{index}")
        if self.stage == "train":
            return rng.sample([k for k in frames if k != key], self.n_sources)
        return [frames[i] for i in source_positions(len(frames), self.n_sources, rng)]

    def image(self, key: str) -> torch.Tensor:
        """(3, S, S) float32 in [0, 255 / pixel_scale]: decode, resize, normalise."""
        image = torch.from_numpy(self.lmdb.image(key)).float()
        if self.resize is not None and tuple(image.shape[1:]) != (self.resize, self.resize):
            image = F.interpolate(image[None], size=(self.resize, self.resize), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp(0, 255)
        return image / self.pixel_scale

    def record(self, key: str) -> dict[str, torch.Tensor]:
        """Checked record fields as float32 tensors (KeyError / ValueError naming key and field)."""
        if key not in self.records:
            raise KeyError(f"frame {key!r} has no record in dataset.pkl")
        return {k: torch.from_numpy(v) for k, v in check_record(key, self.records[key]).items()}

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        source_keys = self.sources(index)
        source_records = [self.record(k) for k in source_keys]
        target = self.record(key)
        of_images = torch.stack([self.image(k) for k in source_keys])
        f_transforms = torch.stack([r["transform_matrix"] for r in source_records])
        if self.warp_sources:
            focal = float(self.camera["focal_length"])
            f_images = torch.stack([perspective_warp(im, t, focal) for im, t in zip(of_images, f_transforms)])
        else:
            f_images = of_images.clone()
        sample = {
            "f_images": f_images, "of_images": of_images, "f_keys": source_keys, "f_transforms": f_transforms,
            "f_shape": torch.stack([r["mica_shape"] for r in source_records]).mean(0),
            "d_images": self.image(key), "d_shape": target["mica_shape"], "d_expressions": target["emoca_expression"],
            "d_poses": target["emoca_pose"], "d_transforms": target["transform_matrix"], "d_bbox": target["bbox"],
            "d_kps": target["kps"], "background": 0.0, "key": key,
        }
        if self.flame is not None:
            sample["d_points"] = flame_points(self.flame, target["mica_shape"], target["emoca_expression"],
                                              target["emoca_pose"])
        return sample


def _fit(vector: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad or truncate the last dimension to n (record sizes vs. a FLAME layer's columns)."""
    if vector.shape[-1] >= n:
        return vector[..., :n]
    return F.pad(vector, (0, n - vector.shape[-1]))


def dataset_flame(root: Union[str, os.PathLike], scale: float = 5.0) -> torch.nn.Module:
    """The FLAME layer (:class:`gpavatar.flame.FLAME`, at most 100 / 50 components) for a dataset's
    records: ``root/generic_model.pkl`` or ``root/flame.npz`` if present, else the procedural head
    (what ``gpavatar data synth`` renders)."""
    from gpavatar.flame import FLAME
    from gpavatar.flame.procedural import procedural_head_path

    candidates = [Path(root) / "generic_model.pkl", Path(root) / "flame.npz"]
    path = next((p for p in candidates if p.is_file()), None) or procedural_head_path()
    return FLAME.clamped(path, scale=scale)


def flame_points(flame: torch.nn.Module, shape: torch.Tensor, expression: torch.Tensor,
                 pose: torch.Tensor) -> torch.Tensor:
    """FLAME(shape, expression, pose) (the layer's scale, 5 for GPAvatar) for one frame -> (V, 3).

    Record vectors longer than the layer's ``n_shape`` / ``n_exp`` are truncated, shorter ones zero-padded."""
    dtype = flame.v_template.dtype
    with torch.no_grad():
        return flame(_fit(shape, flame.n_shape)[None].to(dtype), _fit(expression, flame.n_exp)[None].to(dtype),
                     pose[None].to(dtype))[0]


class DatasetReport(NamedTuple):
    """Result of :func:`check_dataset`: ``problems`` make it fail, ``warnings`` do not."""
    problems: list  # str messages
    warnings: list  # str messages
    splits: dict  # split -> {"frames", "videos", "min_frames", "max_frames"}
    stats: dict  # records, lmdb_entries, decoded, image_sizes {"HxW": n}, formats {name: n}, camera

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: Union[str, os.PathLike], n_sources: int = 2, limit: Optional[int] = None) -> DatasetReport:
    """Validate a dataset in the official layout without raising: every LMDB value decodes (the first
    ``limit`` keys in sorted order when given), records are complete (:data:`FIELD_SHAPES`), keys parse,
    splits only list recorded keys that are in the LMDB, and each train video has more than
    ``n_sources`` frames (needed by the train sampling).  Unlisted records and one image size per
    dataset are expected; deviations are warnings."""
    root = Path(root)
    problems, warnings = [], []
    stats = {"records": 0, "lmdb_entries": 0, "decoded": 0, "image_sizes": {}, "formats": {}, "camera": None}
    splits: dict = {}
    try:
        stats["camera"] = load_camera(root)
    except (OSError, ValueError) as error:
        problems.append(f"camera.json: {error}")
    try:
        records, meta_info = load_dataset_pkl(root)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:
        problems.append(f"dataset.pkl: {error}")
        records, meta_info = {}, None
    stats["records"] = len(records)
    for key, record in records.items():
        try:
            parse_key(key)
            check_record(key, record)
        except (KeyError, ValueError) as error:
            problems.append(str(error).strip('"'))
    lmdb_keys: set = set()
    try:
        db = ImageLMDB(root / "img_lmdb")
        lmdb_keys = set(db.keys())
        stats["lmdb_entries"] = len(lmdb_keys)
        for key in sorted(lmdb_keys)[:limit]:
            try:
                image, fmt = decode_image(key, db.get(key))
            except (KeyError, ValueError) as error:
                problems.append(str(error).strip('"'))
                continue
            size = f"{image.shape[1]}x{image.shape[2]}"
            stats["image_sizes"][size] = stats["image_sizes"].get(size, 0) + 1
            stats["formats"][fmt] = stats["formats"].get(fmt, 0) + 1
            stats["decoded"] += 1
    except Exception as error:  # noqa: BLE001 - report, never raise
        problems.append(f"img_lmdb: {error}")
    if len(stats["image_sizes"]) > 1:
        warnings.append(f"images have several sizes: {stats['image_sizes']}")
    missing_images = sorted(set(records) - lmdb_keys) if lmdb_keys else []
    if missing_images:
        problems.append(f"{len(missing_images)} records have no LMDB image, e.g. {missing_images[:3]}")
    if set(lmdb_keys) - set(records):
        warnings.append(f"{len(set(lmdb_keys) - set(records))} LMDB keys have no record")
    video_split: dict = defaultdict(set)
    for split in SPLITS if meta_info is not None else ():
        keys = meta_info.get(split)
        if not isinstance(keys, (list, tuple)):
            problems.append(f"meta_info has no {split!r} list")
            continue
        if len(set(keys)) != len(keys):
            problems.append(f"split {split!r} lists {len(keys) - len(set(keys))} keys twice")
        absent = [k for k in keys if k not in records]
        if absent:
            problems.append(f"split {split!r}: {len(absent)} keys have no record, e.g. {absent[:3]}")
        videos: dict = defaultdict(int)
        for key in keys:
            try:
                videos[parse_key(key)[0]] += 1
            except ValueError as error:
                problems.append(f"split {split!r}: {error}")
        for video in videos:
            video_split[video].add(split)
        counts = list(videos.values())
        splits[split] = {"frames": len(keys), "videos": len(videos), "min_frames": min(counts, default=0),
                         "max_frames": max(counts, default=0)}
        short = sorted(v for v, n in videos.items() if n <= n_sources)
        if short and split == "train":
            problems.append(f"split 'train': videos {short[:5]} have <= {n_sources} frames (train draws "
                            f"{n_sources} sources besides the target)")
        elif not keys:
            warnings.append(f"split {split!r} is empty")
    shared = sorted(v for v, s in video_split.items() if "train" in s and len(s) > 1)
    if shared:
        warnings.append(f"{len(shared)} videos appear in train and in val/test, e.g. {shared[:3]}")
    return DatasetReport(problems, warnings, splits, stats)
