"""Packaging behaviour: import never compiles, a missing extension warns once and
falls back, backend selection by argument and environment."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gpavatar.ops as ops
from _data import make_points, make_queries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    environ = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_missing_extension_warns_once_and_falls_back():
    code = """
        import sys, warnings
        sys.modules["gpavatar._C"] = None  # as if the extension were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, gpavatar.ops as ops
            q, p = torch.rand(1, 20, 3), torch.rand(1, 30, 3)
            assert ops.available_backends("cpu")[-1] == "torch" and "cpu" not in ops.available_backends("cpu")
            d, i = ops.knn(q, p, 4)
            ops.knn(q, p, 4)
        ours = [w for w in caught if "gpavatar._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        print("ok", tuple(i.shape))
    """
    result = run_python(code, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert "ok (1, 20, 4)" in result.stdout


def test_disabled_extension_is_silent():
    code = """
        import warnings
        warnings.simplefilter("error")
        import gpavatar.ops as ops
        assert "cpu" not in ops.available_backends("cpu")
        print("ok")
    """
    result = run_python(code, GPAVATAR_DISABLE_EXT="1", TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr


def test_import_does_not_load_the_triton_kernels():
    code = """
        import sys, gpavatar, gpavatar.model
        # Triton kernels load on first use only.
        assert "gpavatar.kernels.knn" not in sys.modules and "gpavatar.kernels.knn_blend" not in sys.modules
        print("ok")
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_backend_environment_variable(monkeypatch):
    pts, q = make_points(1, 30), make_queries(1, 10)
    monkeypatch.setenv("GPAVATAR_BACKEND", "cuda")  # honoured: CPU tensors can't use it
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        ops.knn(q, pts, 3)
    monkeypatch.setenv("GPAVATAR_BACKEND", "torch")
    assert ops.knn(q.double(), pts.double(), 3).dist2.dtype == torch.float64  # only the reference keeps float64
    monkeypatch.setenv("GPAVATAR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.knn(q, pts, 3)
    # The argument wins over the environment.
    assert ops.knn(q.double(), pts.double(), 3, backend="torch").dist2.dtype == torch.float64


def test_auto_backend_on_cpu_prefers_the_extension():
    from gpavatar import _extension

    expected = "cpu" if _extension.available() else "torch"
    assert ops.available_backends("cpu")[0] == expected


@pytest.mark.skipif(os.environ.get("FORCE_CUDA") != "1", reason="only when the build was asked to include CUDA")
def test_forced_cuda_build_has_the_cuda_kernels():
    """CI builds with FORCE_CUDA=1 on a machine without a GPU: the CUDA kernels are in the extension."""
    from gpavatar import _extension

    assert _extension.has_cuda()
    for op in ("knn", "knn_blend_forward", "knn_blend_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpavatar::{op}", "CUDA"), op
