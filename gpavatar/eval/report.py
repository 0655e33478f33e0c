"""Files ``gpavatar eval`` writes besides its summary line: per-sample metrics and an image grid.

* :func:`write_per_sample`: ``.csv`` (columns ``key, sources, psnr, ssim, l1``; sources joined
  with ``;``) or ``.json`` (``{"split", "summary": {psnr, ssim, l1, samples}, "samples": [...]}``).
* :func:`write_grid`: one row per sample, tiles ``sources... | target | prediction``, images
  clamped to [0, 1].

Both are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gpavatar.model.checkpoint import atomic_write

PER_SAMPLE_SUFFIXES = (".csv", ".json")
GRID_SUFFIXES = (".png", ".jpg", ".jpeg")
METRICS = ("psnr", "ssim", "l1")


def write_per_sample(path, rows: Sequence[dict], split: Optional[str] = None) -> Path:
    """Rows of :func:`gpavatar.eval.evaluate.evaluate` (``per_sample=True``) as CSV or JSON by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PER_SAMPLE_SUFFIXES:
        raise ValueError(f"per-sample file {path} must end in .csv or .json")
    if suffix == ".json":
        summary = {m: (sum(r[m] for r in rows) / len(rows) if rows else math.nan) for m in METRICS}
        finite = lambda v: v if isinstance(v, float) and math.isfinite(v) else None  # noqa: E731 - JSON has no NaN
        samples = [{**r, **{m: finite(r[m]) for m in METRICS}} for r in rows]
        summary = {m: finite(v) for m, v in summary.items()}
        text = json.dumps({"split": split, "summary": {**summary, "samples": len(rows)}, "samples": samples},
                          indent=1) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["key", "sources", *METRICS])
        for r in rows:
            writer.writerow([r["key"], ";".join(r["sources"]), *(f"{r[m]:.6g}" for m in METRICS)])
        text = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _tile(image: torch.Tensor, side: int) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (side, side, 3) uint8."""
    image = F.interpolate(image[None].float().clamp(0, 1), size=(side, side), mode="bilinear",
                          antialias=image.shape[-1] > side, align_corners=False)[0]
    return (image.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()


def write_grid(path, examples: Sequence[tuple], tile: int = 128) -> Path:
    """``examples`` (sources (V, 3, S, S), target (3, S, S), prediction (3, S', S')) -> one row each."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in GRID_SUFFIXES:
        raise ValueError(f"grid image {path} must end in .png or .jpg")
    if not examples:
        raise ValueError("write_grid needs at least one example")
    width = max(len(sources) for sources, _, _ in examples) + 2
    rows = []
    for sources, target, prediction in examples:
        tiles = [_tile(s, tile) for s in sources] + [_tile(target, tile), _tile(prediction, tile)]
        tiles[len(sources):len(sources)] = [np.zeros((tile, tile, 3), np.uint8)] * (width - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format=fmt))
    return path
