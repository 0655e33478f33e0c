"""Training loop of GPAvatar with the official recipe (pipeline.md section 5).

Per step: ``forward_train`` (one source and no MTA in 30 % of the steps, jittered
sampling, fresh StyleGAN noise) -> :class:`GPAvatarLoss` -> non-finite check ->
backward -> Adam (betas (0, 0.99); ``style_mlp`` / ``final_linear`` at lr x 0.1) ->
MultiStepLR (x0.2 at 130k and 160k steps). No gradient clipping, no EMA (as the official).

* Multi-GPU: launch with ``torchrun --nproc_per_node N -m gpavatar.cli train ...``; each
  process takes its share of every epoch, gradients are averaged by DDP (unused
  parameters allowed: single-source steps skip MTA, and each process flips its own coin,
  as the official code does).
* Resume: ``last.pt`` holds the model, optimizer, scheduler, step and the random state;
  a resumed run continues exactly where the saved one stopped (same batches, same draws).
  Checkpoints are written to a temporary file and renamed into place.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from gpavatar.model import GPAvatar
from gpavatar.model.checkpoint import atomic_write

CHECKPOINT_NAME, LOG_NAME = "last.pt", "log.jsonl"
RUNTIME_FIELDS = ("noise", "query_chunk", "backend")  # may differ between a run and its resumption


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the official configuration, pipeline.md 5.1-5.3).

    steps: optimiser steps in total; batch_size: per process; lr: base learning rate;
    betas: Adam betas; milestones / gamma: MultiStepLR; workers: DataLoader workers;
    log_every / save_every: in steps; amp: "off" | "bf16"; seed: data order, source
    draws, sampling jitter and noise (each process adds its rank).
    """

    steps: int = 205_000
    batch_size: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    milestones: tuple[int, ...] = (130_000, 160_000)
    gamma: float = 0.2
    workers: int = 0
    log_every: int = 50
    save_every: int = 5000
    amp: str = "off"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"amp must be 'off' or 'bf16', got {self.amp!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        """torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK); one process without it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Index batches of one epoch for one process: a permutation seeded by (seed, epoch), split
    evenly across processes (the remainder dropped), then into full batches (drop_last)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    per_rank = n // world
    mine = order[: per_rank * world][rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


class _TrainStep(nn.Module):
    """Routes ``forward`` to ``forward_train`` so DDP's hooks see the training pass."""

    def __init__(self, model: GPAvatar):
        super().__init__()
        self.model = model

    def forward(self, images, points, transform, generator):
        return self.model.forward_train(images, points, transform, generator=generator)


class Trainer:
    """Fit a :class:`GPAvatar` on an :class:`gpavatar.data.OfficialDataset`-style dataset.

    Args:
        model: the model (moved to ``device``, put in training mode)
        dataset: items with ``f_images`` (V, 3, S, S), ``d_images`` (3, S, S), ``d_points``
            (5023, 3), ``d_transforms`` (3, 4), ``d_bbox`` (4,); ``set_epoch(epoch)`` is called
            if present (deterministic source draws)
        out_dir: checkpoints (``last.pt``), ``log.jsonl`` and, at the end, ``pretrained/``
        config: :class:`TrainConfig`
        device: default: this process's GPU if any, else CPU
        loss: default :class:`gpavatar.train.losses.GPAvatarLoss` with the official weights
    """

    def __init__(self, model: GPAvatar, dataset, out_dir: str | os.PathLike, config: Optional[TrainConfig] = None,
                 device: Optional[torch.device | str] = None, loss: Optional[nn.Module] = None):
        from gpavatar.train.losses import GPAvatarLoss

        self.config = config or TrainConfig()
        self.context = DistributedContext.from_env()
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
        self.loss = (loss or GPAvatarLoss(crop_size=crop)).to(self.device)
        self.dataset, self.out_dir = dataset, Path(out_dir)
        c = self.config
        self.optimizer = torch.optim.Adam(self.model.param_groups(c.lr), lr=c.lr, betas=c.betas)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(c.milestones), gamma=c.gamma)
        self.generator = torch.Generator(self.device).manual_seed(c.seed + self.context.rank)
        self.step = 0
        self.batches_per_epoch = len(dataset) // self.context.world_size // c.batch_size  # as epoch_batches splits
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} items: fewer than one batch of {c.batch_size} per "
                             f"process ({self.context.world_size} processes)")

    # -- data ------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Batches from the current step on, epoch after epoch (resumes mid-epoch exactly)."""
        c, ctx = self.config, self.context
        epoch, offset = divmod(self.step, self.batches_per_epoch)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            plan = epoch_batches(len(self.dataset), c.batch_size, epoch, c.seed, ctx.rank, ctx.world_size)[offset:]
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=c.workers,
                                                 pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, offset = epoch + 1, 0

    # -- one step --------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        dev = self.device
        images, points = batch["f_images"].to(dev), batch["d_points"].to(dev)
        transform, target, bbox = batch["d_transforms"].to(dev), batch["d_images"].to(dev), batch["d_bbox"].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
            out = self.step_module(images, points, transform, self.generator)
            terms = self.loss(out, target, bbox)
        total = terms["total"]
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(f"non-finite loss at step {self.step}: "
                                     + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged["single_source"] = float(out["single_source"])
        return logged

    def fit(self, steps: Optional[int] = None, progress: bool = True) -> dict[str, float]:
        """Train until ``steps`` (default ``config.steps``) optimiser steps in total; returns the
        last logged terms. Saves every ``save_every`` steps and at the end (main process)."""
        target = self.config.steps if steps is None else steps
        bar = None
        if progress and self.context.is_main:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        start, start_step = time.perf_counter(), self.step
        batches = self.batches()
        while self.step < target:
            last = self.train_step(next(batches))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['total']:.4f}", psnr=f"{last.get('psnr', float('nan')):.2f}")
            if self.step % self.config.log_every == 0 or self.step == target:
                seconds = (time.perf_counter() - start) / max(1, self.step - start_step)
                rates = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
                base = rates.get("lr_normal", self.optimizer.param_groups[0]["lr"])
                self._log({"step": self.step, **last, "lr": base, **rates, "s_per_step": seconds})
            if self.step % self.config.save_every == 0 or self.step == target:
                self.save()
        if bar is not None:
            bar.close()
        return last

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"format": "gpavatar-train-1", "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "model_config": self.model.config.to_dict(),
                "train_config": dataclasses.asdict(self.config)}

    def save(self, path: Optional[str | os.PathLike] = None) -> Optional[Path]:
        """Atomically write the training state (main process only); returns the path."""
        if not self.context.is_main:
            return None
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def load(self, path: Optional[str | os.PathLike] = None) -> bool:
        """Restore a training state written by :meth:`save`; False if there is none."""
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("format") != "gpavatar-train-1":
            raise ValueError(f"{path} is not a gpavatar training checkpoint")
        ours = self.model.config.to_dict()
        changed = sorted(k for k, v in state["model_config"].items()
                         if k not in RUNTIME_FIELDS and ours.get(k) != v)
        if changed:
            raise ValueError(f"{path} was trained with a different model config (fields {changed})")
        self.model.load_checked_state_dict(state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])
        return True

    def _log(self, record: dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")
