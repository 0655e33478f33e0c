"""pytest-benchmark cases for the end-to-end ``GPAvatar.render`` (random weights).

Run with ``pytest benchmarks/ --benchmark-only``.  The model is the ``tiny`` preset
(16x16 rays, 8 + 8 samples, 64x64 output), B = 1, so the CPU cases take a few seconds on
2 cores.  CPU cases are parametrized over the baseline ``torch-fast`` (the official-style path,
``_baselines``) and the ``cpu`` backend; CUDA cases (``paper`` preset) over ``torch-fast``,
``cuda`` and ``triton`` and are skipped without a GPU or when a backend is not available.
The cases are the script's ``CASES`` in fp32 (the whole render, the real-time path and the
breakdown) plus ``render`` in the ``fast`` mode (bf16 autocast + TF32) and ``realtime`` in its fast mode
(bf16 super-resolution); ``realtime`` runs the fused backends only (skipped for the baseline); a backend
that raises on its first call is reported as an xfail with the error (the script records the same error
in its row).
These are timings, not tests of correctness -- the package's own suite lives in ``tests/``;
``test_script_smoke`` only checks that the benchmark script runs end to end and writes a
well-formed JSON / markdown (``test_script_realtime_rows``: the realtime rows, their extra batch size
and stage breakdown), ``test_breakdown_inputs`` that the breakdown cases replay the
captured render, ``test_torch_fast_path_matches_reference`` that the baseline row
renders what the reference ops render.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import (BASELINES, CASES, backend_unavailable, capture, head_points, main,  # noqa: E402
                       make_case_fn, make_inputs, make_model, use_backend)

ops = pytest.importorskip("gpavatar.ops")

CPU_BACKENDS = ("torch-fast", "cpu")
CUDA_BACKENDS = ("torch-fast", "cuda", "triton")
VARIANTS = [(case, "fp32") for case in CASES] + [("render", "fast"), ("realtime", "fast")]


def _backends(device: torch.device) -> list[str]:
    try:
        return list(ops.available_backends(device))
    except Exception:
        return ["torch"]


def _setup(device: str, preset: str) -> dict:
    dev = torch.device(device)
    model = make_model(preset, dev, seed=0)
    inp = make_inputs(model, 1, dev, seed=0)
    fused = [b for b in _backends(dev) if b not in ("torch", "triton")]
    cap = capture(model, inp, (fused or ["torch"])[0])
    return dict(model=model, inp=inp, cap=cap, preset=preset)


@pytest.fixture(scope="module")
def cpu_setup():
    return _setup("cpu", "tiny")


@pytest.fixture(scope="module")
def cuda_setup():
    return _setup("cuda", "paper")


def _case_fn(setup: dict, case: str, backend: str, mode: str, device: torch.device):
    if backend_unavailable(backend, device) or (backend == "triton" and device.type != "cuda"):
        pytest.skip(f"backend {backend!r} not available on {device.type}")
    if case == "realtime" and backend in BASELINES:
        pytest.skip("the realtime case runs the fused backends only")
    fn = make_case_fn(case, backend, mode, setup["model"], setup["inp"], setup["cap"])
    try:
        fn()
    except Exception as exc:
        pytest.xfail(f"{case} / {backend} / {mode}: {type(exc).__name__}: {exc}"[:300])
    return fn


def _group(device: str, preset: str, case: str, mode: str) -> str:
    return f"{device} e2e {preset} B=1 {case} {mode}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,mode", VARIANTS)
def test_cpu(benchmark, cpu_setup, case, mode, backend):
    fn = _case_fn(cpu_setup, case, backend, mode, torch.device("cpu"))
    benchmark.group = _group("cpu", cpu_setup["preset"], case, mode)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case,mode", VARIANTS)
def test_cuda(benchmark, request, case, mode, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    setup = request.getfixturevalue("cuda_setup")
    fn = _case_fn(setup, case, backend, mode, torch.device("cuda"))
    benchmark.group = _group("cuda", setup["preset"], case, mode)

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)


def test_row_variants():
    """Realtime variant suffixes stack and strip; baseline names (with '-') are not split."""
    from bench_e2e import base_backend, has_variant

    assert base_backend("cuda+layers+bf16field+upsample") == "cuda" and base_backend("torch-fast") == "torch-fast"
    assert has_variant("cuda+layers+bf16field", "+layers") and has_variant("cuda+layers+bf16field", "+bf16field")
    assert not has_variant("cuda+fused", "+layers") and not has_variant("cuda", "+fused")


def test_head_points_in_box():
    """Both point sources are FLAME-sized clouds inside the render box."""
    for source in ("procedural", "random"):
        pts, kind = head_points(5023, source)
        assert pts.shape == (5023, 3) and kind in ("procedural", "random")
        assert bool(pts.abs().max() < 1) and float(pts.abs().max()) > 0.3


def test_breakdown_inputs(cpu_setup):
    """rays+sampling and compositing replay the captured render: same fine image."""
    backend = "cpu" if "cpu" in _backends(torch.device("cpu")) else "torch"
    cap = cpu_setup["cap"]
    out = make_case_fn("rays+sampling", backend, "fp32", cpu_setup["model"], cpu_setup["inp"], cap)()
    torch.testing.assert_close(out["fine"], cap["fine_image"], atol=1e-5, rtol=1e-4)
    color = make_case_fn("compositing", backend, "fp32", cpu_setup["model"], cpu_setup["inp"], cap)()[0]
    B, C, R, _ = cap["fine_image"].shape
    torch.testing.assert_close(color.reshape(B, R, R, C).permute(0, 3, 1, 2), cap["fine_image"],
                               atol=1e-5, rtol=1e-4)


def test_script_smoke(tmp_path):
    """The CLI runs end to end on the CPU (tiny preset) and writes well-formed JSON and markdown."""
    path, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    rc = main(["--device", "cpu", "--preset", "tiny", "--batch", "1", "--backends", "torch-fast,cpu",
               "--modes", "fp32,fast", "--cases", "render,compositing", "--repeats", "1",
               "--max-seconds", "0.5", "--min-repeats", "1", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "e2e" and not payload["partial"] and payload["error"] is None
    assert payload["config"]["preset"] == "tiny" and payload["env"]["torch"] == torch.__version__
    rows = payload["rows"]
    assert [(r["case"], r["mode"], r["backend"]) for r in rows] == [
        ("render", "fp32", "torch-fast"), ("render", "fp32", "cpu"), ("render", "fast", "torch-fast"),
        ("render", "fast", "cpu"), ("compositing", "fp32", "torch-fast"), ("compositing", "fp32", "cpu")]
    for r in rows:
        if r["backend"] == "torch-fast":
            assert r["error"] is None, r
            assert r["speedup_vs_best"] == 1.0 and r["best_baseline"] == "torch-fast"
        if r["error"] is None:
            assert r["median_ms"] > 0 and math.isclose(r["fps"], r["B"] * 1e3 / r["median_ms"])
        if r["case"] == "render" and r["mode"] == "fast" and r["error"] is None:
            assert r["psnr_vs_fp32"] > 20, r
        if r["case"] == "render" and r["backend"] == "cpu" and r["mode"] == "fp32" and r["error"] is None:
            assert r["psnr_vs_baseline"] > 60, r
    assert "| render" in md.read_text()


def test_script_realtime_rows(tmp_path):
    """--cases realtime: one row per (B, mode) for the fused backend, the extra --realtime-batch B after
    the --batch ones, each with its stage breakdown; PSNR of the fast row against the fp32 row."""
    if "cpu" not in _backends(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    path, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    rc = main(["--device", "cpu", "--preset", "tiny", "--batch", "1", "--realtime-batch", "2", "--backends",
               "torch-fast,cpu", "--modes", "fp32,fast", "--cases", "render,realtime", "--repeats", "1",
               "--max-seconds", "0.5", "--min-repeats", "1", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["config"]["realtime_Bs"] == [2]
    rows = [r for r in payload["rows"] if r["case"] == "realtime"]
    assert [(r["B"], r["mode"], r["backend"]) for r in rows] == [(1, "fp32", "cpu"), (1, "fast", "cpu"),
                                                                  (2, "fp32", "cpu"), (2, "fast", "cpu")]
    for r in rows:
        assert r["error"] is None, r
        assert set(r["stages_ms"]) == {"rays", "field pass 1", "field pass 2", "compositing", "super-resolution",
                                       "frame"}
        assert all(v >= 0 for v in r["stages_ms"].values())
        if r["mode"] == "fast":
            assert r["psnr_vs_fp32"] > 35, r
    b1 = [r for r in rows if r["B"] == 1]
    assert b1[0]["psnr_vs_baseline"] > 60 and b1[0]["best_baseline"] == "torch-fast"
    assert "realtime stage breakdown" in md.read_text()


def test_torch_fast_path_matches_reference(cpu_setup):
    """The torch-fast row's render (PEF from _baselines) equals the reference ops' render: the
    baseline computes the same thing, only faster; the PEF patch is undone on exit."""
    model, inp = cpu_setup["model"], cpu_setup["inp"]
    fast = make_case_fn("render", "torch-fast", "fp32", model, inp)()
    assert "query" not in vars(model.nerf_mlp.points_querier)
    ref = make_case_fn("render", "torch", "fp32", model, inp)()
    torch.testing.assert_close(fast["image"], ref["image"], atol=1e-4, rtol=1e-4)
    with use_backend(model, "torch-fast"):
        assert "query" in vars(model.nerf_mlp.points_querier)
    assert "query" not in vars(model.nerf_mlp.points_querier)


def test_realtime_variants_parse_and_refuse_unknown_suffixes():
    from bench_e2e import realtime_variants

    assert realtime_variants("") == []
    assert realtime_variants("layers, compile+share ,share") == ["+layers", "+compile+share", "+share"]
    with pytest.raises(ValueError, match="unknown realtime variant 'compile\\+fast'"):
        realtime_variants("layers,compile+fast")


def test_tuned_realtime_row_lists_its_trials(cpu_setup):
    """A "+tune" realtime row carries the renderer's trials (fp32 on the CPU: only the base frame, every
    built-in fp32 setting being a GPU switch) and the report prints them."""
    if "cpu" not in _backends(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    from bench_e2e import render_markdown, run_row

    row = run_row("realtime", "cpu+tune", "fp32", cpu_setup["model"], cpu_setup["inp"], torch.device("cpu"),
                  repeats=1, warmup=0, max_seconds=0.5, min_repeats=1)
    assert row["error"] is None, row
    assert [(t["settings"], t["status"], t["chosen"]) for t in row["tuning"]] == [({}, "base", True)]
    from bench_e2e import preset_sizes

    config = dict(preset="tiny", device="cpu", Bs=[1], realtime_Bs=[], modes=["fp32"], points="procedural",
                  query_chunk=0, **preset_sizes("tiny"))
    md = render_markdown({"config": config, "env": {}, "rows": [row]})
    assert "realtime tuning" in md and "| (untuned)" in md and "base (chosen)" in md
    assert row["tune_s"] > 0 and "(the tuning took " in md


def test_realtime_variants_are_renderer_settings(cpu_setup):
    """A variant's kernel switches are the renderer's settings (applied to its frames and its stage
    breakdown); fast-only ones stay off in the fp32 frame."""
    if "cpu" not in _backends(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    from bench_e2e import realtime_fn, realtime_variants

    model, inp = cpu_setup["model"], cpu_setup["inp"]
    assert realtime_fn(model, inp, "cpu+share+g24+tc", "fp32").realtime.settings == {"knn_share": "1",
                                                                                     "knn_cells": "24"}
    assert realtime_fn(model, inp, "cpu+tc+bf16field+upsample", "fast").realtime.settings == {
        "blend_tensor_cores": "1", "field_bf16": True, "upsample": "triton"}
    assert "GPAVATAR_KNN_SHARE" not in os.environ
    # +plain: the device defaults turned off (their off values given); +compilesr: the network alone compiled
    assert realtime_fn(model, inp, "cpu+plain", "fast").realtime.settings == {
        "knn_share": "0", "knn_order": "box", "field_layers": "torch", "upsample": "torch"}
    assert realtime_fn(model, inp, "cpu+plain", "fp32").realtime.settings == {"knn_share": "0", "knn_order": "box"}
    assert realtime_variants("plain,compilesr+share") == ["+plain", "+compilesr+share"]
