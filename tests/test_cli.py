"""The ``gpavatar`` command on hostile and careless input (issue 13): a dataset.pkl that tries to
run code, a truncated LMDB, bad arguments, missing GPUs, full disks, Ctrl-C.  Every failure is one
line ``gpavatar <cmd>: error: ...`` on stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import gpavatar
from gpavatar import cli
from gpavatar.data.synthetic import make_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_synth")
    make_synthetic_dataset(root, n_identities=3, frames_per_identity=3, size=32, samples=1)
    return root


def run_cli(*args, env=None, timeout=120):
    """``python -m gpavatar.cli ARGS`` in a subprocess (for exit codes a crash would hide)."""
    return subprocess.run([sys.executable, "-m", "gpavatar.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(err: str, command: str) -> str:
    """stderr ends in exactly one ``gpavatar <command>: error: ...`` line and holds no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"gpavatar {command}: error: "), err
    return last


class _Evil:
    """Pickles to ``os.system("touch MARKER")``: what a hostile dataset.pkl can do on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_copy(dataset, dst, marker):
    shutil.copytree(dataset, dst)
    with open(dataset / "dataset.pkl", "rb") as handle:
        data = pickle.load(handle)  # our own file
    data["meta_info"]["note"] = _Evil(marker)
    (dst / "dataset.pkl").write_bytes(pickle.dumps(data, protocol=4))
    return dst


# --- item 1: dataset.pkl never runs code -------------------------------------------------------------


def test_hostile_dataset_pkl_is_refused_by_the_loader(dataset, tmp_path):
    from gpavatar.data.official import OfficialDataset, load_dataset_pkl

    marker = tmp_path / "pwned"
    root = hostile_copy(dataset, tmp_path / "hostile", marker)
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system|os\.system"):
        load_dataset_pkl(root)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        OfficialDataset(root, "val", n_sources=1)
    assert not marker.exists()


def test_hostile_dataset_pkl_data_check_subprocess(dataset, tmp_path):
    marker = tmp_path / "pwned"
    root = hostile_copy(dataset, tmp_path / "hostile", marker)
    result = run_cli("data", "check", root)
    assert not marker.exists(), "dataset.pkl ran code"
    assert result.returncode != 0 and "OK" not in result.stdout.splitlines()
    assert "system" in result.stdout + result.stderr and "refusing" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_hostile_dataset_pkl_preview_and_eval(dataset, tmp_path, capsys):
    marker = tmp_path / "pwned"
    root = hostile_copy(dataset, tmp_path / "hostile", marker)
    assert cli.main(["data", "preview", str(root), str(tmp_path / "p.png")]) != 0
    assert "system" in one_error_line(capsys.readouterr().err, "data preview")
    assert cli.main(["eval", str(root), "--pretrained", str(gpavatar_tiny()), "--limit", "1"]) != 0
    assert "system" in one_error_line(capsys.readouterr().err, "eval")
    assert not marker.exists()


def gpavatar_tiny():
    from gpavatar.demo import TINY_WEIGHTS

    return TINY_WEIGHTS


# --- item 2: a truncated LMDB is an error, not a bus error -------------------------------------------


def truncated_copy(dataset, dst, size=8192):
    shutil.copytree(dataset, dst)
    data = (dataset / "img_lmdb" / "data.mdb").read_bytes()
    (dst / "img_lmdb" / "data.mdb").write_bytes(data[:size])
    return dst


def test_truncated_lmdb_data_check_subprocess(dataset, tmp_path):
    root = truncated_copy(dataset, tmp_path / "truncated")
    result = run_cli("data", "check", root)
    assert result.returncode == 1, (result.returncode, result.stderr)  # not 135 / -SIGBUS
    assert "data.mdb" in result.stdout and "truncated" in result.stdout
    assert "Traceback" not in result.stderr


def test_truncated_lmdb_python_and_cli(dataset, tmp_path, capsys):
    from gpavatar.data.official import ImageLMDB, OfficialDataset

    root = truncated_copy(dataset, tmp_path / "truncated")
    with pytest.raises(ValueError, match=r"data\.mdb.*truncated"):
        ImageLMDB(root / "img_lmdb").keys()
    with pytest.raises(ValueError, match="truncated"):
        OfficialDataset(root, "val", n_sources=1)[0]
    assert cli.main(["data", "preview", str(root), str(tmp_path / "p.png")]) != 0
    assert "data.mdb" in one_error_line(capsys.readouterr().err, "data preview")
    not_lmdb = truncated_copy(dataset, tmp_path / "tiny", size=100)
    with pytest.raises(ValueError, match="data.mdb"):
        ImageLMDB(not_lmdb / "img_lmdb").keys()


# --- item 12: every failure is one line, exit != 0 ---------------------------------------------------


def expect_usage_error(argv, command, capsys, needle):
    """argparse refuses ``argv``: exit 2, the last stderr line names the command and the problem."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert needle in one_error_line(capsys.readouterr().err, command)


