"""Training settings and seeds: :class:`TrainConfig`, the process layout, and every random
choice a run makes derived from one ``seed``.

* :func:`derived_seed`: one independent seed per use ("model", "perceptual", "loader/<epoch>/<rank>").
* :func:`build_model`: the model's initial weights from the seed (global RNG untouched).
* :func:`epoch_batches`: the data order, a permutation seeded by (seed, epoch), split per process.

The source draws (``OfficialDataset(seed=)``), sampling jitter and StyleGAN noise (the trainer's
generator, ``seed + rank``) and the perceptual trunk (``GPAvatarLoss(seed=)``) complete the list.

    >>> TrainConfig(steps=10, batch_size=1).milestones
    (130000, 160000)
    >>> epoch_batches(5, 2, epoch=0, seed=0) == epoch_batches(5, 2, epoch=0, seed=0)
    True
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from gpavatar.model import GPAvatar, GPAvatarConfig

__all__ = ["TrainConfig", "DistributedContext", "derived_seed", "build_model", "epoch_batches"]


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one use of the run's ``seed`` ("model", "perceptual", ...), so the streams differ.

    >>> derived_seed(0, "model") != derived_seed(0, "perceptual")
    True
    """
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode())) % (2 ** 63)


def build_model(config: GPAvatarConfig | str, seed: int, **overrides: Any) -> GPAvatar:
    """``GPAvatar(config)`` with initial weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "model"))
        return GPAvatar(config, **overrides)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the official configuration, pipeline.md 5.1-5.3).

    steps: optimiser steps in total; batch_size: per process; lr: base learning rate;
    betas: Adam betas; milestones / gamma: MultiStepLR; workers: DataLoader workers;
    log_every / save_every: in steps; save_minutes: also save when this much wall time has
    passed since the last save (0: off); amp: "off" | "bf16"; seed: model init, perceptual
    trunk, data order, source draws, sampling jitter and noise (each process adds its rank
    to the draws); cuda_graph: replay each step from CUDA graphs
    (:class:`gpavatar.train.graphed.GraphedTrainStep`: one launch per step, fused Adam; one GPU
    process; a run-time choice, not resumed).
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
    save_minutes: float = 10.0
    amp: str = "off"
    seed: int = 0
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, got {self.cuda_graph!r}")
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"amp must be 'off' or 'bf16', got {self.amp!r}")
        for name in ("lr", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                       and value > 0):
                raise ValueError(f"{name} must be a positive float, got {value!r}")
        if (isinstance(self.save_minutes, bool) or not isinstance(self.save_minutes, (int, float))
                or not (math.isfinite(self.save_minutes) and self.save_minutes >= 0)):
            raise ValueError(f"save_minutes must be a float >= 0 (0: off), got {self.save_minutes!r}")
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {self.betas!r}")
        try:
            whole = all(not isinstance(m, bool) and int(m) == m >= 1 for m in self.milestones)
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise ValueError(f"milestones must be whole numbers >= 1 (steps), got {self.milestones!r}")
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "save_minutes", float(self.save_minutes))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))


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
