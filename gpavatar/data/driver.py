"""Driving sequences: per-frame FLAME parameters and cameras that reenact an avatar (pipeline.md 4.3-4.4).

A :class:`Driver` holds N frames of FLAME expression, FLAME pose and camera. It comes from

* a **driver file** (``.npz`` or ``.json``, the schema below; :func:`save_driver` writes one and
  ``gpavatar data synth`` writes ``OUT/driver.json`` as an example),
* an **official-layout dataset** (``img_lmdb/`` + ``dataset.pkl``): the frames of one video, or a
  key range, in frame order (:func:`dataset_driver`),
* a **tracker output** as the official inference reads it: a folder holding ``smoothed.pkl``
  (preferred) or ``lightning.pkl``, or such a ``.pkl`` file: a dict frame key -> record with the
  ``dataset.pkl`` record fields, frames ordered by the integer after the last underscore.

Pickles are read with :mod:`gpavatar.data.safe_pickle` (data only, never code).

Driver file schema (version 1; the same keys in ``.npz`` arrays and in a ``.json`` object of nested
lists; N frames; float arrays are read as float32):

=====================  =================  =================================================================
key                    shape              meaning
=====================  =================  =================================================================
``emoca_expression``   (N, E), E <= 100   FLAME expression coefficients (GPAvatar uses the first 50;
                                          fewer are zero-padded)
``emoca_pose``         (N, 6)             [global rotation (3), jaw (3)] axis-angle; the global part should
                                          be 0, the head rotation lives in the camera (pipeline.md 1.3)
``transform_matrix``   (N, 3, 4)          world-to-camera [R | T], PyTorch3D row form X_cam = X R + T
                                          (R a rotation), f = 12, FLAME vertices x 5 in world units
``mica_shape``         (N, 100) or (100,) optional FLAME identity; used only when the sources carry none
                                          (image files)
``keys``               (N,) str           optional frame names (e.g. ``img_000007_3``)
``fps``                ()                 optional frame rate of the sequence (default 25)
``focal_length``       ()                 optional; must equal the model's focal (12) when given
``format``             () str             optional, ``"gpavatar-driver"``; ``version`` () int optional, 1
=====================  =================  =================================================================

    >>> import numpy as np
    >>> d = Driver(np.zeros((2, 50), np.float32), np.zeros((2, 6), np.float32),
    ...            np.tile(np.array([[-1., 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 9]], np.float32), (2, 1, 1)))
    >>> save_driver("/tmp/driver.json", d); load_driver("/tmp/driver.json").num_frames  # doctest: +SKIP
    2
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["DRIVER_FORMAT", "DRIVER_SUFFIXES", "Driver", "dataset_driver", "driver_from_records", "load_driver",
           "load_driver_file", "save_driver", "tracker_driver"]

DRIVER_FORMAT, DRIVER_VERSION = "gpavatar-driver", 1
DRIVER_SUFFIXES = (".npz", ".json")
TRACKER_FILES = ("smoothed.pkl", "lightning.pkl")  # what the official inference looks for, in this order
MAX_EXPRESSION = 100  # expression columns of the FLAME release
ROTATION_TOLERANCE = 1e-3  # max |R Rᵀ - I| of a driver camera
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Driver:
    """N driving frames (float32 numpy arrays).

    expression: (N, E); pose: (N, 6) [global, jaw]; transform: (N, 3, 4) world-to-camera [R|T];
    shape: (N, 100) identity or None; keys: N frame names or None; fps: frames per second;
    root: dataset folder whose ``img_lmdb`` holds the frames named by ``keys`` (None: no images);
    source: a short description for reports.
    """

    expression: np.ndarray
    pose: np.ndarray
    transform: np.ndarray
    shape: Optional[np.ndarray] = None
    keys: Optional[list] = None
    fps: float = 25.0
    root: Optional[Path] = None
    source: str = "driver"
    focal: Optional[float] = field(default=None)

    def __post_init__(self) -> None:
        self.expression, self.pose, self.transform, self.shape = _checked_arrays(
            self.expression, self.pose, self.transform, self.shape, self.source)
        n = self.num_frames
        if self.keys is not None:
            self.keys = [str(k) for k in self.keys]
            if len(self.keys) != n:
                raise ValueError(f"{self.source}: keys has {len(self.keys)} entries for {n} frames")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float, np.number)) \
                or not math.isfinite(float(self.fps)) or float(self.fps) <= 0:
            raise ValueError(f"{self.source}: fps must be a positive number, got {self.fps!r}")
        self.fps = float(self.fps)

    @property
    def num_frames(self) -> int:
        return int(self.expression.shape[0])

    def select(self, frames: slice) -> "Driver":
        """The frames ``frames`` (a slice over positions) of this driver; ValueError when none remain."""
        if not isinstance(frames, slice):
            raise TypeError(f"frames must be a slice, got {type(frames).__name__}")
        picked = range(self.num_frames)[frames]
        if len(picked) == 0:
            raise ValueError(f"frames {_slice_text(frames)} selects no frame of {self.source} "
                             f"({self.num_frames} frames)")
        index = list(picked)
        return replace(self, expression=self.expression[index], pose=self.pose[index],
                       transform=self.transform[index], shape=None if self.shape is None else self.shape[index],
                       keys=None if self.keys is None else [self.keys[i] for i in index])

    def mean_shape(self) -> Optional[np.ndarray]:
        """(100,) mean identity over the frames, or None."""
        return None if self.shape is None else self.shape.mean(0).astype(np.float32)


def _slice_text(s: slice) -> str:
    return ":".join("" if v is None else str(v) for v in (s.start, s.stop)) + (f":{s.step}" if s.step else "")


def _array(value, name: str, source: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {name} must be numeric ({error})") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: {name} holds NaN or inf values")
    return array


def _checked_arrays(expression, pose, transform, shape, source):
    expression, pose = _array(expression, "emoca_expression", source), _array(pose, "emoca_pose", source)
    transform = _array(transform, "transform_matrix", source)
    if expression.ndim != 2 or not 1 <= expression.shape[1] <= MAX_EXPRESSION:
        raise ValueError(f"{source}: emoca_expression must have shape (N, E) with 1 <= E <= {MAX_EXPRESSION}, "
                         f"got {expression.shape}")
    n = expression.shape[0]
    if n == 0:
        raise ValueError(f"{source}: the driver has no frames (emoca_expression is empty)")
    if pose.shape != (n, 6):
        raise ValueError(f"{source}: emoca_pose must have shape ({n}, 6) ([global, jaw] axis-angle per frame), "
                         f"got {pose.shape}")
    if transform.shape != (n, 3, 4):
        raise ValueError(f"{source}: transform_matrix must have shape ({n}, 3, 4) (world-to-camera [R|T] per "
                         f"frame), got {transform.shape}")
    R = transform[:, :, :3].astype(np.float64)
    deviation = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    if (deviation > ROTATION_TOLERANCE).any():
        bad = int(np.argmax(deviation > ROTATION_TOLERANCE))
        raise ValueError(f"{source}: transform_matrix[{bad}] is not [R|T] with R a rotation "
                         f"(max |R Rᵀ - I| = {deviation[bad]:.3g})")
    if shape is not None:
        shape = _array(shape, "mica_shape", source)
        if shape.ndim == 1:
            shape = np.tile(shape, (n, 1))
        if shape.ndim != 2 or shape.shape[0] != n or not 1 <= shape.shape[1] <= 300:
            raise ValueError(f"{source}: mica_shape must have shape ({n}, S) or (S,) with S <= 300, got {shape.shape}")
    return expression, pose, transform, shape


# --- driver files --------------------------------------------------------------------------------------------


def _file_fields(driver: Driver) -> dict:
    fields = {"format": DRIVER_FORMAT, "version": DRIVER_VERSION, "fps": driver.fps,
              "emoca_expression": driver.expression, "emoca_pose": driver.pose,
              "transform_matrix": driver.transform}
    if driver.shape is not None:
        fields["mica_shape"] = driver.shape
    if driver.keys is not None:
        fields["keys"] = list(driver.keys)
    if driver.focal is not None:
        fields["focal_length"] = float(driver.focal)
    return fields


def save_driver(path: PathLike, driver: Driver) -> Path:
    """Write ``driver`` as a driver file (``.npz`` or ``.json`` by the suffix; module docstring), atomically.

    JSON numbers are the float32 values written as float64, so a round trip is exact."""
    from gpavatar.model.checkpoint import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DRIVER_SUFFIXES:
        raise ValueError(f"driver file {path} must end in {' or '.join(DRIVER_SUFFIXES)}")
    fields = _file_fields(driver)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        text = _json_text(fields)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    else:
        arrays = {k: np.asarray(v) for k, v in fields.items()}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(path, write)
    return path


def _json_text(fields: dict) -> str:
    """One key per line, one frame per line (readable, diffable); float32 values as float64 numbers."""
    lines = []
    for key, value in fields.items():
        if isinstance(value, np.ndarray):
            rows = [json.dumps(row, separators=(", ", ": ")) for row in value.astype(np.float64).tolist()]
            lines.append(f' "{key}": [\n  ' + ",\n  ".join(rows) + "\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_driver_file(path: PathLike) -> Driver:
    """Read a driver file (``.npz`` / ``.json``); ValueError naming the file and the field on any problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DRIVER_SUFFIXES:
        raise ValueError(f"driver file {path} must end in {' or '.join(DRIVER_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"driver file {path} not found")
    try:
        if suffix == ".json":
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict):
                raise ValueError("the top level must be an object with emoca_expression, emoca_pose, transform_matrix")
        else:
            with np.load(path, allow_pickle=False) as archive:
                fields = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"driver file {path} is not readable: {error}") from None
    return _driver_from_fields(fields, str(path))