def test_bad_numbers_are_refused_before_any_work(dataset, tmp_path, capsys):
    out = tmp_path / "synth"
    expect_usage_error(["data", "preview", str(dataset), str(tmp_path / "p.png"), "--rows", "0"], "data preview",
                       capsys, "--rows")
    expect_usage_error(["data", "preview", str(dataset), str(tmp_path / "p.png"), "--cols", "0"], "data preview",
                       capsys, "--cols")
    expect_usage_error(["eval", str(dataset), "--pretrained", str(gpavatar_tiny()), "--limit", "0"], "eval", capsys,
                       "--limit")
    expect_usage_error(["data", "synth", str(out), "--size", "0"], "data synth", capsys, "--size")
    expect_usage_error(["demo", "--frames", "-1"], "demo", capsys, "--frames")
    assert not out.exists() and not (tmp_path / "p.png").exists()
    # too few frames to train on: refused before anything is written
    assert cli.main(["data", "synth", str(out), "--frames", "2"]) == 2
    assert "at least 3 frames" in one_error_line(capsys.readouterr().err, "data synth")
    assert not out.exists()
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset(out, size=0)
    assert not out.exists()


def test_one_identity_warns(tmp_path, capsys):
    assert cli.main(["data", "synth", str(tmp_path / "one"), "--identities", "1", "--frames", "3", "--size", "16",
                     "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "gpavatar data synth: warning: --identities 1" in err and "evaluation measures training" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    for argv, command in ((["demo", "--device", "cuda", "--out", str(tmp_path / "d.mp4")], "demo"),
                          (["eval", str(tmp_path), "--pretrained", str(gpavatar_tiny()), "--device", "cuda"], "eval"),
                          (["train", str(tmp_path), str(tmp_path / "run"), "--device", "cuda"], "train")):
        assert cli.main(argv) == 2
        assert "no CUDA GPU" in one_error_line(capsys.readouterr().err, command)
    assert not (tmp_path / "run").exists()


def test_unknown_device_and_backend(tmp_path, capsys, monkeypatch):
    assert cli.main(["demo", "--device", "tpu", "--out", str(tmp_path / "d.mp4")]) == 2
    assert "tpu" in one_error_line(capsys.readouterr().err, "demo")
    monkeypatch.setenv("GPAVATAR_BACKEND", "fastest")
    assert cli.main(["demo", "--device", "cpu", "--out", str(tmp_path / "d.mp4")]) == 2
    line = one_error_line(capsys.readouterr().err, "demo")
    assert "GPAVATAR_BACKEND" in line and "fastest" in line
    monkeypatch.setenv("GPAVATAR_BACKEND", "cuda")  # a backend, but not one for CPU tensors
    assert cli.main(["eval", str(tmp_path), "--pretrained", str(gpavatar_tiny()), "--device", "cpu"]) == 2
    assert "GPAVATAR_BACKEND=cuda" in one_error_line(capsys.readouterr().err, "eval")
    monkeypatch.delenv("GPAVATAR_BACKEND")
    assert cli.main(["demo", "--device", "cpu", "--backend", "cuda", "--out", str(tmp_path / "d.mp4")]) == 2
    assert "--backend cuda" in one_error_line(capsys.readouterr().err, "demo")
    assert not (tmp_path / "d.mp4").exists()


def test_bad_output_paths(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "file" / "d.mp4", "is a file"),
                        (tmp_path / "d.avi", ".mp4 or .gif")):
        assert cli.main(["demo", "--device", "cpu", "--frames", "1", "--out", str(out)]) == 2
        assert needle in one_error_line(capsys.readouterr().err, "demo")
    assert cli.main(["data", "synth", str(tmp_path / "file"), "--size", "16"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "data synth")


def test_bad_model_config_yaml(dataset, tmp_path, capsys):
    bad = tmp_path / "model.yaml"
    bad.write_text("preset: tiny\nrender_size: [8\n")
    assert cli.main(["train", str(dataset), str(tmp_path / "run"), "--model-config", str(bad), "--steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "model.yaml" in line and "YAML" in line


def test_truncated_last_pt(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 torn")
    status = cli.main(["train", str(dataset), str(run), "--steps", "1", "--device", "cpu"])
    assert status not in (0, 130)
    assert "last.pt" in one_error_line(capsys.readouterr().err, "train")


def test_disk_full_and_interrupt_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    import gpavatar.data.synthetic as synthetic

    out = tmp_path / "synth"
    argv = ["data", "synth", str(out), "--identities", "3", "--frames", "3", "--size", "16", "--samples", "1"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / ".synth-partial" / "img_lmdb"))

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "write_lmdb", full)
        assert cli.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "data synth")
    assert "No space left on device" in line and "disk is full" in line
    assert list(out.iterdir()) == []

    real = synthetic.synthetic_frames

    def interrupted(*args, **kwargs):
        for i, frame in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt
            yield frame

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "synthetic_frames", interrupted)
        assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == "gpavatar data synth: interrupted"
    assert list(out.iterdir()) == []
    assert cli.main(argv) == 0  # the interrupted run does not block the next one
    assert "wrote 9 frames" in capsys.readouterr().out


