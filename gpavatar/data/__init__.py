"""Data in the official GPAvatar layout (SPEC pipeline.md section 2).

* :mod:`gpavatar.data.raster`: numpy z-buffer rasterizer with the model's camera.
* :mod:`gpavatar.data.synthetic`: FLAME-head videos written as ``img_lmdb/`` + ``dataset.pkl`` + ``camera.json``.
* :mod:`gpavatar.data.official`: :class:`OfficialDataset` (official sampling rules, source warp) and
  :func:`check_dataset`.
* :mod:`gpavatar.data.lmdb_store`: :class:`ImageLMDB`, read-only frames (a truncated file is an error).
* :mod:`gpavatar.data.safe_pickle`: ``dataset.pkl`` / tracker pickles read as data, never as code.

Needs ``lmdb`` and ``Pillow`` (imported on use).
"""

from gpavatar.data.official import (FIELD_SHAPES, DatasetReport, ImageLMDB, OfficialDataset, check_dataset,
                                    check_record, decode_image, flame_points, parse_key, perspective_warp,
                                    source_positions)
from gpavatar.data.raster import Fragments, look_at_front, project, rasterize, render_mesh
from gpavatar.data.synthetic import CAMERA, make_synthetic_dataset, synthetic_frames

__all__ = [
    "CAMERA", "FIELD_SHAPES", "DatasetReport", "Fragments", "ImageLMDB", "OfficialDataset", "check_dataset",
    "check_record", "decode_image", "flame_points", "look_at_front", "make_synthetic_dataset", "parse_key",
    "perspective_warp", "project", "rasterize", "render_mesh", "source_positions", "synthetic_frames",
]
