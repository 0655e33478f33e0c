"""pytest-benchmark cases for one field pass (``bench_field``), plus smoke runs of the script.

Run with ``pytest benchmarks/ --benchmark-only`` for the timings.  CUDA cases (``small`` size:
N = 16384 samples, P = 1024) time the unfused pass and the fused pass in each precision and are
skipped without a GPU; there is no CPU timing case (the fused kernel runs on the CPU only under
the Triton interpreter, whose timings mean nothing).  These are timings, not tests of
correctness -- the package's own suite lives in ``tests/`` (``tests/test_field_query.py``);
``test_script_smoke`` checks that the script runs on the CPU and skips the fused rows cleanly
(or runs them, when the interpreter is already on), ``test_script_interpreter`` runs the fused
rows under ``TRITON_INTERPRET=1`` in a subprocess and checks them against the unfused pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_field import PRECISIONS, SIZES, main, make_case_fn, make_inputs  # noqa: E402

pytest.importorskip("gpavatar.ops")
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["unfused fp32"] + [f"fused {p}" for p in PRECISIONS]


@pytest.fixture(scope="module")
def cuda_inputs():
    return make_inputs(**SIZES["small"], device="cuda", seed=0)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda(benchmark, request, variant):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    benchmark.group = f"cuda field pass N={SIZES['small']['N']} P={SIZES['small']['P']}"
    fn = make_case_fn("pass", variant, request.getfixturevalue("cuda_inputs"))

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=3)


def _check_payload(payload: dict, fused_ran: bool) -> None:
    assert payload["benchmark"] == "field" and not payload["partial"] and payload["error"] is None
    rows = payload["rows"]
    assert [(r["case"], r["variant"]) for r in rows[:2]] == [("pass", "unfused fp32"), ("knn", "knn")]
    for r in rows:
        assert r["error"] is None and r["correct"] in (True, None), r
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] is not None
    fused = [r for r in rows if r["variant"].startswith("fused")]
    if fused_ran:
        assert {r["case"] for r in fused} == {"pass", "kernel"} and all(r["max_err"] is not None for r in fused)
        assert rows[0]["speedup_vs_fp32"] == 1.0 and all(r["speedup_vs_best"] for r in fused)
    else:
        assert not fused and payload["skipped"]


def test_script_smoke(tmp_path):
    """In this process: the unfused rows, and the fused ones only if the interpreter is on."""
    from gpavatar.ops import _backend

    path, md = tmp_path / "field.json", tmp_path / "field.md"
    rc = main(["--device", "cpu", "--size", "tiny", "--precisions", "ieee", "--repeats", "1", "--min-repeats", "1",
               "--max-seconds", "0.1", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    _check_payload(json.loads(path.read_text()), fused_ran=_backend.triton_interpreted())
    assert "field pass" in md.read_text()


def test_script_interpreter(tmp_path):
    """A subprocess under TRITON_INTERPRET=1: fused rows (ieee, bf16) run and pass their checks."""
    pytest.importorskip("triton")
    path = tmp_path / "field.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(HERE, "bench_field.py"), "--device", "cpu", "--size", "tiny",
           "--precisions", "ieee,bf16", "--repeats", "1", "--min-repeats", "1", "--max-seconds", "0.1",
           "--json", str(path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(path.read_text())
    _check_payload(payload, fused_ran=True)
    assert {r["variant"] for r in payload["rows"]} == {"unfused fp32", "knn", "fused ieee", "fused bf16", "layers ieee",
                                                       "layers bf16", "torch fp32", "torch bf16"}
    assert {(r["case"], r["variant"]) for r in payload["rows"] if r["variant"].startswith("layers")} == {
        ("pass", "layers ieee"), ("pass", "layers bf16"), ("layers", "layers ieee"), ("layers", "layers bf16")}