def _scalar(fields: dict, key: str, source: str, kind=float):
    value = np.asarray(fields[key])
    if value.ndim != 0:
        raise ValueError(f"{source}: {key} must be a single value, got shape {value.shape}")
    try:
        return kind(value.item())
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} must be a {kind.__name__}, got {value.item()!r}") from None


def _driver_from_fields(fields: dict, source: str) -> Driver:
    if "format" in fields and _scalar(fields, "format", source, str) != DRIVER_FORMAT:
        raise ValueError(f"{source}: format must be {DRIVER_FORMAT!r}, got {_scalar(fields, 'format', source, str)!r}")
    if "version" in fields and _scalar(fields, "version", source, int) != DRIVER_VERSION:
        raise ValueError(f"{source}: version {_scalar(fields, 'version', source, int)} is not supported "
                         f"(this gpavatar reads version {DRIVER_VERSION})")
    missing = [k for k in ("emoca_expression", "emoca_pose", "transform_matrix") if k not in fields]
    if missing:
        raise ValueError(f"{source}: driver is missing {missing} (has {sorted(fields)})")
    keys = fields.get("keys")
    if keys is not None:
        keys = np.asarray(keys)
        if keys.ndim != 1 or keys.dtype.kind not in "UO":
            raise ValueError(f"{source}: keys must be a list of N strings, got {keys.dtype} {keys.shape}")
        keys = [str(k) for k in keys.tolist()]
    return Driver(fields["emoca_expression"], fields["emoca_pose"], fields["transform_matrix"],
                  fields.get("mica_shape"), keys, _scalar(fields, "fps", source) if "fps" in fields else 25.0,
                  source=source, focal=_scalar(fields, "focal_length", source) if "focal_length" in fields else None)


