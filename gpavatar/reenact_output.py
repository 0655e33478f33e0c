"""Pictures and files of :mod:`gpavatar.reenact`: video tiles, a colour ramp, depth and attention images,
atomic ``.png`` / ``.npy`` writers.

The colour ramp maps [0, 1] through five anchor colours (dark violet, purple, red, orange, pale
yellow: increasing lightness, readable in grey scale); NaN maps to black.

    >>> colorize(np.array([0.0, 1.0, np.nan])).tolist()
    [[5, 3, 26], [252, 250, 163], [0, 0, 0]]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TILE", "attention_grid", "colorize", "depth_tiles", "grid2x2", "save_array", "save_png", "tile"]

TILE = 256  # side of each panel of the side-by-side video
RAMP = np.array([[0.02, 0.01, 0.10], [0.33, 0.06, 0.43], [0.74, 0.22, 0.33], [0.98, 0.55, 0.04],
                 [0.99, 0.98, 0.64]])


def tile(image: torch.Tensor, size: int = TILE) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (size, size, 3) uint8 (bilinear; antialiased when shrinking)."""
    image = image.detach().float().cpu().clamp(0, 1)
    if tuple(image.shape[1:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=image.shape[-1] > size,
                              align_corners=False)[0].clamp(0, 1)
    return (image.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()


def grid2x2(tiles: list) -> np.ndarray:
    """Up to 4 (S, S, 3) tiles -> one (S, S, 3) 2 x 2 grid (row-major, black where missing)."""
    S = tiles[0].shape[0]
    half = S // 2
    canvas = np.zeros((2 * half, 2 * half, 3), np.uint8)
    for k, t in enumerate(tiles[:4]):
        small = tile(torch.from_numpy(t).permute(2, 0, 1).float() / 255.0, half)
        r, c = divmod(k, 2)
        canvas[r * half:(r + 1) * half, c * half:(c + 1) * half] = small
    if canvas.shape[0] != S:
        canvas = np.pad(canvas, ((0, S - canvas.shape[0]), (0, S - canvas.shape[1]), (0, 0)))
    return canvas


def colorize(values: np.ndarray) -> np.ndarray:
    """(...) values in [0, 1] (clipped; NaN = black) -> (..., 3) uint8 through :data:`RAMP`."""
    values = np.asarray(values, dtype=np.float64)
    nan = np.isnan(values)
    x = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(RAMP) - 1)
    low = np.minimum(x.astype(int), len(RAMP) - 2)
    frac = (x - low)[..., None]
    rgb = RAMP[low] * (1 - frac) + RAMP[low + 1] * frac
    rgb[nan] = 0
    return (rgb * 255 + 0.5).astype(np.uint8)


def _upsample(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3), nearest neighbour (depth pixels stay visible as pixels)."""
    rows = (np.arange(size) * image.shape[0] // size)
    cols = (np.arange(size) * image.shape[1] // size)
    return image[rows][:, cols]


def depth_tiles(depth: np.ndarray, size: int = TILE) -> list:
    """(N, R, R) depth (NaN = background) -> N (size, size, 3) uint8 frames; near = light, one scale for
    the whole clip (its finite min .. max)."""
    finite = depth[np.isfinite(depth)]
    near, far = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = (far - depth) / max(far - near, 1e-6)
    return [_upsample(colorize(frame), size) for frame in scaled]


def attention_grid(sources: torch.Tensor, weights: np.ndarray, cell: int = 128) -> np.ndarray:
    """One row per source: the source image, then its MTA weight on each of the 3 planes (ramp 0 .. 1).

    sources: (V, 3, S, S) in [0, 1]; weights: (V, 3, H, W) -> (V·cell, 4·cell, 3) uint8."""
    rows = []
    for v in range(weights.shape[0]):
        cells = [tile(sources[v], cell)] + [_upsample(colorize(weights[v, p]), cell) for p in range(3)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def save_png(path: Path, image: np.ndarray) -> Path:
    """(H, W, 3) uint8 -> ``path`` (PNG), written to a temporary file and renamed."""
    from PIL import Image

    from gpavatar.model.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return path


def save_array(path: Path, array: np.ndarray) -> Path:
    """``array`` -> ``path`` (.npy), written to a temporary file and renamed."""
    from gpavatar.model.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)
    return path
