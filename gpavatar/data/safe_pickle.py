"""Reading dataset pickles (``dataset.pkl``, a tracker's ``lightning.pkl`` / ``smoothed.pkl``) without
running code from them.

A plain ``pickle.load`` calls whatever the file names (``os.system`` included).  These files only
hold dicts of strings, numbers, lists / tuples and numpy arrays (SPEC pipeline.md 2.3), so
:class:`RecordsUnpickler` resolves exactly what those need and refuses every other global, before
anything is called, with :class:`RefusedGlobal` (a ``pickle.UnpicklingError``) naming it:

======================================================  =================================================
global                                                  why
======================================================  =================================================
``numpy.ndarray``, ``numpy.dtype``                      array class and dtypes
``numpy[._]core.multiarray._reconstruct``               arrays (protocols 0-4); only builds ndarrays
``numpy[._]core.numeric._frombuffer``                   arrays (protocol 5)
``numpy[._]core.multiarray.scalar``                     numpy scalars (``np.float32(1)``)
``_codecs.encode`` (latin-1 only)                       bytes in protocol 0-2 pickles
``collections.OrderedDict``                             an ordered dict of records
======================================================  =================================================

Python-2 pickles (``copy_reg``, ``__builtin__``) are read with latin-1.  Torch tensors are not
allowed (their rebuild functions load nested pickles); convert them to numpy before pickling.

    >>> import io, pickle, numpy as np
    >>> safe_load(io.BytesIO(pickle.dumps({"bbox": np.zeros(4, np.float32)})))["bbox"].shape
    (4,)
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, BinaryIO, Union

import numpy as np

# The numpy internals a pickled array names: shared with the FLAME loader's unpickler.
from gpavatar.flame.loader import _NUMPY_PRIVATE, _numpy_private

__all__ = ["RecordsUnpickler", "RefusedGlobal", "safe_load", "safe_load_path"]

class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it may try to run code)."""


def _reconstruct(cls, *args):
    """``numpy.core.multiarray._reconstruct`` restricted to plain ndarrays."""
    if cls is not np.ndarray:
        raise RefusedGlobal(f"refusing numpy _reconstruct of {cls!r}: only numpy.ndarray is allowed")
    return _numpy_private("multiarray", "_reconstruct")(cls, *args)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as Python 3 pickles bytes at protocol < 3: (str, 'latin1') only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedGlobal("refusing _codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


class RecordsUnpickler(pickle.Unpickler):
    """Unpickler (latin-1 for Python-2 strings) for dicts / lists / tuples of strings, numbers and
    numpy arrays (module docstring); any other global raises ``pickle.UnpicklingError``."""

    def __init__(self, file: BinaryIO, source: str = "pickle"):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric") and _NUMPY_PRIVATE.get(name) == module.rsplit(".", 1)[-1]:
            return _reconstruct if name == "_reconstruct" else _numpy_private(_NUMPY_PRIVATE[name], name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise RefusedGlobal(
            f"{self.source}: refusing to unpickle global {module}.{name} (a pickle can run code on load; "
            "dataset pickles may only hold dicts, lists, strings, numbers and numpy arrays)")


def safe_load(file: BinaryIO, source: str = "pickle") -> Any:
    """Unpickle ``file`` with :class:`RecordsUnpickler`.  Any failure (a refused global, a truncated or
    malformed file) is a ``pickle.UnpicklingError`` naming ``source``."""
    try:
        return RecordsUnpickler(file, source).load()
    except RefusedGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError) as error:
        raise pickle.UnpicklingError(f"{source} is not a readable pickle ({type(error).__name__}: {error})") \
            from None


def safe_load_path(path: Union[str, os.PathLike]) -> Any:
    """:func:`safe_load` of the file at ``path`` (OSError when it cannot be opened)."""
    with open(path, "rb") as handle:
        return safe_load(handle, os.fspath(path))
