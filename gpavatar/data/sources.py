"""Source images for reenactment: image files / folders, or frames of an official-layout dataset.

* :func:`image_sources`: files (.png, .jpg, ...; folders sorted by name), already aligned like the
  encoder's inputs (the official inference warps tracked frames with pipeline.md 2.9 first; no
  tracker here): RGB, shorter side resized to the model's ``image_size`` (bilinear, antialias),
  centre-cropped, divided by 255 (official inference, pipeline.md 2.6).
* :func:`dataset_sources`: frames by key, divided by 256 (official training) and warped with their
  own ``transform_matrix`` (pipeline.md 2.9); their mean ``mica_shape`` is the identity.

    >>> sources = image_sources(["face.png"], 64)  # doctest: +SKIP
    >>> sources.images.shape  # doctest: +SKIP
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SUFFIXES", "Sources", "dataset_sources", "image_files", "image_sources"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MIN_SOURCE_SIDE = 8
PathLike = Union[str, "Path"]


@dataclass
class Sources:
    """V source images: ``images`` (V, 3, S, S) encoder inputs in [0, 1]; ``display`` (V, 3, S, S) as shown;
    ``names``; ``shape`` (100,) mean identity or None; ``root``: dataset folder of dataset sources."""

    images: torch.Tensor
    display: torch.Tensor
    names: list
    shape: Optional[np.ndarray] = None
    root: Optional[Path] = None


def _fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): shorter side to ``size`` (bilinear, antialias), centre crop."""
    H, W = image.shape[1:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    if (h, w) != (H, W):
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size].clamp(0, 1)


def image_files(paths: Sequence[PathLike]) -> list[Path]:
    """The image files of ``paths`` (files, or folders: their images sorted by name); errors name the path."""
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not p.name.startswith("."))
            if not found:
                raise ValueError(f"source folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"source {path} is not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"source {path} not found (give image files or folders of images)")
    return files


def image_sources(paths: Sequence[PathLike], size: int) -> Sources:
    """Image files / folders -> :class:`Sources` at ``size``² (read as RGB, /255; see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    files = image_files(paths)
    for path in files:
        try:
            with Image.open(path) as handle:
                array = np.asarray(handle.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"source {path} is not a readable image ({error})") from None
        if min(array.shape[:2]) < MIN_SOURCE_SIDE:
            raise ValueError(f"source {path} is {array.shape[1]}x{array.shape[0]} pixels; it needs at least "
                             f"{MIN_SOURCE_SIDE} on each side")
        images.append(_fit_square(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0, size))
    stacked = torch.stack(images)
    return Sources(stacked, stacked, [p.name for p in files])


def dataset_sources(root: PathLike, keys: Sequence[str], size: int) -> Sources:
    """Frames ``keys`` of an official-layout dataset: resized to ``size``², /256, warped with their own
    camera (pipeline.md 2.6, 2.9); the identity is the mean of their ``mica_shape``."""
    from gpavatar.data.official import ImageLMDB, check_record, load_camera, load_dataset_pkl, perspective_warp

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset {root} is not a folder (a dataset folder holds img_lmdb/, dataset.pkl, "
                                f"camera.json)")
    if not keys:
        raise ValueError(f"--dataset {root} needs --source KEY (a frame key such as img_000000_0)")
    records, _ = load_dataset_pkl(root)
    focal = float(load_camera(root)["focal_length"])
    lmdb = ImageLMDB(root / "img_lmdb")
    shown, warped, shapes = [], [], []
    for key in keys:
        if key not in records:
            example = next(iter(sorted(records)), "img_000000_0")
            raise KeyError(f"--source {key!r} is not a frame of {root / 'dataset.pkl'} (e.g. {example})")
        record = check_record(key, records[key])
        image = _fit_square(torch.from_numpy(lmdb.image(key)).float() / 256.0, size)
        shown.append(image)
        warped.append(perspective_warp(image, torch.from_numpy(record["transform_matrix"]), focal))
        shapes.append(record["mica_shape"])
    return Sources(torch.stack(warped), torch.stack(shown), list(keys), np.mean(shapes, 0).astype(np.float32), root)
