"""Training loop of GPAvatar with the official recipe (pipeline.md section 5).

Per step: ``forward_train`` (one source and no MTA in 30 % of the steps, jittered
sampling, fresh StyleGAN noise) -> :class:`GPAvatarLoss` -> non-finite check ->
backward -> Adam (betas (0, 0.99); ``style_mlp`` / ``final_linear`` at lr x 0.1) ->
MultiStepLR (x0.2 at 130k and 160k steps). No gradient clipping, no EMA (as the official).

* Multi-GPU: launch with ``torchrun --nproc_per_node N -m gpavatar.cli train ...``; each
  process takes its share of every epoch, gradients are averaged by DDP (unused
  parameters allowed: single-source steps skip MTA, and each process flips its own coin,
  as the official code does).
* Seeds: one ``seed`` decides everything random: the model's initial weights
  (:func:`build_model`), the random perceptual AlexNet trunk, the data order, the source
  draws, the sampling jitter and the StyleGAN noise. The same seed gives the same run in
  any process (bitwise on CPU; CUDA kernels with atomic adds may differ in the last bits).
* Resume: ``last.pt`` holds the model, the perceptual trunk, optimizer, scheduler, step and
  the random state; a resumed run continues exactly where the saved one stopped (same
  batches, same draws: N steps straight == k steps + resume + N - k steps, bitwise on CPU).
  A new lr / milestones / gamma / betas in the config is applied on resume and reported
  (:attr:`Trainer.resume_notes`). The log is cut back to the resumed step.
* Safety: the output folder is created and checked writable before step 1; ``last.pt`` is
  written atomically (a failed save, e.g. a full disk, leaves the previous file intact and
  raises :class:`SaveError`) every ``save_every`` steps, every ``save_minutes`` of wall time,
  at the end, on SIGINT / SIGTERM (after the current step; :attr:`Trainer.stopped_by`) and
  when a step raises (unless the model is mid-update or not finite).
* Mixed precision: ``amp="bf16"`` runs forward and loss under bf16 autocast.

    >>> from gpavatar.train.trainer import TrainConfig
    >>> TrainConfig(steps=10, batch_size=1).milestones
    (130000, 160000)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from gpavatar.model import GPAvatar
from gpavatar.model.checkpoint import CheckpointError, atomic_write
from gpavatar.train.interrupts import StopSignals
from gpavatar.train.run_folder import (CHECKPOINT_NAME, LOG_NAME, OutputFolderError, SaveError,
                                       check_output_folder, prepare_log, read_training_checkpoint)
from gpavatar.train.schedule import apply_schedule_changes, fresh_hyperparameters
from gpavatar.train.train_config import DistributedContext, TrainConfig, build_model, derived_seed, epoch_batches

__all__ = ["TrainConfig", "Trainer", "DistributedContext", "epoch_batches", "build_model", "derived_seed",
           "CHECKPOINT_NAME", "LOG_NAME", "OutputFolderError", "SaveError", "CheckpointError"]

RUNTIME_FIELDS = ("noise", "query_chunk", "backend")  # may differ between a run and its resumption
CHECKPOINT_FORMAT = "gpavatar-train-2"


class _TrainStep(nn.Module):
    """Routes ``forward`` to ``forward_train`` so DDP's hooks see the training pass."""

    def __init__(self, model: GPAvatar):
        super().__init__()
        self.model = model

    def forward(self, images, points, transform, generator, single_source=None):
        return self.model.forward_train(images, points, transform, generator=generator, single_source=single_source)