def test_synth_is_idempotent(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["data", "synth", str(out), "--identities", "3", "--frames", "3", "--size", "16", "--samples", "1"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli.main(argv) == 0  # the README flow runs twice in a row
    assert "already holds this dataset" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert cli.main(argv[:-2] + ["--samples", "2"]) == 2  # other settings: refused without --overwrite
    assert "samples" in one_error_line(capsys.readouterr().err, "data synth")
    assert cli.main(argv[:-2] + ["--samples", "2", "--overwrite"]) == 0
    assert json.loads((out / "synthetic.json").read_text())["samples"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["camera.json", "dataset.pkl", "driver.json", "img_lmdb",
                                                     "synthetic.json"]


def test_errors_in_a_subprocess_are_one_line():
    result = subprocess.run([sys.executable, "-m", "gpavatar", "demo", "--device", "cuda:99", "--frames", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpavatar demo: error: --device cuda:99")


# --- expected features -------------------------------------------------------------------------------


def test_version_and_help_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help lines (and paths) at the terminal width
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gpavatar {gpavatar.__version__}"
    for argv, needles in ((["demo"], ["(default: 50)", "(default: demo-out/demo.mp4)", "$GPAVATAR_BACKEND",
                                      "--no-progress"]),
                          (["eval"], ["(default: stored)", "(default: all)", "(default: cuda if available",
                                      "--per-sample", "--grid"]),
                          (["data", "synth"], ["(default: 8)", "(default: 16)", "(default: 256)", "(default: png)"]),
                          (["data", "preview"], ["(default: 8)", "(default: 6)", "(default: 128)"])):
        with pytest.raises(SystemExit):
            cli.main(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (argv, needle, text)


def test_progress_only_for_terminals(monkeypatch):
    assert not cli.progress_enabled()  # pytest captures stdout
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.progress_enabled() and not cli.progress_enabled(no_progress=True)
