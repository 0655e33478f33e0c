"""``gpavatar train`` in separate processes (issue 13, "no lost training"): Ctrl-C and SIGTERM save
``last.pt`` and exit 130 / 143; ``kill -9`` between saves and ``--no-resume`` leave a log with each
step once, in order; an unwritable output folder fails before step 1; the same ``--seed`` gives the
same weights bitwise in two processes, and N steps straight == k steps + resume + N - k steps.

Every run uses the tiny preset shrunk further (8 px renders, 6 + 6 samples) on 4 training frames of
64 px with one thread, so a run is a couple of seconds, most of it importing torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpavatar
from gpavatar.data.synthetic import make_synthetic_dataset

ROOT = Path(gpavatar.__file__).resolve().parent.parent
SMALL_MODEL = {"preset": "tiny", "render_size": 8, "n_coarse": 6, "n_fine": 6}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
    str(ROOT), os.environ.get("PYTHONPATH")]))}
TIMEOUT = 300  # seconds; a run takes a few, more on a loaded machine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root / "data", n_identities=2, frames_per_identity=4, size=64, samples=1)
    (root / "small.json").write_text(json.dumps(SMALL_MODEL))
    return root


def command(data_dir, out, *options):
    return [sys.executable, "-m", "gpavatar.cli", "train", str(data_dir / "data"), str(out), "--model-config",
            str(data_dir / "small.json"), "--device", "cpu", "--log-every", "1", *map(str, options)]


def train(data_dir, out, *options) -> subprocess.CompletedProcess:
    run = subprocess.run(command(data_dir, out, *options), capture_output=True, text=True, timeout=TIMEOUT, env=ENV,
                         cwd=ROOT)
    return run


def logged_steps(out) -> list[int]:
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def start_and_wait(data_dir, out, until, *options) -> subprocess.Popen:
    """Start a long run; return once ``until(logged steps)`` holds (the process still running)."""
    process = subprocess.Popen(command(data_dir, out, *options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + TIMEOUT
    while not until(logged_steps(out)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out_text, err_text = process.communicate()
            pytest.fail(f"the run ended or stalled before the condition: {process.returncode}\n{err_text[-3000:]}")
        time.sleep(0.005)
    return process


def model_state(path) -> dict:
    state = torch.load(path, weights_only=True)
    return {**state["model"], **{"loss." + k: v for k, v in state.get("loss", {}).items()}}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_and_resumes(data_dir, tmp_path, signum):
    """README's ``gpavatar train ... --steps 4000`` + Ctrl-C lost everything: now the step finishes,
    last.pt is written, the exit status is 128 + the signal, and a rerun continues from there."""
    out = tmp_path / "run"
    process = start_and_wait(data_dir, out, lambda steps: len(steps) >= 2, "--steps", "5000", "--save-every", "5000")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert step >= 2 and logged_steps(out) == list(range(1, step + 1))
    resumed = train(data_dir, out, "--steps", step + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step + 2
    assert logged_steps(out) == list(range(1, step + 3))


def test_kill_between_saves_and_no_resume_keep_the_log_in_order(data_dir, tmp_path):
    out = tmp_path / "run"
    # SIGKILL once a step after the save at step 4 is logged: the log runs ahead of last.pt
    process = start_and_wait(data_dir, out, lambda steps: bool(steps) and steps[-1] >= 5 and steps[-1] % 4,
                             "--steps", "5000", "--save-every", "4")
    process.kill()
    process.communicate(timeout=TIMEOUT)
    saved, logged = torch.load(out / "last.pt", weights_only=True)["step"], logged_steps(out)
    assert logged[-1] > saved, "precondition: steps were logged after the last save"
    resumed = train(data_dir, out, "--steps", logged[-1] + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, logged[-1] + 3))
    assert f"resumed at step {saved}" in resumed.stdout and "dropped" in resumed.stdout
    # --no-resume: a fresh log; the old log and checkpoint are kept as .bak
    fresh = train(data_dir, out, "--steps", 2, "--no-resume")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "from scratch" in fresh.stdout
    assert logged_steps(out) == [1, 2]
    assert json.loads((out / "log.jsonl.bak").read_text().splitlines()[-1])["step"] == logged[-1] + 2
    assert torch.load(out / "last.pt.bak", weights_only=True)["step"] == logged[-1] + 2


def test_unwritable_output_folder_fails_before_training(data_dir):
    run = train(data_dir, "/proc/run", "--steps", 3)
    assert run.returncode not in (0, 130)
    assert "/proc/run" in run.stderr and "output folder" in run.stderr
    assert "step 1" not in run.stdout and "from scratch" not in run.stdout


def test_same_seed_and_resume_are_bitwise_across_processes(data_dir, tmp_path):
    """Model init, perceptual trunk, data order and draws all come from --seed and last.pt."""
    straight = train(data_dir, tmp_path / "a", "--steps", 5, "--seed", 3)
    assert straight.returncode == 0, straight.stderr[-3000:]
    again = train(data_dir, tmp_path / "b", "--steps", 5, "--seed", 3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_tensors(model_state(tmp_path / "a" / "last.pt"), model_state(tmp_path / "b" / "last.pt"))
    # 3 steps (mid-epoch: 2 batches per epoch), then a rerun with --steps 5 (the seed comes from last.pt)
    first = train(data_dir, tmp_path / "c", "--steps", 3, "--seed", 3)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(data_dir, tmp_path / "c", "--steps", 5)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 3" in second.stdout and "seed 3" in second.stdout
    assert_same_tensors(model_state(tmp_path / "a" / "last.pt"), model_state(tmp_path / "c" / "last.pt"))
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    log_c = (tmp_path / "c" / "log.jsonl").read_text().splitlines()
    drop_time = [{k: v for k, v in json.loads(x).items() if k != "s_per_step"} for x in log_a]
    assert drop_time == [{k: v for k, v in json.loads(x).items() if k != "s_per_step"} for x in log_c]
