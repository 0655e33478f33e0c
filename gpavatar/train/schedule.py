"""Resuming with a new learning rate, LR milestones, gamma or Adam betas.

``optimizer.load_state_dict`` and ``scheduler.load_state_dict`` bring back the saved run's
hyper-parameters, so a resumed run would silently ignore a new ``--lr`` or ``--milestones``.
:func:`apply_schedule_changes` compares the restored values with those of the freshly built
optimizer / scheduler (the run's configuration) and applies the new ones consistently:

* each group's ``initial_lr`` (the scheduler's base) becomes the fresh one (mapping group
  keeps its 0.1 x), ``scheduler.base_lrs`` follows;
* milestones / gamma are replaced;
* the current rate is recomputed in closed form,
  lr_g = initial_lr_g · gamma ^ #{milestones m <= step} (MultiStepLR decays after the step
  that reaches m), as if the run had always had these settings.

Nothing is touched when nothing changed (a plain resume stays bitwise exact).
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["fresh_hyperparameters", "apply_schedule_changes"]


def fresh_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per group ``initial_lr`` and ``betas`` of a freshly built optimizer (call before loading a state)."""
    return [{"initial_lr": g["initial_lr"], "betas": tuple(g["betas"]), "name": g.get("name", str(i))}
            for i, g in enumerate(optimizer.param_groups)]


def apply_schedule_changes(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR,
                           fresh: list[dict], milestones: tuple[int, ...], gamma: float) -> list[str]:
    """After loading saved states: apply the fresh lr / betas and the given milestones / gamma.

    Args:
        optimizer, scheduler: with the saved states loaded
        fresh: :func:`fresh_hyperparameters` of the same optimizer before loading
        milestones, gamma: the run's MultiStepLR settings
    Returns: one line per change (empty: nothing changed, nothing touched).
    """
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        raise ValueError(f"the saved optimizer has {len(groups)} parameter groups, the model {len(fresh)}")
    notes, rates_changed = [], False
    old_lrs, new_lrs = [g["initial_lr"] for g in groups], [f["initial_lr"] for f in fresh]
    if old_lrs != new_lrs:
        pairs = ", ".join(f"{f['name']} {a:g} -> {b:g}" for f, a, b in zip(fresh, old_lrs, new_lrs) if a != b)
        notes.append(f"learning rate changed: {pairs}")
        for g, f in zip(groups, fresh):
            g["initial_lr"] = f["initial_lr"]
        rates_changed = True
    old_milestones = tuple(sorted(scheduler.milestones.elements()))
    if old_milestones != tuple(sorted(milestones)) or scheduler.gamma != gamma:
        parts = [f"milestones {list(old_milestones)} -> {sorted(milestones)}"] if old_milestones != tuple(
            sorted(milestones)) else []
        parts += [f"gamma {scheduler.gamma:g} -> {gamma:g}"] if scheduler.gamma != gamma else []
        notes.append("LR decay changed: " + ", ".join(parts))
        scheduler.milestones, scheduler.gamma = Counter(milestones), gamma
        rates_changed = True
    old_betas, new_betas = [tuple(g["betas"]) for g in groups], [f["betas"] for f in fresh]
    if old_betas != new_betas:
        notes.append(f"Adam betas changed: {old_betas[0]} -> {new_betas[0]}")
        for g, f in zip(groups, fresh):
            g["betas"] = f["betas"]
    if rates_changed:
        step = scheduler.last_epoch
        decays = sum(1 for m in milestones if m <= step)
        for g in groups:
            g["lr"] = g["initial_lr"] * gamma ** decays
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        scheduler._last_lr = [g["lr"] for g in groups]
        now = ", ".join(f"{f['name']} {g['lr']:g}" for f, g in zip(fresh, groups))
        notes.append(f"learning rate at step {step} is now {now} ({decays} of {len(milestones)} decays passed)")
    return notes
