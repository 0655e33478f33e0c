"""``gpavatar train``: train on a dataset in the official layout (``gpavatar data synth`` makes one).

    gpavatar train DATA OUT [--preset tiny|paper] [--model-config cfg.yaml] [--steps N]
                   [--batch-size 2] [--lr 1e-4] [--milestones 130000,160000] [--amp off|bf16]
                   [--workers 0] [--seed 0] [--log-every 50] [--save-every N] [--save-minutes 10]
                   [--device cuda|cpu] [--no-resume] [--progress | --no-progress]
    torchrun --nproc_per_node 8 -m gpavatar.cli train DATA OUT ...      # multi-GPU (DDP)

OUT receives ``last.pt`` (resumable), ``log.jsonl`` and ``pretrained/`` (``from_pretrained``).
OUT is created and checked writable before anything else.

* Resume: a run finds ``OUT/last.pt`` and resumes from it unless ``--no-resume`` (which moves
  it to ``last.pt.bak`` and the log to ``log.jsonl.bak``). A resumed run keeps the options
  of the run it resumes except those given again; each change is printed (a new ``--lr`` or
  ``--milestones`` is applied to the optimizer and the scheduler at the resumed step).
* Defaults: ``--steps`` 4000 for the tiny preset (and other non-paper models), 205000 (the
  official count) for the paper sizes; ``--save-every`` steps / 10 (at most 5000), and a save
  every ``--save-minutes`` of wall time.
* Ctrl-C / SIGTERM: the current step finishes, ``last.pt`` is saved, the command exits with
  130 / 143; a second Ctrl-C quits at once. An error during training saves first too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional

DEFAULT_STEPS = {"paper": 205_000, "small": 4000}
DEFAULTS: dict[str, Any] = {"batch_size": 2, "lr": 1e-4, "milestones": (130_000, 160_000), "amp": "off",
                            "workers": 0, "seed": 0, "log_every": 50, "save_minutes": 10.0}
# Options a resumed run takes from last.pt unless given again (in the order they are printed).
RESUMED_OPTIONS = ("steps", "batch_size", "lr", "milestones", "amp", "workers", "seed", "log_every",
                   "save_every", "save_minutes")


def _milestones(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(m) for m in text.split(",") if m.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole step numbers, got {text!r}") from None
    if any(m < 1 for m in values):
        raise argparse.ArgumentTypeError(f"milestones must be steps >= 1, got {text!r}")
    return values


def _number(kind, low: float, strict: bool = False):
    """argparse type: a ``kind`` (int / float) >= low (> low when strict), finite."""
    bound = f"{'>' if strict else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {bound}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="train GPAvatar on an official-layout dataset (resumable)",
        description="Train GPAvatar with the official recipe. Rerunning the same command resumes from OUT/last.pt; "
                    "options not given again keep the resumed run's values. Ctrl-C saves and exits (130).")
    p.add_argument("data", help="dataset folder (img_lmdb/, dataset.pkl, camera.json)")
    p.add_argument("out", help="output folder: last.pt, log.jsonl, pretrained/ (created, checked writable)")
    p.add_argument("--preset", choices=("paper", "tiny"), default="tiny", help="model sizes (default: tiny)")
    p.add_argument("--model-config", help="YAML/JSON model config (overrides --preset)")
    p.add_argument("--steps", type=_number(int, 1), default=None,
                   help="optimiser steps in total (default: 4000 for the tiny preset and other non-paper "
                        "models, 205000 = the official count for the paper sizes)")
    p.add_argument("--batch-size", type=_number(int, 1), default=None, help="per process (default: 2)")
    p.add_argument("--lr", type=_number(float, 0, strict=True), default=None,
                   help="base learning rate; mapping layers get 0.1x (default: 1e-4)")
    p.add_argument("--milestones", type=_milestones, default=None,
                   help="comma list of steps where the LR is multiplied by 0.2; '' for none "
                        "(default: 130000,160000)")
    p.add_argument("--amp", choices=("off", "bf16"), default=None, help="bf16 autocast (default: off)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each step from CUDA graphs (one launch per step, fused Adam; one GPU process; "
                        "not resumed: give it again; default: eager steps)")
    p.add_argument("--workers", type=_number(int, 0), default=None, help="DataLoader workers (default: 0)")
    p.add_argument("--seed", type=_number(int, 0), default=None,
                   help="seeds model init, perceptual network, data order and all draws (default: 0)")
    p.add_argument("--log-every", type=_number(int, 1), default=None, help="steps between log.jsonl lines (default: 50)")
    p.add_argument("--save-every", type=_number(int, 1), default=None,
                   help="steps between saves of last.pt (default: steps / 10, at most 5000)")
    p.add_argument("--save-minutes", type=_number(float, 0), default=None,
                   help="also save after this many minutes of wall time since the last save; 0: off (default: 10)")
    p.add_argument("--device", default=None, help="default: this process's GPU, else CPU")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if OUT/last.pt exists (it is kept as last.pt.bak, the log as log.jsonl.bak)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stdout and stderr are terminals; "
                        "otherwise one line per logged step on stdout)")
    p.set_defaults(run=run)


def _is_paper_sized(config) -> bool:
    from gpavatar.model import GPAvatarConfig
    from gpavatar.train.trainer import RUNTIME_FIELDS

    paper = GPAvatarConfig.preset("paper").to_dict()
    return all(v == paper.get(k) for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS)


def default_save_every(steps: int) -> int:
    """A tenth of the run, at most 5000 steps (the official interval)."""
    return min(5000, max(1, math.ceil(steps / 10)))


def resolve_options(args, saved: Optional[dict], paper_sized: bool) -> tuple[dict, dict, list[str]]:
    """Each option: given on the command line > the resumed run's value > the default (a
    ``save_every`` that was the default for the resumed run's steps is recomputed).

    Returns (values, where each came from: "given" | "resumed" | "default", changes vs the
    resumed run as text)."""
    values, origin, changes = {}, {}, []
    for name in RESUMED_OPTIONS:
        given = getattr(args, name)
        old = saved.get(name) if saved else None
        if isinstance(old, list):
            old = tuple(old)
        if name == "steps":
            default = DEFAULT_STEPS["paper" if paper_sized else "small"]
        elif name == "save_every":
            default = default_save_every(values["steps"])
            if saved and isinstance(saved.get("steps"), int) and old == default_save_every(saved["steps"]):
                old = None  # the resumed run had the default for its steps: recompute it for these
        else:
            default = DEFAULTS[name]
        if given is not None:
            values[name], origin[name] = given, "given"
            if old is not None and old != given:
                changes.append(f"{name.replace('_', '-')} {_show(old)} -> {_show(given)}")
        elif old is not None:
            values[name], origin[name] = old, "resumed"
        else:
            values[name], origin[name] = default, "default"
    return values, origin, changes


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # a second Ctrl-C during a step, or one outside the training loop
        print("gpavatar train: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import CAMERA
    from gpavatar.model import GPAvatarConfig
    from gpavatar.train.run_folder import (CHECKPOINT_NAME, LOG_NAME, check_output_folder, prepare_log,
                                           read_training_checkpoint, remove_partial_saves, set_aside)
    from gpavatar.train.trainer import DistributedContext, Trainer, TrainConfig, build_model

    out = Path(args.out)
    main = DistributedContext.from_env().is_main
    say = print if main else (lambda *a, **k: None)
    if main:
        check_output_folder(out)  # before reading any data: fail in a second, not after hours
        if removed := remove_partial_saves(out):
            say(f"gpavatar train: removed {removed} partial checkpoint file(s) a killed save left in {out}")
    checkpoint, saved_state = out / CHECKPOINT_NAME, None
    if args.no_resume:
        if main and (moved := set_aside(checkpoint)) is not None:
            say(f"gpavatar train: --no-resume: moved the previous {checkpoint.name} to {moved}")
    elif checkpoint.is_file():
        saved_state = read_training_checkpoint(checkpoint)

    config = GPAvatarConfig.load(args.model_config) if args.model_config else GPAvatarConfig.preset(args.preset)
    paper_sized = _is_paper_sized(config)
    saved = saved_state["train_config"] if saved_state else None
    values, origin, changes = resolve_options(args, saved, paper_sized)
    train_config = TrainConfig(**values, cuda_graph=bool(args.cuda_graph))
    flame = dataset_flame(args.data, CAMERA["flame_scale"])
    dataset = OfficialDataset(args.data, "train", n_sources=2, resize=config.image_size, flame=flame,
                              seed=train_config.seed)
    trainer = Trainer(build_model(config, train_config.seed), dataset, out, train_config, device=args.device)
    if saved_state is not None:
        trainer.load_state(saved_state, source=str(checkpoint))
    steps = train_config.steps
    resumed = saved_state is not None
    say(f"gpavatar train: {len(dataset)} samples, {trainer.batches_per_epoch} batches/epoch/process, "
        f"{trainer.context.world_size} process(es), device {trainer.device}, "
        f"{'resumed at step ' + str(trainer.step) if resumed else 'from scratch'} -> {steps} steps")
    steps_note = {"given": "", "resumed": " (from the resumed run)",
                  "default": f" (default for {'the paper sizes' if paper_sized else 'a small model'}; --steps)"}
    say(f"  steps {steps}{steps_note[origin['steps']]}, save every {train_config.save_every} steps"
        + (f" or {train_config.save_minutes:g} min" if train_config.save_minutes else "")
        + f", lr {train_config.lr:g}, milestones {_show(train_config.milestones)}, batch {train_config.batch_size}, "
          f"seed {train_config.seed}, amp {train_config.amp}")
    if changes:
        say("  changed on resume: " + "; ".join(changes))
    for note in trainer.resume_notes:
        say(f"  {note}")
    if main and (log_note := prepare_log(out / LOG_NAME, trainer.step)):
        say(f"  {log_note}")
    if trainer.device.type == "cpu" and paper_sized:
        say("  note: the paper sizes on a CPU take minutes per step; use a GPU or --preset tiny")
    if trainer.step >= steps:
        say(f"  nothing to train: {checkpoint.name} is at step {trainer.step} >= {steps} steps (raise --steps)")
    try:
        last = trainer.fit(progress=args.progress, print_lines=True)
    except BaseException:
        if main and trainer.failure_note:
            print(f"gpavatar train: {trainer.failure_note}", file=sys.stderr, flush=True)
        raise
    stop = trainer.stopped_by
    if stop is not None:
        if main:
            saved_at = (f"saved {checkpoint} at step {trainer.saved_step}; rerun the same command to resume"
                        if trainer.saved_step else "no step finished, nothing saved")
            print(f"gpavatar train: stopped by {stop.signal_name} at step {trainer.step}: {saved_at}",
                  file=sys.stderr, flush=True)
        return stop.exit_code
    if main:
        trainer.model.save_pretrained(out / "pretrained")
        terms = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        say(f"done at step {trainer.step}: {terms}; wrote {checkpoint} and {out / 'pretrained'}")
    return 0
