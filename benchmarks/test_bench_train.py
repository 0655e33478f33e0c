"""pytest-benchmark cases for one training step (``bench_train.py``, random weights).

Run with ``pytest benchmarks/ --benchmark-only``.  CPU cases use the ``tiny`` preset (B = 1,
2 sources, MTA every step), parametrized over the baseline ``torch-fast`` (the official-style
path, ``_baselines``) and the ``cpu`` backend; CUDA cases (``paper`` preset) over ``torch-fast``,
``cuda`` and ``triton`` and are skipped without a GPU or when a backend is not available.  A
backend that raises on its first step is reported as an xfail with the error.  These are timings,
not tests of correctness -- the package's own suite lives in ``tests/``; ``test_script_smoke``
only checks that the script runs end to end, writes a well-formed JSON / markdown and that every
row's first step has the same loss (the rows train the same model).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import backend_unavailable, main, make_setup, make_step  # noqa: E402

ops = pytest.importorskip("gpavatar.ops")

CPU_BACKENDS = ("torch-fast", "cpu")
CUDA_BACKENDS = ("torch-fast", "cuda", "triton")


@pytest.fixture(scope="module")
def cpu_setup():
    return make_setup("tiny", torch.device("cpu"))


@pytest.fixture(scope="module")
def cuda_setup():
    return make_setup("paper", torch.device("cuda"))


def _step(setup: dict, backend: str, device: torch.device):
    if backend_unavailable(backend, device) or (backend == "triton" and device.type != "cuda"):
        pytest.skip(f"backend {backend!r} not available on {device.type}")
    step = make_step(setup, backend)
    try:
        step()
    except Exception as exc:
        pytest.xfail(f"train step / {backend}: {type(exc).__name__}: {exc}"[:300])
    return step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu(benchmark, cpu_setup, backend):
    step = _step(cpu_setup, backend, torch.device("cpu"))
    benchmark.group = "cpu train step tiny B=1 V=2"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda(benchmark, request, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    setup = request.getfixturevalue("cuda_setup")
    step = _step(setup, backend, torch.device("cuda"))
    benchmark.group = "cuda train step paper B=1 V=2"

    def synced():
        out = step()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)


def test_script_smoke(tmp_path):
    """The CLI runs end to end on the CPU (tiny preset) and writes well-formed JSON and markdown."""
    path, md = tmp_path / "train.json", tmp_path / "train.md"
    backends = "torch-fast,cpu" if "cpu" in ops.available_backends("cpu") else "torch-fast"
    rc = main(["--device", "cpu", "--preset", "tiny", "--backends", backends, "--repeats", "1",
               "--max-seconds", "0.5", "--min-repeats", "1", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "train" and not payload["partial"] and payload["error"] is None
    assert payload["config"]["preset"] == "tiny" and payload["config"]["sources"] == 2
    rows = payload["rows"]
    assert [r["backend"] for r in rows] == backends.split(",")
    for r in rows:
        assert r["error"] is None, r
        assert r["median_ms"] > 0 and math.isclose(r["steps_per_s"], 1e3 / r["median_ms"])
        assert math.isfinite(r["loss"])
        # same weights, same draws: the first step's loss agrees (up to the KNN / float summation order)
        assert r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert rows[0]["speedup_vs_best"] == 1.0 and rows[0]["best_baseline"] == "torch-fast"
    assert "| torch-fast" in md.read_text() and "saved MiB" in md.read_text()
    for r in rows:  # the activations kept for the backward, by top-level module
        assert r["saved_bytes"] > 0 and sum(r["saved_by_module"].values()) == r["saved_bytes"]
        assert {"style_tplane", "nerf_mlp", "up_renderer"} <= set(r["saved_by_module"])
    if len(rows) > 1:  # the fused backend recomputes (gpavatar.model.recompute), the baseline keeps everything;
        # at the tiny preset the StyleUNets' maps and weights are under RECOMPUTE_MIN_BYTES and kept, the MTA
        # chunks and the fine composite's merged values are recomputed whatever their size
        fused, baseline = rows[1]["saved_by_module"], rows[0]["saved_by_module"]
        assert fused["attn_module"] < baseline["attn_module"] and fused["renderer"] < baseline["renderer"]
        assert rows[1]["saved_bytes"] < rows[0]["saved_bytes"]


def test_pass_form_variants(cpu_setup, monkeypatch):
    """+segmented / +checkpoint set PointsDecoder.segmented for the row's step only (restored after);
    together, or with +graph, they are refused."""
    from bench_train import pass_form

    assert [pass_form(b) for b in ("cpu", "cpu+segmented", "cuda+bf16+checkpoint")] == [None, True, False]
    with pytest.raises(ValueError, match="exclude each other"):
        pass_form("cpu+segmented+checkpoint")
    with pytest.raises(ValueError, match="unknown row variant"):
        make_step(cpu_setup, "cpu+segments")
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("no cpu backend")
    model = cpu_setup["model"]
    seen = []
    original = model.forward_train

    def spy(*args, **kwargs):
        seen.append(model.nerf_mlp.segmented)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_train", spy)
    for backend in ("cpu", "cpu+segmented", "cpu+checkpoint"):
        make_step(cpu_setup, backend)()
    assert seen == [None, True, False] and model.nerf_mlp.segmented is None


def test_bf16_rows_are_compared_with_the_bf16_baseline():
    """A +bf16 row's ratio is against the official-style path under the same autocast
    (torch-fast+bf16), an fp32 row's against torch-fast; without a bf16 baseline row, no ratio."""
    from bench_train import add_ratios

    def row(backend, ms):
        return dict(case="step", backend=backend, median_ms=ms, peak_mem_bytes=100, error=None)

    rows = [row("torch-fast", 300.0), row("torch-fast+bf16", 150.0), row("cuda", 100.0), row("cuda+bf16", 50.0)]
    add_ratios(rows)
    assert [(r["best_baseline"], r["speedup_vs_best"]) for r in rows] == [
        ("torch-fast", 1.0), ("torch-fast+bf16", 1.0), ("torch-fast", 3.0), ("torch-fast+bf16", 3.0)]
    rows = [row("torch-fast", 300.0), row("cuda+bf16", 50.0)]
    add_ratios(rows)
    assert rows[1]["best_baseline"] is None and rows[1]["speedup_vs_best"] is None
