"""Reading FLAME model files without chumpy, scipy or arbitrary pickle code (SPEC pipeline.md 1.1-1.2).

Formats:

* ``.pkl``: the official ``generic_model.pkl`` (a Python-2 pickle read with
  latin-1). Its fields may be chumpy ``Ch`` objects (payload in the state entry
  ``x``) and ``J_regressor`` is a SciPy CSC matrix. :class:`FlameUnpickler`
  resolves only numpy array reconstruction, chumpy classes (to
  :class:`ChumpyObject`), scipy.sparse matrix classes (to :class:`SparseMatrix`,
  densified with numpy) and a few container builtins; any other global raises
  ``pickle.UnpicklingError`` naming it, before anything is called.
* ``.npz``: the same keys, loaded with ``allow_pickle=False`` (see
  :func:`save_flame_model`).

The normalized model (what :func:`load_flame_model` returns and
:class:`gpavatar.flame.FLAME` consumes), with V vertices, F faces, J joints,
N blendshapes and P = 9 (J - 1) pose blendshapes:

=================  ===============  =============================================
key                shape, dtype     meaning
=================  ===============  =============================================
``v_template``     (V, 3) float32   template mesh
``f``              (F, 3) int64     triangles
``shapedirs``      (V, 3, N) f32    identity columns [0, n_shape_total), then expression
``n_shape_total``  () int64         identity columns in ``shapedirs``: the file's own
                                    key if present, else 300 (official FLAME) or N if N <= 300
                                    (with a warning below 300: no expression columns)
``posedirs``       (V, 3, P) f32    pose correctives, the official file's layout
``J_regressor``    (J, V) float32   dense
``weights``        (V, J) float32   skinning weights
``kintree_table``  (2, J) int64     row 0 = parents as stored (entry 0 is garbage, e.g. 2**32-1)
``vc``             (V, 3) float32   optional vertex colours
=================  ===============  =============================================

``posedirs`` is accepted as (V, 3, P), (V*3, P) (the file's array reshaped
row-major, vertex-major then coordinate) or (P, V*3) (that, transposed: the
layout the LBS matmul uses); all three are normalized to (V, 3, P). When
V*3 == P the 2-D case is ambiguous and read as (V*3, P).

    >>> from gpavatar.flame import load_flame_model
    >>> model = load_flame_model("assets/generic_model.pkl")  # doctest: +SKIP
    >>> model["shapedirs"].shape, int(model["n_shape_total"])  # doctest: +SKIP
    ((5023, 3, 400), 300)
"""

from __future__ import annotations

import collections
import importlib
import io
import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

OFFICIAL_SHAPE_COMPONENTS = 300  # identity columns of the official shapedirs; expression starts here
REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
SPARSE_CLASSES = ("csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array")


class _PickleStub:
    """Inert stand-in for a class we refuse to import: keeps constructor args and pickled state."""

    source = "?"  # "module.Class" it stands for

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE may call the class; nothing to run
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.source}>"


class ChumpyObject(_PickleStub):
    """A chumpy object from the pickle; its array is ``state['x']`` (SPEC 1.2)."""

    def payload(self, field: str = "?") -> np.ndarray:
        state = self.state if isinstance(self.state, dict) else {}
        if "x" not in state:
            raise ValueError(f"FLAME field {field!r} is a chumpy {self.source} without an 'x' payload "
                             f"(state keys {sorted(state)}); only plain Ch arrays can be read without chumpy")
        return _to_array(state["x"], field)


class SparseMatrix(_PickleStub):
    """A scipy.sparse CSC/CSR/COO matrix from the pickle, densified with numpy only."""

    def toarray(self, field: str = "?") -> np.ndarray:
        state = self.state if isinstance(self.state, dict) else {}
        fmt = self.source.rsplit(".", 1)[-1][:3]
        try:
            shape = tuple(int(s) for s in (state["_shape"] if "_shape" in state else state["shape"]))
            data = np.asarray(state["data"])
            if fmt == "coo":
                rows, cols = state["coords"] if "coords" in state else (state["row"], state["col"])
            else:
                indices, indptr = np.asarray(state["indices"]), np.asarray(state["indptr"])
                major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
                rows, cols = (indices, major) if fmt == "csc" else (major, indices)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"FLAME field {field!r}: malformed {self.source} state "
                             f"(keys {sorted(state)}): {err}") from None
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if len(shape) != 2 or not (rows.shape == cols.shape == data.shape):
            raise ValueError(f"FLAME field {field!r}: inconsistent {self.source} (shape {shape}, "
                             f"{data.shape[0]} values, {rows.shape[0]} row / {cols.shape[0]} column indices)")
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
            raise ValueError(f"FLAME field {field!r}: {self.source} index out of range for shape {shape}")
        dense = np.zeros(shape, dtype=data.dtype)
        np.add.at(dense, (rows, cols), data)  # duplicates add, as scipy's todense does
        return dense