# --- records: datasets and tracker outputs ----------------------------------------------------------------------


def driver_from_records(records: dict, keys: Sequence[str], root: Optional[PathLike] = None,
                        source: str = "records", fps: float = 25.0) -> Driver:
    """A driver of the records ``keys`` (in that order): ``emoca_expression``, ``emoca_pose``,
    ``transform_matrix`` and ``mica_shape`` of each (:func:`gpavatar.data.official.check_record`)."""
    from gpavatar.data.official import check_record

    if not keys:
        raise ValueError(f"{source}: no frames to drive with")
    checked = []
    for key in keys:
        if key not in records:
            raise KeyError(f"{source}: frame {key!r} has no record")
        checked.append(check_record(key, records[key]))
    stack = lambda name: np.stack([r[name] for r in checked])  # noqa: E731
    return Driver(stack("emoca_expression"), stack("emoca_pose"), stack("transform_matrix"), stack("mica_shape"),
                  list(keys), fps, Path(root) if root is not None else None, source)


def _video_frames(records: dict, source: str) -> dict[str, list[str]]:
    from gpavatar.data.official import parse_key

    videos: dict[str, list[str]] = {}
    for key in records:
        videos.setdefault(parse_key(key)[0], []).append(key)
    for frames in videos.values():
        frames.sort(key=lambda k: parse_key(k)[1])
    if not videos:
        raise ValueError(f"{source} holds no frames")
    return videos


