"""benchmarks/profile_frame.py: kernel names land in the frame's parts, and one CPU run of the
tiny preset writes a profile whose groups add up to its total."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_frame  # noqa: E402


@pytest.mark.parametrize("name,group", [
    ("void gpavatar::knn::(anonymous namespace)::search_kernel<8, false, 1, 256, false>(float co", "knn"),
    ("gpavatar::knn", "knn"),
    ("gpavatar::knn_blend::(anonymous namespace)::tiles_forward_kernel(gpavatar::knn_blend::Blen", "pef blend"),
    ("gpavatar::knn_blend_forward", "pef blend"),
    ("_blend_stacked_fwd_kernel", "pef blend"),
    ("_layers_fwd_kernel", "field layers"),
    ("void gpavatar::triplane::(anonymous namespace)::forward_kernel<32>(float const*", "triplane"),
    ("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize32x32x8_stage3", "matrix products"),
    ("aten::addmm", "matrix products"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true>", "convolutions"),
    ("Memcpy DtoH (Device -> Pinned)", "copies / casts"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AbsFunctor<float>", "elementwise"),
    ("aten::leaky_relu", "elementwise"),
    ("something new", "other"),
])
def test_kernel_groups(name, group):
    assert profile_frame.group_of(name) == group


def test_cpu_profile_adds_up(tmp_path):
    pytest.importorskip("gpavatar.ops")
    out = tmp_path / "frame.json"
    assert profile_frame.main(["--device", "cpu", "--modes", "fast", "--top", "5", "--json", str(out)]) == 0
    mode = json.loads(out.read_text())["modes"]["fast"]
    assert mode["total_ms"] > 0
    assert abs(sum(g["ms"] for g in mode["groups"].values()) - mode["total_ms"]) < 1e-6 * mode["total_ms"] + 1e-9
    assert {"knn", "pef blend", "convolutions"} <= set(mode["groups"])
    # the unprofiled call's time and the number of operator calls (kernel launches on a GPU)
    assert mode["wall_ms"] > 0 and mode["launches"] == sum(g["calls"] for g in mode["groups"].values()) > 10
    with pytest.raises(SystemExit):
        profile_frame.main(["--device", "cpu", "--modes", "fast", "--preset", "nope"])


def test_cpu_opt_ins_mode(tmp_path, monkeypatch):
    """"fast+opt-ins" profiles the fast frame with the opt-in kernels' switches set for the frame only."""
    pytest.importorskip("gpavatar.ops")
    monkeypatch.delenv("GPAVATAR_FIELD_LAYERS", raising=False)
    out = tmp_path / "frame.json"
    assert profile_frame.main(["--device", "cpu", "--modes", "fast+opt-ins", "--top", "5", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["modes"]["fast+opt-ins"]["total_ms"] > 0
    assert "GPAVATAR_FIELD_LAYERS" not in os.environ


def test_cpu_tuned_mode_names_its_settings(tmp_path):
    """fp32+tuned: the settings a tuning renderer chose (on the CPU: the defaults) are in the report."""
    out, md = tmp_path / "p.json", tmp_path / "p.md"
    assert profile_frame.main(["--device", "cpu", "--modes", "fp32+tuned", "--top", "5", "--json", str(out),
                               "--markdown", str(md)]) == 0
    mode = json.loads(out.read_text())["modes"]["fp32+tuned"]
    assert mode["total_ms"] > 0 and mode["settings"] == {}
    assert "tuned settings: the defaults" in md.read_text()


def test_cpu_training_step_profile(tmp_path):
    pytest.importorskip("gpavatar.ops")
    out = tmp_path / "train.json"
    assert profile_frame.main(["--device", "cpu", "--train", "--top", "3", "--json", str(out)]) == 0
    groups = json.loads(out.read_text())["modes"]["train"]["groups"]
    assert {"optimizer", "convolutions", "pef blend", "knn"} <= set(groups)
