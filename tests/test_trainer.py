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


# -- issue 13: no lost training (in-process checks; the signal / kill / cross-process ones are in
# tests/test_train_processes.py) --------------------------------------------------------------------------


class FailingDataset(torch.utils.data.Dataset):
    """The dataset, but item number ``fail_at`` (counting every fetch from 0) raises OSError."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __getitem__(self, index):
        self.calls += 1
        if self.calls > self.fail_at:
            raise OSError("the data disk went away")
        return self.inner[index]


def test_output_folder_is_checked_before_training(data_dir, tmp_path):
    with pytest.raises(OSError, match="output folder /proc/run") as error:
        trainer(data_dir, "/proc/run", steps=3)
    from gpavatar.train.run_folder import OutputFolderError

    assert isinstance(error.value, OutputFolderError)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match="a_file exists and is not a folder"):
        trainer(data_dir, tmp_path / "a_file", steps=3)
    t = trainer(data_dir, tmp_path / "new" / "run", steps=1)  # created, nothing left in it
    assert t.out_dir.is_dir() and list(t.out_dir.iterdir()) == []


def test_an_error_during_training_saves_first(data_dir, tmp_path):
    config = TrainConfig(steps=10, batch_size=2, log_every=1, save_every=100)
    torch.manual_seed(0)
    t = Trainer(GPAvatar("tiny", **SMALL), FailingDataset(dataset(data_dir), fail_at=6), tmp_path, config,
                device="cpu")
    with pytest.raises(OSError, match="the data disk went away"):
        t.fit(progress=False)
    assert t.step == 3 and torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert "saved" in t.failure_note
    resumed = trainer(data_dir, tmp_path, steps=4)
    assert resumed.load() and resumed.step == 3


def test_non_finite_parameters_are_not_saved_over_a_good_checkpoint(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, steps=4)
    t.fit(steps=2, progress=False)
    t.train_step(next(t.batches()))  # step 3, not saved
    assert (t.step, t.saved_step) == (3, 2)
    with torch.no_grad():
        t.model.nerf_mlp.rgb_layers[2].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        t.fit(progress=False)
    assert "not finite" in t.failure_note and "holds step 2" in t.failure_note
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def test_interrupt_request_stops_after_the_step_and_saves(data_dir, tmp_path):
    """What SIGINT does, in-process: the handler only flags; the loop saves and returns."""
    import signal

    def unhandled(signum, frame):  # what the test sees if fit() does not take SIGINT over
        raise RuntimeError("SIGINT reached the test's handler")

    t = trainer(data_dir, tmp_path, steps=50)  # saves every 2 steps
    original, previous = t.train_step, signal.signal(signal.SIGINT, unhandled)

    def step_then_signal(batch):
        out = original(batch)
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    t.train_step = step_then_signal
    try:
        t.fit(progress=False)
        assert signal.getsignal(signal.SIGINT) is unhandled  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert t.step == 3 and t.stopped_by.signal_name == "SIGINT" and t.stopped_by.exit_code == 130
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3


def test_save_every_minutes(data_dir, tmp_path):
    saves = []
    for minutes, expected in ((1e-9, [1, 2, 3]), (0.0, [3])):
        torch.manual_seed(0)
        config = TrainConfig(steps=3, batch_size=2, log_every=1, save_every=100, save_minutes=minutes)
        t = Trainer(GPAvatar("tiny", **SMALL), dataset(data_dir), tmp_path / str(minutes), config, device="cpu")
        original, saves = t.save, []
        t.save = lambda path=None: saves.append(t.step) or original(path)
        t.fit(progress=False)
        assert saves == expected, minutes


def test_truncated_checkpoint_says_no_resume(data_dir, tmp_path):
    from gpavatar.model.checkpoint import CheckpointError

    trainer(data_dir, tmp_path, steps=1).fit(progress=False)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last.pt cannot be read .*--no-resume"):
        trainer(data_dir, tmp_path, steps=2).load()
    torch.save({"step": 3}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"not a gpavatar training checkpoint.*--no-resume"):
        trainer(data_dir, tmp_path, steps=2).load()


def test_old_checkpoint_without_the_perceptual_trunk_resumes_with_a_note(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, steps=1)
    t.fit(progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["loss"], state["train_config"]["save_minutes"]
    torch.save({**state, "format": "gpavatar-train-1"}, tmp_path / "last.pt")
    old = trainer(data_dir, tmp_path, steps=2)
    assert old.load() and old.step == 1
    assert "predates stored perceptual networks" in old.resume_notes[0]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import errno

    t = trainer(data_dir, tmp_path, steps=4)
    t.fit(steps=2, progress=False)  # last.pt at step 2
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*last.pt at step 4: No space left on device "
                                      r"\(the previous file is intact\)"):
        t.fit(progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "log.jsonl"]  # no temporary file left


def test_resume_applies_a_new_lr_and_milestones(data_dir, tmp_path):
    """Resuming with lr 2e-4 and a decay at step 3 == having trained with them from the start
    (the learning rates, bitwise); the change is reported."""
    trainer(data_dir, tmp_path / "a", steps=2).fit(progress=False)  # lr 1e-4, official milestones
    resumed = trainer(data_dir, tmp_path / "a", steps=4, lr=2e-4, milestones=(3,))
    assert resumed.load()
    straight = trainer(data_dir, tmp_path / "b", steps=4, lr=2e-4, milestones=(3,))
    for stop in (2, 3, 4):
        straight.fit(steps=stop, progress=False)
        if stop > 2:
            resumed.fit(steps=stop, progress=False)
        assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in straight.optimizer.param_groups]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [2e-4 * 0.1 * 0.2, 2e-4 * 0.2, 2e-4 * 0.2]
    notes = "\n".join(resumed.resume_notes)
    assert "normal 0.0001 -> 0.0002" in notes and "mapping 1e-05 -> 2e-05" in notes
    assert "milestones [130000, 160000] -> [3]" in notes
    # a milestone already passed at the resumed step decays the rate at once
    late = trainer(data_dir, tmp_path / "a", steps=5, milestones=(1,))
    assert late.load() and late.step == 4
    assert [g["lr"] for g in late.optimizer.param_groups] == [1e-4 * 0.1 * 0.2, 1e-4 * 0.2, 1e-4 * 0.2]
    assert late.scheduler.state_dict()["milestones"] == {1: 1}
    # nothing changed: nothing touched, nothing reported
    same = trainer(data_dir, tmp_path / "a", steps=5, lr=2e-4, milestones=(3,))
    assert same.load() and same.resume_notes == []


def test_log_is_cut_back_to_the_resumed_step(tmp_path):
    from gpavatar.train.run_folder import prepare_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, "lo')
    assert "dropped 2 line(s)" in prepare_log(log, 4)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert prepare_log(log, 4) is None
    assert "log.jsonl.bak" in prepare_log(log, 0)  # a run from scratch starts a new log
    assert not log.exists() and (tmp_path / "log.jsonl.bak").is_file()


def test_seed_decides_the_model_and_the_perceptual_trunk():
    from gpavatar.train.losses import GPAvatarLoss
    from gpavatar.train.trainer import build_model

    a, b, c = (build_model("tiny", seed, **SMALL).state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["query_style_tplane"], c["query_style_tplane"])
    before = torch.random.get_rng_state()
    x, y = GPAvatarLoss(crop_size=32, seed=5), GPAvatarLoss(crop_size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())


def test_train_defaults_and_help(capsys):
    import argparse

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.dest not in ("help", "model_config", "no_resume"):
            assert "default" in (action.help or ""), action.option_strings
    from gpavatar.train.command import resolve_options

    names = ("steps", "batch_size", "lr", "milestones", "amp", "workers", "seed", "log_every", "save_every",
             "save_minutes")
    nothing = argparse.Namespace(**dict.fromkeys(names))
    values, origin, _ = resolve_options(nothing, None, paper_sized=False)
    assert values["steps"] == 4000 and values["save_every"] == 400 and origin["steps"] == "default"
    assert values["save_minutes"] == 10.0 and values["lr"] == 1e-4 and values["milestones"] == (130_000, 160_000)
    values, _, _ = resolve_options(nothing, None, paper_sized=True)
    assert values["steps"] == 205_000 and values["save_every"] == 5000
    # resuming: the saved run's values unless given again; changes listed
    saved = {**values, "steps": 300, "lr": 3e-4, "milestones": [200]}
    given = argparse.Namespace(**{**vars(nothing), "lr": 5e-4})
    values, origin, changes = resolve_options(given, saved, paper_sized=False)
    assert values["steps"] == 300 and values["milestones"] == (200,) and values["lr"] == 5e-4
    assert origin["steps"] == "resumed" and changes == ["lr 0.0003 -> 0.0005"]
    # the default save interval follows a new --steps; one given before is kept
    more = argparse.Namespace(**{**vars(nothing), "steps": 40_000})
    assert resolve_options(more, {"steps": 300, "save_every": 30}, False)[0]["save_every"] == 4000
    assert resolve_options(more, {"steps": 300, "save_every": 7}, False)[0]["save_every"] == 7


def test_train_command_reports_resume_changes_and_prints_lines(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(data_dir), str(out), "--steps", "2", "--log-every", "1", "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "step 1/2  loss" in captured.out and "%|" not in captured.err  # no bar without a terminal
    assert cli.main(args[:4] + ["3"] + args[5:] + ["--lr", "2e-4"]) == 0
    text = capsys.readouterr().out
    assert "resumed at step 2" in text and "changed on resume: steps 2 -> 3; lr 0.0001 -> 0.0002" in text
    assert "learning rate changed: mapping 1e-05 -> 2e-05" in text
    assert torch.load(out / "last.pt", weights_only=True)["train_config"]["lr"] == 2e-4
    assert cli.main(args[:4] + ["3"] + args[5:]) == 0  # rerun without --lr: keeps 2e-4, nothing to train
    text = capsys.readouterr().out
    assert "lr 0.0002" in text and "changed on resume" not in text and "nothing to train" in text


def test_train_module_examples():
    import doctest

    import gpavatar.train.interrupts as interrupts
    import gpavatar.train.run_folder as run_folder
    import gpavatar.train.train_config as train_config
    import gpavatar.train.trainer as trainer_module

    for module in (interrupts, run_folder, train_config, trainer_module):
        assert doctest.testmod(module).failed == 0, module.__name__
