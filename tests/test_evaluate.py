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
