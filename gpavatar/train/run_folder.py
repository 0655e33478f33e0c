"""The run folder of ``gpavatar train``: checked before step 1, read on resume, its log kept in order.

* :func:`check_output_folder`: create the folder and prove it writable (a probe file is created
  and removed) before any training, so a run never trains for hours and then fails to save.
* :func:`read_training_checkpoint`: ``last.pt`` with clear errors (a truncated or foreign file
  names itself and suggests ``--no-resume``).
* :func:`prepare_log`: ``log.jsonl`` holds each step once, in order. A resumed run drops the
  lines after the resumed step (steps a killed run logged but never saved); a run from step 0
  moves an earlier log to ``log.jsonl.bak``.
* :func:`set_aside`: ``--no-resume`` renames an earlier ``last.pt`` to ``last.pt.bak`` instead of
  overwriting it at the first save.

    >>> import tempfile, pathlib
    >>> folder = check_output_folder(pathlib.Path(tempfile.mkdtemp()) / "run")
    >>> folder.is_dir()
    True
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gpavatar.model.checkpoint import CheckpointError, atomic_write

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "CHECKPOINT_FORMATS", "OutputFolderError", "SaveError",
           "check_output_folder", "read_training_checkpoint", "prepare_log", "set_aside", "remove_partial_saves"]

CHECKPOINT_NAME, LOG_NAME = "last.pt", "log.jsonl"
# gpavatar-train-1: before the perceptual trunk was stored (resumes with a warning: not exact).
CHECKPOINT_FORMATS = ("gpavatar-train-1", "gpavatar-train-2")
REQUIRED_KEYS = ("step", "model", "optimizer", "scheduler", "generator", "model_config", "train_config")
RESUME_HINT = "rerun with --no-resume to start over (the file is then kept as last.pt.bak)"


class OutputFolderError(OSError):
    """The output folder cannot be created or written."""


class SaveError(OSError):
    """Writing a checkpoint failed (the previous file, if any, is intact)."""


def check_output_folder(path: Union[str, os.PathLike]) -> Path:
    """Create ``path`` (with parents) and check that a file can be created in it; returns it.

    Raises :class:`OutputFolderError` naming the folder and the reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputFolderError(f"output folder {path} exists and is not a folder") from error
    except OSError as error:
        raise OutputFolderError(f"cannot create the output folder {path}: {error.strerror or error}") from error
    if not path.is_dir():
        raise OutputFolderError(f"output folder {path} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputFolderError(f"output folder {path} is not writable: {error.strerror or error}") from error
    return path


def read_training_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a ``last.pt`` written by :meth:`gpavatar.train.trainer.Trainer.save`.

    Raises :class:`gpavatar.model.checkpoint.CheckpointError` (a ValueError) naming the file when
    it cannot be read (truncated, corrupt), is not a training checkpoint, or lacks a field."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip / pickle / EOF errors of a truncated or foreign file
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}); it is truncated or "
                              f"not a training checkpoint: {RESUME_HINT}") from error
    if not isinstance(state, dict) or state.get("format") not in CHECKPOINT_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a gpavatar training checkpoint (format {found!r}, expected one of "
                              f"{list(CHECKPOINT_FORMATS)}): {RESUME_HINT}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: {RESUME_HINT}")
    return state


def prepare_log(path: Union[str, os.PathLike], step: int) -> Optional[str]:
    """Make the log at ``path`` end at ``step`` before a run (re)starts there; returns a note or None.

    step > 0 (resumed): lines with a larger step, unreadable lines (a torn last line after a
    kill), lines without a step and lines whose step is not larger than the one before (an
    older run appended to the same log) are dropped; the rewrite is atomic. step == 0: an existing
    log is renamed to ``<name>.bak`` (replacing an older one) and the run starts a new log."""
    path = Path(path)
    if not path.is_file():
        return None
    if step == 0:
        if path.stat().st_size == 0:
            return None
        backup = path.with_name(path.name + ".bak")
        os.replace(path, backup)
        return f"moved the previous {path.name} to {backup.name}"
    kept, dropped, previous = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            logged = record.get("step") if isinstance(record, dict) else None
        except ValueError:
            logged = None
        if isinstance(logged, int) and previous < logged <= step:
            kept.append(line)
            previous = logged
        else:
            dropped += 1
    if not dropped:
        return None
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
    return f"dropped {dropped} line(s) of {path.name} after step {step} or out of order (logged, never saved)"


def remove_partial_saves(folder: Union[str, os.PathLike]) -> int:
    """Delete temporary files a killed save left beside ``last.pt`` (``.last.pt.*.tmp.pt``, see
    :func:`gpavatar.model.checkpoint.atomic_write`); returns how many."""
    removed = 0
    for path in Path(folder).glob(f".{CHECKPOINT_NAME}.*.tmp.pt"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def set_aside(path: Union[str, os.PathLike]) -> Optional[Path]:
    """Rename ``path`` to ``<name>.bak`` (replacing an older one); returns the new path, None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    backup = path.with_name(path.name + ".bak")
    os.replace(path, backup)
    return backup