def _pick_frames(videos: dict[str, list[str]], video: Optional[str], key_range: Optional[tuple],
                 source: str) -> list[str]:
    from gpavatar.data.official import parse_key

    if key_range is not None:
        first, last = key_range
        v_first, v_last = parse_key(first)[0], parse_key(last)[0]
        if v_first != v_last:
            raise ValueError(f"driver keys {first}:{last} span two videos ({v_first}, {v_last})")
        if video is not None and video != v_first:
            raise ValueError(f"driver keys {first}:{last} are not in driver video {video!r}")
        video = v_first
    if video is None:
        video = sorted(videos)[0]
    if video not in videos:
        shown = ", ".join(sorted(videos)[:8]) + (" ..." if len(videos) > 8 else "")
        raise KeyError(f"{source} has no video {video!r} (videos: {shown})")
    frames = videos[video]
    return frames if key_range is None else _key_span(frames, key_range, source)


def _key_span(keys: list, key_range, where) -> list:
    """keys[first:last] inclusive for key_range = (first, last), both in ``keys`` (in order)."""
    for key in key_range:
        if key not in keys:
            raise KeyError(f"{where} has no frame {key!r}")
    i, j = keys.index(key_range[0]), keys.index(key_range[1])
    if j < i:
        raise ValueError(f"driver keys {key_range[0]}:{key_range[1]}: the last key comes before the first")
    return keys[i:j + 1]


def dataset_driver(root: PathLike, video: Optional[str] = None, key_range: Optional[tuple] = None) -> Driver:
    """The frames of ``video`` (default: the first video id in sorted order) of an official-layout dataset,
    in frame order, or the inclusive key range ``(first, last)`` of one video; every record in
    ``dataset.pkl`` counts, whatever its split. The dataset's frames show in the driver panel."""
    from gpavatar.data.official import load_dataset_pkl

    root = Path(root)
    records, _ = load_dataset_pkl(root)
    frames = _pick_frames(_video_frames(records, str(root / "dataset.pkl")), video, key_range,
                          str(root / "dataset.pkl"))
    driver = driver_from_records(records, frames, root if (root / "img_lmdb").is_dir() else None, str(root))
    return replace(driver, source=f"{root} video {_video_of(frames[0])}")


def _video_of(key: str) -> str:
    from gpavatar.data.official import parse_key

    return parse_key(key)[0]


def tracker_driver(path: PathLike, key_range: Optional[tuple] = None) -> Driver:
    """A tracker output: a ``.pkl`` (dict key -> record) or a folder with ``smoothed.pkl`` / ``lightning.pkl``
    (and optionally ``img_lmdb/``), frames ordered by the integer after the last underscore."""
    from gpavatar.data.safe_pickle import safe_load_path

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [path / name for name in TRACKER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"driver folder {path} holds neither dataset.pkl nor {' / '.join(TRACKER_FILES)}")
        path = found[0]
    records = safe_load_path(path)
    if not isinstance(records, dict) or not records or not all(isinstance(k, str) for k in records):
        raise ValueError(f"{path} must hold a dict of frame key -> record")

    def order(key: str):
        try:
            return int(key.rsplit("_", 1)[-1])
        except ValueError:
            raise ValueError(f"{path}: frame key {key!r} does not end in _<frame number>") from None

    keys = sorted(records, key=order)
    if key_range is not None:
        keys = _key_span(keys, key_range, path)
    root = folder if (folder / "img_lmdb").is_dir() else None
    return driver_from_records(records, keys, root, str(path))


def load_driver(path: PathLike, video: Optional[str] = None, key_range: Optional[tuple] = None) -> Driver:
    """A driver from ``path``: a driver file (``.npz`` / ``.json``), an official-layout dataset folder
    (``video`` / ``key_range`` pick the frames), a tracker folder or ``.pkl`` (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"driver {path} not found (a .npz / .json driver file, a dataset folder or a "
                                f"tracker folder with {' / '.join(TRACKER_FILES)})")
    if path.is_dir() and (path / "dataset.pkl").is_file():
        return dataset_driver(path, video, key_range)
    if video is not None:
        raise ValueError(f"a driver video id ({video!r}) needs a dataset folder as the driver, got {path}")
    if path.is_dir() or path.suffix.lower() == ".pkl":
        return tracker_driver(path, key_range)
    if key_range is not None:
        raise ValueError(f"driver keys need a dataset or tracker driver, got the driver file {path}")
    return load_driver_file(path)
