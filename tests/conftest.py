"""Shared test setup.

* Triton kernels run on CPU tensors through the interpreter when no GPU is
  present (TRITON_INTERPRET must be set before triton compiles anything).
* ``requires_cuda`` / the ``cuda`` marker: skipped without a GPU.
* ``BACKEND_CASES``: every (device, backend) pair of fused kernels available
  on this machine, for parametrizing kernel-vs-reference tests.
* ``CUDA_SEARCHES``: the CUDA KNN's list scans (GPAVATAR_KNN_CUDA_SEARCH), which the CPU
  also runs on the CUDA layout of the lists (GPAVATAR_KNN_LAYOUT=cuda).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

import gpavatar.ops as ops  # noqa: E402

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def backend_cases():
    """pytest params (device, backend) for every fused backend usable here."""
    cases = []
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for name in ops.available_backends(device):
            if name == "torch":
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            cases.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return cases


BACKEND_CASES = backend_cases()
CUDA_SEARCHES = ["banded", "unrolled", "buffered", "grouped"]


def pytest_runtest_logreport(report):
    """With ``$GPAVATAR_INSTAFAIL`` set, a failure's traceback is written as it happens (pytest writes
    them at the end of the session, which a device run cut by its time limit never reaches)."""
    if report.failed and os.environ.get("GPAVATAR_INSTAFAIL"):
        import sys

        sys.stderr.write(f"\n[instafail] {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
        sys.stderr.flush()
