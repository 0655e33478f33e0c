"""LMDB frame stores of the official layout (SPEC pipeline.md 2.2): reading, safely.

``img_lmdb/`` maps ``img_<video>_<frame>`` to PNG / JPEG bytes (or a ``torch.save``d uint8
(3, H, W) tensor, the official reader's fallback).  :class:`ImageLMDB` opens it read-only like the
official reader (no locking, no read-ahead), lazily in each process (DataLoader workers), after
:func:`open_lmdb_checked` has made sure the file is not truncated: LMDB memory-maps ``data.mdb``, and
a page past the end of a truncated file kills the process with SIGBUS instead of raising.

    >>> db = ImageLMDB("data/synth/img_lmdb")  # doctest: +SKIP
    >>> db.image("img_000000_0").shape  # doctest: +SKIP
    (3, 256, 256)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ["ImageLMDB", "close_lmdb", "decode_image", "open_lmdb_checked"]


def decode_image(key: str, value: bytes) -> tuple[np.ndarray, str]:
    """LMDB value -> (uint8 (3, H, W) RGB, format name).  PNG / JPEG via Pillow; else, as the official
    reader, a ``torch.save``d tensor (loaded with ``weights_only``).  ValueError naming ``key`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(value)) as image:
            fmt = image.format or "image"
            array = np.asarray(image.convert("RGB"))
        return np.ascontiguousarray(array.transpose(2, 0, 1)), fmt
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        image_error = error
    try:
        tensor = torch.load(io.BytesIO(value), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not a tensor either
        tensor = None
    if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 and tensor.shape[0] == 3:
        if tensor.dtype.is_floating_point:  # a float tensor is taken as [0, 1]
            tensor = (tensor.clamp(0, 1) * 255).round()
        return tensor.to(torch.uint8).contiguous().numpy(), "tensor"
    raise ValueError(f"LMDB value of {key!r} is not a decodable image ({image_error}) "
                     f"nor a serialized (3, H, W) tensor")


_ENVIRONMENTS: dict = {}  # (real path, pid) -> open read-only lmdb.Environment (lmdb allows one per process)


def close_lmdb(path: Union[str, os.PathLike]) -> None:
    """Close this process's cached read-only environment of ``path`` (before rewriting that LMDB)."""
    env = _ENVIRONMENTS.pop((os.path.realpath(path), os.getpid()), None)
    if env is not None:
        env.close()


def open_lmdb_checked(path: Union[str, os.PathLike]):
    """Open the LMDB folder ``path`` read-only (no locking, no read-ahead, as the official reader) after
    checking that ``data.mdb`` holds every page the environment refers to.

    LMDB memory-maps the file: a page beyond the end of a truncated file (an interrupted copy or
    download) kills the process with SIGBUS on first read.  The newest meta page (in the first two
    pages, read with ``read()``, not the map) records the last page in use, so the file must hold
    ``(last_pgno + 1) * psize`` bytes.  ValueError naming the file otherwise, or when it is no LMDB."""
    import lmdb

    data = Path(path) / "data.mdb"
    try:
        env = lmdb.open(os.fspath(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise ValueError(f"cannot open the LMDB {data}: {error}") from None
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = os.path.getsize(data)
    except BaseException:
        env.close()
        raise
    if size < needed:
        env.close()
        raise ValueError(f"the LMDB {data} is truncated: the file has {size} bytes, its pages need {needed} "
                         f"(an interrupted copy or download?); reading it would crash the process")
    return env


class ImageLMDB:
    """Read-only LMDB of encoded frames, opened lazily in each process (safe with DataLoader workers).

    Opened as the official reader: read-only, no locking, no read-ahead; readers of the same path in
    one process share the environment (py-lmdb refuses to open it twice).  A truncated ``data.mdb`` is
    a ValueError naming it (:func:`open_lmdb_checked`), not a crash."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"no LMDB at {self.path} (expected {self.path / 'data.mdb'})")

    def _open(self):
        path, pid = os.path.realpath(self.path), os.getpid()
        if (path, pid) not in _ENVIRONMENTS:
            import lmdb

            for inherited in [k for k in _ENVIRONMENTS if k[0] == path]:  # a fork's copy of the parent's
                _ENVIRONMENTS.pop(inherited).close()  # unmaps this process's copy only; lmdb then allows a reopen
            _ENVIRONMENTS[(path, pid)] = open_lmdb_checked(self.path)
        return _ENVIRONMENTS[(path, pid)]

    def get(self, key: str) -> bytes:
        """Raw value; KeyError naming the key when absent."""
        with self._open().begin(buffers=False) as txn:
            value = txn.get(key.encode("utf-8"))
        if value is None:
            raise KeyError(f"LMDB {self.path} has no key {key!r}")
        return value

    def image(self, key: str) -> np.ndarray:
        """uint8 (3, H, W) RGB; KeyError (missing) / ValueError (undecodable) naming the key."""
        return decode_image(key, self.get(key))[0]

    def keys(self) -> list[str]:
        with self._open().begin() as txn:
            return [k.decode("utf-8", "replace") for k in txn.cursor().iternext(keys=True, values=False)]

    def __len__(self) -> int:
        return self._open().stat()["entries"]
