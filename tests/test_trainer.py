"""The training loop on a small synthetic dataset with the tiny model: steps run and learn,
resuming is exact, checkpoints are atomic, the CLI works, and two processes (torchrun, gloo)
train together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpavatar import cli
from gpavatar.data.official import OfficialDataset, dataset_flame
from gpavatar.data.synthetic import make_synthetic_dataset
from gpavatar.model import GPAvatar
from gpavatar.train.trainer import Trainer, TrainConfig, epoch_batches

SMALL = dict(render_size=8, n_coarse=6, n_fine=6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_identities=4, frames_per_identity=4, size=64, samples=1)
    return root


def dataset(root, seed=0):
    return OfficialDataset(root, "train", n_sources=2, resize=64, flame=dataset_flame(str(root), 5.0), seed=seed)


def trainer(root, out, steps=4, **kw):
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=2, log_every=1, save_every=2, **kw)
    return Trainer(GPAvatar("tiny", **SMALL), dataset(root), out, config, device="cpu")


def test_epoch_batches_cover_each_process_share_once():
    all_batches = [epoch_batches(11, 2, epoch=3, seed=5, rank=r, world=2) for r in range(2)]
    flat = [i for batches in all_batches for b in batches for i in b]
    assert all(len(b) == 2 for batches in all_batches for b in batches)
    assert len(flat) == len(set(flat)) == 8  # 11 // 2 = 5 per process -> 2 full batches each
    assert epoch_batches(11, 2, 3, 5) == epoch_batches(11, 2, 3, 5) != epoch_batches(11, 2, 4, 5)


def test_training_steps_log_and_save(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, steps=3)
    last = t.fit(progress=False)
    assert t.step == 3 and torch.isfinite(torch.tensor(last["total"]))
    for key in ("img_loss", "percep_loss", "box_loss", "density_loss", "total"):
        assert key in last
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["lr"] == pytest.approx(1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "log.jsonl"]  # no temporary files
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["model_config"]["render_size"] == 8


def test_training_reduces_the_loss_on_one_batch(data_dir, tmp_path):
    """A few steps on the same batch lower its image loss (the gradients point the right way)."""
    t = trainer(data_dir, tmp_path, steps=1, lr=1e-3)
    batch = next(t.batches())
    t.model.config = t.model.config.replace(single_source_prob=0.0)
    losses = [t.train_step(batch)["img_loss"] for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_resume_continues_exactly(data_dir, tmp_path):
    straight = trainer(data_dir, tmp_path / "a", steps=4)
    straight.fit(progress=False)
    first = trainer(data_dir, tmp_path / "b", steps=4)
    first.fit(steps=2, progress=False)
    resumed = trainer(data_dir, tmp_path / "b", steps=4)
    assert resumed.load() and resumed.step == 2
    resumed.fit(progress=False)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()


def test_resume_refuses_another_model(data_dir, tmp_path):
    trainer(data_dir, tmp_path, steps=1).fit(progress=False)
    other = Trainer(GPAvatar("tiny", **{**SMALL, "render_size": 12}), dataset(data_dir), tmp_path,
                    TrainConfig(steps=1), device="cpu")
    with pytest.raises(ValueError, match=r"different model config \(fields \['render_size'\]\)"):
        other.load()


def test_non_finite_loss_stops_training(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, steps=1)
    with torch.no_grad():
        t.model.nerf_mlp.rgb_layers[2].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        t.fit(progress=False)


def test_bf16_autocast_step(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, steps=1, amp="bf16")
    assert torch.isfinite(torch.tensor(t.fit(progress=False)["total"]))


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(amp="fp8")


def test_train_command_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(data_dir), str(out), "--steps", "2", "--batch-size", "2", "--log-every", "1",
            "--save-every", "1"]
    assert cli.main(args) == 0
    assert "from scratch" in capsys.readouterr().out
    assert cli.main(args[:4] + ["3"] + args[5:]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    model = GPAvatar.from_pretrained(out / "pretrained")
    assert model.config.render_size == 16  # the tiny preset


@pytest.mark.slow
def test_two_processes_with_torchrun(data_dir, tmp_path):
    """DDP on CPU (gloo): two processes, each its share of the data, gradients averaged."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "gpavatar.cli", "train", str(data_dir), str(out), "--steps", "2", "--batch-size", "1",
           "--log-every", "1", "--save-every", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2
