"""FLAME files in the release layout: what ``generic_model.pkl`` readers expect (SPEC pipeline.md 1.1).

The FLAME release stores identity and expression blendshapes in one ``shapedirs`` array of
shape (V, 3, 300 + n_exp): identity in columns 0..299, expression from column **300**. FLAME
layers (the official GPAvatar one included) take ``shapedirs[..., :n_shape]`` and
``shapedirs[..., 300:300 + n_exp]`` and read no column count from the file. A model with fewer
identity columns (the procedural head has 100) is therefore written with its identity block
zero-padded to 300 columns: the padding columns are zero, so any shape coefficient on them
changes nothing, and expression sits where every reader looks for it.

:func:`to_release_layout` re-packs a model's ``shapedirs`` that way (``n_shape_total`` = 300);
:func:`write_flame_pickle` writes a dict of plain numpy arrays as a pickle that ``pickle.load``
with numpy 1.x or 2.x, :class:`gpavatar.flame.loader.FlameUnpickler` and
:mod:`gpavatar.data.safe_pickle` all read. (numpy 2 pickles its arrays under ``numpy._core``,
which numpy < 1.26 cannot import; the writer names the ``numpy.core`` spelling that every numpy
version resolves.)

    >>> import numpy as np
    >>> fields = {"shapedirs": np.ones((4, 3, 5), np.float32), "n_shape_total": np.int64(2)}
    >>> release = to_release_layout(fields)
    >>> release["shapedirs"].shape, int(release["n_shape_total"]), float(release["shapedirs"][0, 0, 300])
    ((4, 3, 303), 300, 1.0)
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from gpavatar.flame.loader import OFFICIAL_SHAPE_COMPONENTS

__all__ = ["RELEASE_SHAPE_COLUMNS", "to_release_layout", "write_flame_pickle", "flame_pickle_bytes"]

RELEASE_SHAPE_COLUMNS = OFFICIAL_SHAPE_COMPONENTS  # 300: expression starts at this shapedirs column
PICKLE_PROTOCOL = 4  # Python >= 3.4; bytes stored raw (protocol 2 would store them as latin-1 text)


def to_release_layout(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` whose ``shapedirs`` (V, 3, S + E) becomes (V, 3, 300 + E): identity columns
    0..S-1 kept, S..299 zero, expression columns from 300; ``n_shape_total`` = 300.

    Args:
        fields: FLAME fields with ``shapedirs`` (V, 3, N) and ``n_shape_total`` = S (identity columns;
            without the key the model is taken as already in the release layout when N >= 300)
    Returns:
        dict, other fields shared (not copied); ``shapedirs`` keeps its dtype
    """
    if "shapedirs" not in fields:
        raise ValueError("fields must hold 'shapedirs' (V, 3, N)")
    shapedirs = np.asarray(fields["shapedirs"])
    if shapedirs.ndim != 3 or shapedirs.shape[1] != 3:
        raise ValueError(f"shapedirs must have shape (V, 3, N), got {shapedirs.shape}")
    N = shapedirs.shape[2]
    if "n_shape_total" in fields:
        identity = int(np.asarray(fields["n_shape_total"]))
    elif N >= RELEASE_SHAPE_COLUMNS:
        identity = RELEASE_SHAPE_COLUMNS
    else:
        raise ValueError(f"shapedirs has {N} < {RELEASE_SHAPE_COLUMNS} columns and no n_shape_total: the split "
                         "between identity and expression columns is unknown")
    if not 0 <= identity <= min(N, RELEASE_SHAPE_COLUMNS):
        raise ValueError(f"n_shape_total must be in [0, {min(N, RELEASE_SHAPE_COLUMNS)}] for the release layout "
                         f"(identity columns 0..299), got {identity}")
    padding = np.zeros(shapedirs.shape[:2] + (RELEASE_SHAPE_COLUMNS - identity,), shapedirs.dtype)
    out = dict(fields)
    out["shapedirs"] = np.ascontiguousarray(np.concatenate(
        [shapedirs[:, :, :identity], padding, shapedirs[:, :, identity:]], axis=2))
    out["n_shape_total"] = np.asarray(RELEASE_SHAPE_COLUMNS, dtype=np.int64)
    return out


class _PortablePickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be overridden
    """Names numpy's private modules with their numpy 1.x spelling (``numpy.core.*``), which numpy 2
    keeps importable for old pickles; everything else is pickled as usual."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module == "numpy._core" or module.startswith("numpy._core."):
            self.save("numpy.core" + module[len("numpy._core"):])
            self.save(name or obj.__qualname__)
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _plain(fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in fields.items():
        if not isinstance(key, str):
            raise TypeError(f"field names must be str, got {type(key).__name__}")
        array = np.asarray(value)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"field {key!r} must be a numeric numpy array, got {type(value).__name__} "
                            f"of dtype {array.dtype}")
        out[key] = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # keeps 0-d arrays 0-d
    return out


def flame_pickle_bytes(fields: Mapping[str, Any]) -> bytes:
    """The pickle :func:`write_flame_pickle` writes, as bytes (a dict of plain numpy arrays)."""
    import io

    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=PICKLE_PROTOCOL).dump(_plain(fields))
    return buffer.getvalue()


def write_flame_pickle(path: Union[str, os.PathLike], fields: Mapping[str, Any]) -> Path:
    """Write ``fields`` (str -> numeric array) as a ``generic_model.pkl``-style pickle of plain numpy
    arrays (no chumpy, no scipy), atomically (temporary file, then rename); returns the path."""
    from gpavatar.model.checkpoint import atomic_write

    path = Path(path)
    data = flame_pickle_bytes(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path
