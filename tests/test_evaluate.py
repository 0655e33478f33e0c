"""Official-style evaluation (PSNR / SSIM / L1 on a val split) and the ``gpavatar eval`` command."""

from __future__ import annotations

import pytest
import torch

from gpavatar import cli
from gpavatar.data.official import OfficialDataset, dataset_flame
from gpavatar.data.synthetic import make_synthetic_dataset
from gpavatar.eval.evaluate import evaluate
from gpavatar.model import GPAvatar


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_eval")
    make_synthetic_dataset(root, n_identities=3, frames_per_identity=3, size=64, samples=1)
    return root


def test_evaluate_is_deterministic_and_restores_the_model(data_dir):
    torch.manual_seed(0)
    model = GPAvatar("tiny", render_size=8).train()
    dataset = OfficialDataset(data_dir, "val", n_sources=2, resize=64, flame=dataset_flame(str(data_dir), 5.0))
    a = evaluate(model, dataset)
    b = evaluate(model, dataset, limit=2)
    assert a["samples"] == len(dataset) == 3 and b["samples"] == 2
    assert model.training and model.config.noise == "auto"  # restored
    assert 0 < a["psnr"] < 60 and -1 <= a["ssim"] <= 1 and 0 <= a["l1"] <= 1
    assert evaluate(model, dataset) == a


def test_eval_command_line(data_dir, tmp_path, capsys):
    GPAvatar("tiny", render_size=8).save_pretrained(tmp_path / "m")
    assert cli.main(["eval", str(data_dir), "--pretrained", str(tmp_path / "m"), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val: 1 samples") and "PSNR" in out and "SSIM" in out


def test_eval_writes_per_sample_metrics_and_a_grid(data_dir, tmp_path, capsys):
    import csv
    import json

    from PIL import Image

    GPAvatar("tiny", render_size=8).save_pretrained(tmp_path / "m")
    base = ["eval", str(data_dir), "--pretrained", str(tmp_path / "m"), "--limit", "2", "--no-progress"]
    assert cli.main(base + ["--per-sample", str(tmp_path / "m.csv"), "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "m.csv" in out and "g.png" in out
    with open(tmp_path / "m.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["key"] for r in rows] == ["img_000001_0", "img_000001_1"]
    assert rows[0]["sources"] == "img_000001_0;img_000001_2"  # first and last frame (official validation)
    assert all(0 < float(r["psnr"]) < 60 and -1 <= float(r["ssim"]) <= 1 for r in rows)
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (4 * 128, 2 * 128)  # 2 sources | target | prediction, one row per sample
    assert cli.main(base + ["--per-sample", str(tmp_path / "m.json")]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["split"] == "val" and data["summary"]["samples"] == 2 and len(data["samples"]) == 2
    assert abs(data["summary"]["psnr"] - sum(float(r["psnr"]) for r in rows) / 2) < 1e-3
    capsys.readouterr()
    assert cli.main(base + ["--per-sample", str(tmp_path / "m.txt")]) == 2  # refused before evaluating
    assert ".csv or .json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit"):
        evaluate(GPAvatar("tiny", render_size=8), [], limit=0)