class Trainer:
    """Fit a :class:`GPAvatar` on an :class:`gpavatar.data.OfficialDataset`-style dataset.

    Args:
        model: the model (moved to ``device``, put in training mode); :func:`build_model`
            draws its initial weights from the run's seed
        dataset: items with ``f_images`` (V, 3, S, S), ``d_images`` (3, S, S), ``d_points``
            (5023, 3), ``d_transforms`` (3, 4), ``d_bbox`` (4,); ``set_epoch(epoch)`` is called
            if present (deterministic source draws)
        out_dir: checkpoints (``last.pt``), ``log.jsonl`` and, at the end, ``pretrained/``;
            created and checked writable here (:class:`OutputFolderError`)
        config: :class:`TrainConfig`
        device: default: this process's GPU if any, else CPU
        loss: default :class:`gpavatar.train.losses.GPAvatarLoss` with the official weights and
            its random AlexNet trunk drawn from the seed (saved in ``last.pt`` either way)
    """

    def __init__(self, model: GPAvatar, dataset, out_dir: str | os.PathLike, config: Optional[TrainConfig] = None,
                 device: Optional[torch.device | str] = None, loss: Optional[nn.Module] = None):
        from gpavatar.train.losses import GPAvatarLoss

        self.config = config or TrainConfig()
        self.context = DistributedContext.from_env()
        self.dataset, self.out_dir = dataset, Path(out_dir)
        if self.context.is_main:
            check_output_folder(self.out_dir)
        c = self.config
        self.batches_per_epoch = len(dataset) // self.context.world_size // c.batch_size  # as epoch_batches splits
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} items: fewer than one batch of {c.batch_size} per "
                             f"process ({self.context.world_size} processes)")
        if device is None:
            device = f"cuda:{self.context.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.context.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.model = model.to(self.device).train()
        self.step_module: nn.Module = _TrainStep(self.model)
        if self.context.world_size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        # Face-box crops: 256 px at the official 512 output (pipeline.md 5.5); half the output side
        # for smaller models (at least 32 px, AlexNet's minimum).
        crop = max(32, min(256, model.config.output_size // 2))
        if loss is None:
            loss = GPAvatarLoss(crop_size=crop, seed=derived_seed(c.seed, "perceptual"))
        self.loss = loss.to(self.device)
        if c.cuda_graph and self.context.world_size > 1:
            raise ValueError("cuda_graph runs in one process (DDP's gradient hooks are not captured)")
        self.optimizer = torch.optim.Adam(self.model.param_groups(c.lr), lr=c.lr, betas=c.betas,
                                          **adam_implementation(self.device, c.cuda_graph))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(c.milestones), gamma=c.gamma)
        self.generator = torch.Generator(self.device).manual_seed(c.seed + self.context.rank)
        self.graphed = None  # GraphedTrainStep with config.cuda_graph
        if c.cuda_graph:
            from gpavatar.train.graphed import GraphedTrainStep

            try:  # it refuses a machine or device without CUDA graphs
                self.graphed = GraphedTrainStep(self.step_module, self.loss, self.optimizer, self.generator,
                                                amp="bf16" if c.amp == "bf16" else None)
            except RuntimeError as error:
                raise ValueError(f"cuda_graph: {error}") from error
        self.step = 0
        self.saved_step: Optional[int] = None  # step of the newest last.pt this trainer wrote or loaded
        self.resume_notes: list[str] = []  # what a resume changed or could not restore
        self.stopped_by: Optional[StopSignals] = None  # set when fit() stopped on SIGINT / SIGTERM
        self.failure_note: Optional[str] = None  # what fit() saved (or why not) when a step raised
        self.log_note: Optional[str] = None  # what fit() did to an existing log
        self._generator_at_step = self.generator.get_state()
        self._in_step = self._updating = self._saving = False

    # -- data ------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Batches from the current step on, epoch after epoch (resumes mid-epoch exactly)."""
        c, ctx = self.config, self.context
        epoch, offset = divmod(self.step, self.batches_per_epoch)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            plan = epoch_batches(len(self.dataset), c.batch_size, epoch, c.seed, ctx.rank, ctx.world_size)[offset:]
            # own generator: worker seeds come from (seed, epoch), the global RNG is not consumed
            generator = torch.Generator().manual_seed(derived_seed(c.seed, f"loader/{epoch}/{ctx.rank}"))
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=c.workers,
                                                 pin_memory=self.device.type == "cuda", generator=generator,
                                                 worker_init_fn=_ignore_interrupts if c.workers else None)
            yield from loader
            epoch, offset = epoch + 1, 0

    # -- one step --------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        dev = self.device
        self._generator_at_step, self._in_step = self.generator.get_state(), True
        images, points = batch["f_images"].to(dev), batch["d_points"].to(dev)
        transform, target, bbox = batch["d_transforms"].to(dev), batch["d_images"].to(dev), batch["d_bbox"].to(dev)
        if self.graphed is not None:
            return self._graphed_step(images, points, transform, target, bbox)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
            out = self.step_module(images, points, transform, self.generator)
            terms = self.loss(out, target, bbox)
        total = terms["total"]
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(f"non-finite loss at step {self.step}: "
                                     + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._updating = True  # from here to the step count the state is torn: never saved
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._updating = self._in_step = False
        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged["single_source"] = float(out["single_source"])
        return logged

    def _graphed_step(self, images, points, transform, target, bbox) -> dict[str, float]:
        """train_step from the CUDA graphs: the coin on the host, then one replay; a non-finite
        loss skipped the update inside the graph and raises here (the state is the step's start)."""
        single = self.model.draw_single_source(self.generator)
        # a capture (first step, new hyperparameters) changes nothing when it fails: only the replay
        # is an update
        captured = self.graphed.prepare(images, points, transform, target, bbox, single_source=single)
        self._updating = True
        terms = self.graphed.replay(captured, images, points, transform, target, bbox)
        logged = {k: float(v) for k, v in terms.items()}  # the step's one sync
        if not math.isfinite(logged["total"]):
            self._updating = False
            raise FloatingPointError(f"non-finite loss at step {self.step} (update skipped): "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
        self.scheduler.step()
        self.step += 1
        self._updating = self._in_step = False
        logged["single_source"] = float(single)
        return logged

    def fit(self, steps: Optional[int] = None, progress: Optional[bool] = None, print_lines: bool = False,
            catch_signals: bool = True) -> dict[str, float]:
        """Train until ``steps`` (default ``config.steps``) optimiser steps in total; returns the
        last logged terms.

        Saves every ``save_every`` steps, every ``save_minutes`` and at the end (main process).
        ``progress``: a tqdm bar on stderr (None: only when stdout and stderr are terminals);
        ``print_lines``: without a bar, one line per logged step on stdout (for logs and CI).
        ``catch_signals``: the first SIGINT / SIGTERM stops after the current step and saves
        (:attr:`stopped_by` tells; fit returns normally); a second raises KeyboardInterrupt.
        When a step raises, ``last.pt`` is saved first if the state is whole (not mid-update, all
        parameters finite; :attr:`failure_note` says what happened) and the error propagates.
        """
        target = self.config.steps if steps is None else steps
        main = self.context.is_main
        self.stopped_by, self.failure_note, self.log_note = None, None, None
        if self._updating:
            raise RuntimeError("an earlier fit() stopped during a parameter update: this trainer's state is torn; "
                               "build a new trainer and load() the last checkpoint")
        if self._in_step:  # an earlier fit() stopped inside a step: redo it with the same draws
            self.generator.set_state(self._generator_at_step)
            self._in_step = False
        if main:
            self.log_note = prepare_log(self.out_dir / LOG_NAME, self.step)
        if progress is None:  # a person is watching: both streams are terminals (as gpavatar's other commands)
            progress = sys.stdout.isatty() and sys.stderr.isatty()
        bar = None
        if progress and main:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        start, start_step = time.perf_counter(), self.step
        self._last_save_time = time.monotonic()
        batches = self.batches()
        if not main:
            announce = lambda text: None  # noqa: E731
        else:
            announce = (lambda text: bar.write(text, file=sys.stderr)) if bar is not None else _stderr  # noqa: E731
        with StopSignals(enabled=catch_signals, announce=announce) as stop:
            try:
                while self.step < target:
                    if self._stop_agreed(stop):
                        self.stopped_by = stop
                        if self.saved_step != self.step:
                            self.save()
                        break
                    last = self.train_step(next(batches))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{last['total']:.4f}", psnr=f"{last.get('psnr', float('nan')):.2f}")
                    if self.step % self.config.log_every == 0 or self.step == target:
                        seconds = (time.perf_counter() - start) / max(1, self.step - start_step)
                        rates = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
                        base = rates.get("lr_normal", self.optimizer.param_groups[0]["lr"])
                        self._log({"step": self.step, **last, "lr": base, **rates, "s_per_step": seconds})
                        if print_lines and bar is None and main:
                            eta = _duration(seconds * (target - self.step))
                            print(f"step {self.step}/{target}  loss {last['total']:.4f}  psnr {last['psnr']:.2f}  "
                                  f"lr {base:.3g}  {seconds:.3f} s/step  eta {eta}", flush=True)
                    minutes = self.config.save_minutes
                    if (self.step % self.config.save_every == 0 or self.step == target
                            or (minutes > 0 and time.monotonic() - self._last_save_time >= 60 * minutes)):
                        self.save()
            except BaseException as error:
                self._save_after_failure(error)
                raise
            finally:
                if bar is not None:
                    bar.close()
        return last

    def _stop_agreed(self, stop: StopSignals) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step under DDP)."""
        if self.context.world_size == 1 or not dist.is_initialized():
            return stop.requested
        flag = torch.tensor([stop.signum or 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and not stop.requested:
            stop.request(int(flag))
        return bool(int(flag))

    def _save_after_failure(self, error: BaseException) -> None:
        if not self.context.is_main:
            return
        kept = (f"{self.out_dir / CHECKPOINT_NAME} holds step {self.saved_step}" if self.saved_step is not None
                else "no checkpoint was saved")
        if isinstance(error, SaveError):
            note = None
        elif self._saving:
            note = f"stopped while saving ({kept}; a save is all or nothing)"
        elif self._updating:
            note = f"stopped during a parameter update: not saved ({kept})"
        elif self.saved_step == self.step or self.step == 0:
            note = f"nothing new to save ({kept})"
        elif not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            note = f"the parameters are not finite: not saved ({kept})"
        else:
            try:
                path = self.save()
                note = f"saved {path} at step {self.step}; rerun the same command to resume"
            except Exception as save_error:  # report the original error, mention this one
                note = f"could not save on the way out: {save_error}"
        self.failure_note = note
        if note is not None and hasattr(error, "add_note"):
            error.add_note(note)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The training state at the last completed step (mid-step: the random state from its start)."""
        generator = self._generator_at_step if self._in_step else self.generator.get_state()
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.model.state_dict(),
                "loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": generator,
                "model_config": self.model.config.to_dict(), "train_config": dataclasses.asdict(self.config)}

    def save(self, path: Optional[str | os.PathLike] = None) -> Optional[Path]:
        """Atomically write the training state (main process only); returns the path.

        Raises :class:`SaveError` naming the file and the reason when writing fails (disk full,
        folder removed, ...); the previous file is intact then."""
        if not self.context.is_main:
            return None
        if self._updating:
            raise RuntimeError("cannot save during a parameter update")
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        state = self.state()
        self._saving = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        except OSError as error:
            previous = "the previous file is intact" if path.exists() else "no earlier file exists"
            failure = SaveError(f"could not write {path} at step {self.step}: {error.strerror or error} ({previous})")
            failure.errno = error.errno  # ENOSPC stays recognisable
            raise failure from error
        except RuntimeError as error:  # torch.save reports some write failures (zip writer) this way
            previous = "the previous file is intact" if path.exists() else "no earlier file exists"
            raise SaveError(f"could not write {path} at step {self.step}: {error} ({previous})") from error
        finally:
            self._saving = False
        self._last_save_time = time.monotonic()
        if path == self.out_dir / CHECKPOINT_NAME:
            self.saved_step = self.step
        return path

    def load(self, path: Optional[str | os.PathLike] = None) -> bool:
        """Restore a training state written by :meth:`save`; False if there is none.

        Raises :class:`CheckpointError` (a ValueError) naming the file when it is unreadable,
        truncated, foreign or from another model config."""
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            return False
        self.load_state(read_training_checkpoint(path, map_location=self.device), source=str(path))
        return True

    def load_state(self, state: dict[str, Any], source: str = "state") -> None:
        """Restore :meth:`state`'s dict (e.g. from :func:`read_training_checkpoint`).

        The model config must match (run-time fields aside). This trainer's lr, milestones,
        gamma and betas win over the saved ones; each change is listed in :attr:`resume_notes`.
        A ``gpavatar-train-1`` state (no perceptual trunk) keeps this trainer's trunk, noted."""
        ours = self.model.config.to_dict()
        changed = sorted(k for k, v in state["model_config"].items()
                         if k not in RUNTIME_FIELDS and ours.get(k) != v)
        if changed:
            raise CheckpointError(f"{source} was trained with a different model config (fields {changed}); "
                                  f"use another output folder or --no-resume")
        fresh = fresh_hyperparameters(self.optimizer)
        # this trainer's Adam implementation (fused and capturable with cuda_graph), whatever the saved run used
        own = {k: self.optimizer.param_groups[0].get(k) for k in ("fused", "foreach", "capturable")}
        self.model.load_checked_state_dict(state["model"], source=source)
        notes = []
        if "loss" in state:
            try:
                self.loss.load_state_dict(state["loss"])
            except RuntimeError as error:
                raise CheckpointError(f"{source}: its perceptual network does not fit this loss: {error}") from error
        else:
            notes.append(f"{source} predates stored perceptual networks: the trunk was re-drawn from the seed, "
                         f"so this resumed run is not bitwise identical to an uninterrupted one")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{source}: the optimizer state does not fit this model: {error}") from error
        notes += apply_schedule_changes(self.optimizer, self.scheduler, fresh, self.config.milestones,
                                        self.config.gamma)
        for group in self.optimizer.param_groups:
            group.update(own)
        on_device = bool(own["fused"] or own["capturable"])  # where Adam keeps its step counts
        for p, st in self.optimizer.state.items():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)
        if self.graphed is not None:  # the optimizer's state tensors were replaced: capture again
            self.graphed.reset()
        self.generator.set_state(state["generator"].cpu())
        self._generator_at_step, self._in_step, self._updating = self.generator.get_state(), False, False
        self.step = self.saved_step = int(state["step"])
        self.resume_notes = notes

    def _log(self, record: dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        with open(self.out_dir / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def adam_implementation(device: torch.device, cuda_graph: bool = False) -> dict:
    """torch.optim.Adam's implementation options for parameters on ``device``: the fused one where
    torch has it (CUDA, CPU; the same update up to float rounding: one kernel per group of tensors
    on CUDA instead of the foreach default's chain, and on the CPU 76 ms instead of the default
    loop's 170 ms for the paper model's 104 M parameters on 2 cores), capturable for ``cuda_graph``
    (its step counts stay on the device)."""
    if torch.device(device).type not in ("cuda", "cpu"):
        return {}
    return {"fused": True, "capturable": True} if cuda_graph else {"fused": True}


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (which finishes the step and saves)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """12 s, 7 min, 3.2 h."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
