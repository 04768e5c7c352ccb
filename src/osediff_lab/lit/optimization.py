"""The optimisation mechanics of the training loop: optimisers and schedules per parameter group, clipping,
and the non-finite policy's pieces (poisoned gradients, skip counts kept on the device)."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from diffusers.optimization import get_scheduler
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


def poison_if_nonfinite(loss: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Make the gradients non-finite when ``loss`` is, without a host sync: a NaN loss whose graph happens
    to give finite gradients must still skip the step, on every rank alike."""
    target = next((p for p in params if p.grad is not None), params[0])
    if target.grad is None:
        target.grad = torch.zeros_like(target)
    target.grad.add_(torch.where(torch.isfinite(loss.detach()), 0.0, float("nan")).to(target.grad.dtype))


def build_optimizers(
    groups: dict[str, list[nn.Parameter]],
    lrs: dict[str, float],
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit: bool = False,
    fused: bool = True,
) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per parameter group at its learning rate (bitsandbytes' AdamW8bit with ``use_8bit``).

    ``fused``: torch's fused AdamW, one kernel per step that also skips a non-finite step on the device. Not
    for a group listing a tensor twice (``optim.conv_in_lora_twice``): one fused launch reads that tensor's
    moments once for both entries, where the release's AdamW steps it twice in a row."""
    if use_8bit:
        import bitsandbytes as bnb

        cls, fuses = bnb.optim.AdamW8bit, lambda params: {}
    else:
        cls, fuses = torch.optim.AdamW, lambda params: {"fused": fused and len({id(p) for p in params}) == len(params)}
    unknown = sorted(set(groups) - set(lrs))
    if unknown:
        raise ValueError(f"no learning rate for parameter groups {unknown} (known: {sorted(lrs)})")
    with warnings.catch_warnings():  # optim.conv_in_lora_twice lists tensors twice on purpose
        warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
        return {
            name: cls(params, lr=lrs[name], betas=betas, weight_decay=weight_decay, eps=eps, **fuses(params))
            for name, params in groups.items()
        }


def build_schedulers(optimizers: list[torch.optim.Optimizer], name: str, warmup_steps: int, steps: int) -> list:
    """diffusers' learning-rate schedule ``name`` for each optimiser, over ``steps`` generator steps."""
    return [get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=max(1, steps)) for opt in optimizers]


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float | None) -> torch.Tensor:
    """Clip the optimiser's gradients to norm ``clip`` (none: measure only) and return the total norm (a
    tensor, not read here): finite exactly when every gradient is, so it also flags a skipped step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)


class SkipCounter:
    """Optimiser steps skipped for non-finite values, counted on the device so the training step never waits
    for it; ``report`` reads the counts (one host sync), which the loop does at log steps only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.first_step = 0  # the first training batch counted since the last report
        self.run: torch.Tensor | None = None  # skipped optimiser steps in a row, now
        self.worst: torch.Tensor | None = None  # the longest such run since the last report
        self.skipped: dict[str, torch.Tensor] = {}  # per parameter group, since the last report
        self.nonfinite: dict[str, dict[str, torch.Tensor]] = {}  # per group and loss term: seen non-finite

    def add(self, step: int, skipped: dict[str, torch.Tensor], losses: dict[str, dict[str, torch.Tensor]]) -> None:
        """Training batch ``step``: 1.0 per skipped step of each group, and each group's loss terms."""
        if not self.skipped:
            self.first_step = step
        n = sum(skipped.values())
        self.run = n if self.run is None else (self.run + n) * (n > 0)
        self.worst = self.run if self.worst is None else torch.maximum(self.worst, self.run)
        for group, flag in skipped.items():
            self.skipped[group] = self.skipped.get(group, 0) + flag
        for group, terms in losses.items():
            seen = self.nonfinite.setdefault(group, {})
            for name, value in terms.items():
                seen[name] = seen.get(name, False) | ~torch.isfinite(value.detach()).all()

    def report(self, step: int) -> None:
        """Warn about each group's skipped steps since the last report (training batches ``first_step`` to
        ``step``); raise NonFiniteLossError when ``limit`` optimiser steps in a row were skipped."""
        counts = {group: int(flag) for group, flag in self.skipped.items()}
        worst = int(self.worst) if self.worst is not None else 0
        causes = {group: [name for name, bad in terms.items() if bool(bad)] for group, terms in self.nonfinite.items()}
        span = f"step {step}" if step == self.first_step else f"steps {self.first_step}-{step}"
        for group, count in counts.items():
            if count:
                log.warning("%s: non-finite %s in the %s step; %d optimiser step(s) skipped", span,
                            ", ".join(causes.get(group) or ["gradient"]), group, count)
        self.worst, self.skipped, self.nonfinite = self.run, {}, {}
        if worst >= self.limit:
            raise NonFiniteLossError(
                f"{worst} consecutive non-finite steps ({span}: "
                f"{', '.join(f'{g} {c}' for g, c in counts.items() if c)} skipped) by step {step}; the last good "
                "checkpoint is kept. Lower the learning rate or raise optim.max_consecutive_bad_steps"
            )