_STUB_CLASSES: dict[tuple[str, str], type] = {}


def _stub_class(base: type, module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (base,), {"source": f"{module}.{name}", "__module__": __name__})
    return _STUB_CLASSES[key]


def _is_stub_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, _PickleStub)


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor restricted to ``object.__new__(stub)`` (protocol 0/1 objects)."""
    if base is not object or not _is_stub_class(cls):
        raise pickle.UnpicklingError(f"refusing copyreg._reconstructor({cls!r}, {base!r}): "
                                     "only chumpy / scipy.sparse stubs over object are allowed")
    return cls.__new__(cls)


def _safe_newobj(cls, *args):
    if not _is_stub_class(cls):
        raise pickle.UnpicklingError(f"refusing copyreg.__newobj__ of {cls!r}")
    return cls.__new__(cls, *args)


def _safe_encode(text, encoding="utf-8", errors="strict"):
    """_codecs.encode as Python 3 pickles bytes at protocol < 3: (str, 'latin1') only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("refusing _codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


def _safe_bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("refusing builtins.bytes with non-bytes arguments")


def _numpy_private(module_tail: str, name: str):
    """numpy._core.<tail>.<name> (numpy >= 2) or numpy.core.<tail>.<name> (numpy 1)."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + module_tail), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {module_tail}.{name}")


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # Python-2 names in protocol 0-2 pickles
_NUMPY_PRIVATE = {"_reconstruct": "multiarray", "scalar": "multiarray", "_frombuffer": "numeric"}
_BUILTINS = {"object": object, "set": set, "frozenset": frozenset, "complex": complex, "bytes": _safe_bytes,
             "bytearray": bytearray, "slice": slice}


class FlameUnpickler(pickle.Unpickler):
    """Unpickler (latin-1) that resolves only what a FLAME model file needs.

    Allowed globals: numpy array / dtype / scalar reconstruction (``numpy.core``
    and ``numpy._core`` spellings), any ``chumpy*`` class (-> inert
    :class:`ChumpyObject`), scipy.sparse CSC/CSR/COO classes under any module
    path (-> inert :class:`SparseMatrix`), ``copyreg._reconstructor`` /
    ``__newobj__`` restricted to those stubs, ``collections.OrderedDict``,
    ``_codecs.encode`` (latin-1 only) and inert builtins (object, set,
    frozenset, complex, bytes, bytearray, slice). Everything else raises
    ``pickle.UnpicklingError("refusing to unpickle module.name ...")``.
    """

    def __init__(self, file):
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        if module.split(".")[0] == "chumpy":
            return _stub_class(ChumpyObject, module, name)
        if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in SPARSE_CLASSES:
            return _stub_class(SparseMatrix, module, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric") and _NUMPY_PRIVATE.get(name) == module.rsplit(".", 1)[-1]:
            return _numpy_private(_NUMPY_PRIVATE[name], name)
        if module == "copyreg" and name in ("_reconstructor", "__newobj__"):
            return _safe_reconstructor if name == "_reconstructor" else _safe_newobj
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "_codecs" and name == "encode":
            return _safe_encode
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a FLAME model file may only hold numpy arrays, "
            "chumpy objects, scipy.sparse matrices and plain containers")


def _to_array(value: Any, field: str) -> np.ndarray:
    """numpy view of one field: ndarray, chumpy stub, sparse stub, torch tensor or nested list."""
    if isinstance(value, ChumpyObject):
        return value.payload(field)
    if isinstance(value, SparseMatrix):
        return value.toarray(field)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, _PickleStub):
        raise ValueError(f"FLAME field {field!r} is an unsupported {value.source}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"FLAME field {field!r} is not numeric: {err}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"FLAME field {field!r} must be numeric, got dtype {array.dtype} ({type(value).__name__})")
    return array


def _float32(value, field: str, shape: str, ndim: int) -> np.ndarray:
    array = _to_array(value, field)
    if array.ndim != ndim:
        raise ValueError(f"FLAME field {field!r} must have shape {shape}, got {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"FLAME field {field!r} holds non-finite values")
    return array


def _normalize_posedirs(posedirs: np.ndarray, V: int, P: int) -> np.ndarray:
    """(V, 3, P) | (V*3, P) | (P, V*3) -> (V, 3, P)."""
    if posedirs.shape == (V, 3, P):
        return posedirs
    if posedirs.shape == (V * 3, P):
        return np.ascontiguousarray(posedirs.reshape(V, 3, P))
    if posedirs.shape == (P, V * 3):
        return np.ascontiguousarray(posedirs.T.reshape(V, 3, P))
    raise ValueError(f"FLAME field 'posedirs' must have shape ({V}, 3, {P}), ({V * 3}, {P}) or ({P}, {V * 3}) "
                     f"(V = {V} vertices, P = 9 * (J - 1) = {P}), got {posedirs.shape}")


def normalize_flame_model(fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check and convert raw FLAME fields to the normalized model (see the module docstring).

    Args:
        fields: mapping with at least ``REQUIRED_KEYS``; values may be ndarrays,
            chumpy / sparse stubs from :class:`FlameUnpickler`, torch tensors or lists.
            Other keys are ignored except ``n_shape_total`` and ``vc``.
    Returns:
        dict of float32 / int64 numpy arrays
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"a FLAME model must be a mapping of fields, got {type(fields).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in fields]
    if missing:
        raise ValueError(f"FLAME model is missing fields {missing} (has {sorted(map(str, fields))})")
    v_template = _float32(fields["v_template"], "v_template", "(V, 3)", 2)
    V = v_template.shape[0]
    if v_template.shape[1] != 3:
        raise ValueError(f"FLAME field 'v_template' must have shape (V, 3), got {v_template.shape}")
    faces = _to_array(fields["f"], "f")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"FLAME field 'f' must be integer with shape (F, 3), got {faces.dtype} {faces.shape}")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise ValueError(f"FLAME field 'f' indexes vertices outside [0, {V})")
    shapedirs = _float32(fields["shapedirs"], "shapedirs", f"({V}, 3, N)", 3)
    if shapedirs.shape[:2] != (V, 3):
        raise ValueError(f"FLAME field 'shapedirs' must have shape ({V}, 3, N), got {shapedirs.shape}")
    N = shapedirs.shape[2]
    if "n_shape_total" in fields:
        n_shape_total = int(_to_array(fields["n_shape_total"], "n_shape_total"))
    else:  # the release layout: expression from column 300 (gpavatar.flame.release)
        n_shape_total = OFFICIAL_SHAPE_COMPONENTS if N > OFFICIAL_SHAPE_COMPONENTS else N
        if N < OFFICIAL_SHAPE_COMPONENTS:
            warnings.warn(f"FLAME shapedirs has {N} columns and no 'n_shape_total': read as {N} identity columns "
                          f"and no expression (the release layout puts expression from column "
                          f"{OFFICIAL_SHAPE_COMPONENTS}; a compact file must say where it starts)", UserWarning,
                          stacklevel=2)
    if not 0 <= n_shape_total <= N:
        raise ValueError(f"FLAME field 'n_shape_total' must be in [0, {N}] (shapedirs columns), got {n_shape_total}")
    kintree = _to_array(fields["kintree_table"], "kintree_table")
    if kintree.ndim != 2 or kintree.shape[0] != 2 or kintree.shape[1] < 1:
        raise ValueError(f"FLAME field 'kintree_table' must have shape (2, J), got {kintree.shape}")
    kintree = kintree.astype(np.int64)  # the root's garbage parent (2**32 - 1) stays as it is
    J = kintree.shape[1]
    J_regressor = _float32(fields["J_regressor"], "J_regressor", f"({J}, {V})", 2)
    if J_regressor.shape != (J, V):
        raise ValueError(f"FLAME field 'J_regressor' must have shape ({J}, {V}), got {J_regressor.shape}")
    weights = _float32(fields["weights"], "weights", f"({V}, {J})", 2)
    if weights.shape != (V, J):
        raise ValueError(f"FLAME field 'weights' must have shape ({V}, {J}), got {weights.shape}")
    posedirs = _to_array(fields["posedirs"], "posedirs")
    posedirs = _normalize_posedirs(posedirs, V, 9 * (J - 1))
    posedirs = _float32(posedirs, "posedirs", f"({V}, 3, P)", 3)
    model = {"v_template": v_template, "f": faces, "shapedirs": shapedirs,
             "n_shape_total": np.asarray(n_shape_total, dtype=np.int64), "posedirs": posedirs,
             "J_regressor": J_regressor, "weights": weights, "kintree_table": kintree}
    if "vc" in fields and fields["vc"] is not None:
        vc = _float32(fields["vc"], "vc", f"({V}, 3)", 2)
        if vc.shape != (V, 3):
            raise ValueError(f"FLAME field 'vc' must have shape ({V}, 3), got {vc.shape}")
        model["vc"] = vc
    return model


def read_flame_pickle(data: Union[bytes, PathLike]) -> Any:
    """Unpickle FLAME-file bytes (or a file) with :class:`FlameUnpickler`; nothing outside its allow-list runs."""
    if isinstance(data, (bytes, bytearray)):
        return FlameUnpickler(io.BytesIO(data)).load()
    with open(data, "rb") as handle:
        return FlameUnpickler(handle).load()


def load_flame_model(path: PathLike) -> dict[str, np.ndarray]:
    """Load a FLAME ``.pkl`` (official, chumpy-free) or ``.npz`` file as the normalized model.

    Args:
        path: ``generic_model.pkl``-style pickle, or ``.npz`` with the same keys
    Returns:
        dict described in the module docstring (shapedirs (V, 3, N), posedirs (V, 3, P), ...)
    Raises:
        pickle.UnpicklingError: the pickle references anything outside the allow-list
        ValueError: missing or inconsistent fields
    """
    path = os.fspath(path)
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            raw = {key: archive[key] for key in archive.files}
    else:
        raw = read_flame_pickle(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: a FLAME pickle must hold a dict of fields, got {type(raw).__name__}")
    return normalize_flame_model(raw)


def save_flame_model(path: PathLike, fields: Mapping[str, Any]) -> None:
    """Write a (normalized) FLAME model as ``.npz`` that :func:`load_flame_model` reads back without pickle."""
    np.savez(path, **normalize_flame_model(fields))


LANDMARK_KEYS = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
                 "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")


def load_landmark_embedding(path: PathLike, trusted: bool = False) -> dict[str, np.ndarray]:
    """Landmark embedding (SPEC 1.1) from ``.npz`` (safe) or the official ``landmark_embedding.npy``.

    The official ``.npy`` is an object array whose dict holds pickled torch
    tensors: reading it runs an unrestricted pickle, so it needs
    ``trusted=True`` (and torch). Convert it once with ``np.savez(out, **emb)``.

    Returns:
        dict with ``LANDMARK_KEYS`` as numpy arrays (faces int64, barycentric float32),
        ``full_*`` squeezed to (68,) / (68, 3)
    """
    path = os.fspath(path)
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            raw = {key: archive[key] for key in archive.files}
    elif not trusted:
        raise ValueError(f"{path}: loading a pickled landmark embedding executes its pickle; pass trusted=True "
                         "for a file you trust, or convert it to .npz")
    else:
        raw = np.load(path, allow_pickle=True, encoding="latin1")[()]
    missing = [k for k in LANDMARK_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: landmark embedding is missing {missing}")
    out = {}
    for key in LANDMARK_KEYS:
        array = _to_array(raw[key], key)
        if key.startswith("full_"):
            array = array.reshape(array.shape[-2:] if key.endswith("bary_coords") else array.shape[-1:])
        out[key] = array.astype(np.int64 if key.endswith("faces_idx") else np.float32)
    return out
