"""Run code written for pytorch3d / nerfacc on gpavatar's kernels.

* :mod:`gpavatar.compat.pytorch3d_ops`: ``knn_points``, ``knn_gather`` (pytorch3d's contract:
  ragged ``lengths1`` / ``lengths2``, any point dimension, L1 / L2, ``K > P`` padding,
  ``return_nn``), on :func:`gpavatar.ops.knn` where it applies;
* :mod:`gpavatar.compat.nerfacc`: nerfacc 0.5.3's ``ray_aabb_intersect``,
  ``render_weight_from_alpha``, ``accumulate_along_rays``, ``importance_sampling``,
  ``exclusive_prod`` ... for batched rays;
* :func:`install`: lets ``import pytorch3d.ops`` / ``import nerfacc`` find them when the
  real packages are absent.

    >>> import gpavatar.compat
    >>> substituted = gpavatar.compat.install()  # doctest: +SKIP
    >>> from pytorch3d.ops import knn_points     # doctest: +SKIP

See ``docs/compat.md`` for the recipe.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings

from gpavatar.compat import nerfacc, pytorch3d_ops

__all__ = ["install", "installed", "CompatWarning", "nerfacc", "pytorch3d_ops"]

_MARKER = "__gpavatar_compat__"

# root package -> (module names to provide, the gpavatar module behind them, what it covers)
_SUBSTITUTES = {
    "pytorch3d": (("pytorch3d.ops", "pytorch3d.ops.knn"), pytorch3d_ops, "knn_points, knn_gather"),
    "nerfacc": (("nerfacc", "nerfacc.volrend", "nerfacc.grid", "nerfacc.pdf", "nerfacc.scan", "nerfacc.data_specs"),
                nerfacc, "batched ray_aabb_intersect, render_weight_from_alpha, accumulate_along_rays, "
                         "importance_sampling, scans"),
}


class CompatWarning(UserWarning):
    """Issued by :func:`install` when it substitutes a missing package."""


def _stub(name: str, source: types.ModuleType, package: bool) -> types.ModuleType:
    module = types.ModuleType(name, source.__doc__ if source is not None else None)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    module.__package__ = name if package else name.rpartition(".")[0]
    if package:
        module.__path__ = []  # submodules come from sys.modules or _StubFinder, never from disk
    if source is not None:
        for attr in source.__all__:
            setattr(module, attr, getattr(source, attr))
        if hasattr(source, "__version__"):
            module.__version__ = source.__version__ + "+gpavatar"
    setattr(module, _MARKER, source.__name__ if source is not None else True)
    return module


def _really_installed(root: str) -> bool:
    module = sys.modules.get(root)
    if module is not None:
        return not hasattr(module, _MARKER)
    try:
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):
        return False


class _StubFinder:
    """Meta-path finder: a submodule of a substituted package that gpavatar does not provide
    fails with a message saying what was substituted (instead of a bare 'No module named')."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        root = fullname.partition(".")[0]
        if root in _SUBSTITUTES and fullname not in sys.modules and hasattr(sys.modules.get(root), _MARKER):
            names, source, covers = _SUBSTITUTES[root]
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: {root} is not installed and gpavatar.compat.install() substitutes "
                f"only {', '.join(names)} ({covers}); install {root} for the rest", name=fullname)
        return None


def installed() -> dict[str, str]:
    """Module names currently resolved to gpavatar.compat stand-ins -> the gpavatar module behind each."""
    return {name: getattr(module, _MARKER) for name, module in list(sys.modules.items())
            if isinstance(getattr(module, _MARKER, None), str)}


def install(pytorch3d: bool = True, nerfacc: bool = True) -> tuple[str, ...]:
    """Make ``import pytorch3d.ops`` and ``import nerfacc`` resolve to gpavatar.compat when the
    real packages are absent.

    A package that is installed (importable, or already imported) is left alone.  Each
    substitution is announced once with a :class:`CompatWarning`; calling ``install()`` again
    changes nothing and warns no more (idempotent).

    Args:
        pytorch3d: substitute ``pytorch3d`` (a namespace holding only ``pytorch3d.ops``)
        nerfacc: substitute ``nerfacc``
    Returns:
        the module names substituted by this call, e.g. ``("pytorch3d.ops", "nerfacc")``
    """
    for name, flag in (("pytorch3d", pytorch3d), ("nerfacc", nerfacc)):
        if not isinstance(flag, bool):
            raise TypeError(f"install: {name} must be a bool, got {type(flag).__name__}")
    wanted = [root for root, flag in (("pytorch3d", pytorch3d), ("nerfacc", nerfacc)) if flag]
    done, notes = [], []
    for root in wanted:
        if root in sys.modules or _really_installed(root):  # ours already, or the real package
            continue
        names, source, covers = _SUBSTITUTES[root]
        if root not in names:  # pytorch3d: an empty package around the substituted submodules
            sys.modules[root] = _stub(root, None, package=True)
        for i, name in enumerate(names):
            if i and source.__name__ == getattr(sys.modules.get(names[0]), _MARKER, None):
                sys.modules[name] = sys.modules[names[0]]  # aliases (nerfacc.volrend, ...) share one module
            else:
                sys.modules[name] = _stub(name, source, package=(i == 0))
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and not hasattr(sys.modules[parent], child):
                setattr(sys.modules[parent], child, sys.modules[name])
        done.append(names[0])
        notes.append(f"{root} is not installed: {', '.join(repr(n) for n in names)} now resolve to "
                     f"{source.__name__} ({covers})")
    if done:
        if not any(isinstance(f, _StubFinder) or f is _StubFinder for f in sys.meta_path):
            sys.meta_path.insert(0, _StubFinder)
        warnings.warn("gpavatar.compat.install(): " + "; ".join(notes), CompatWarning, stacklevel=2)
    return tuple(done)
