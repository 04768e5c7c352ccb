"""The training loop's bookkeeping around the step (``osediff_lab.step``): learning-rate schedules per group and
the non-finite policy's skip counts, kept on the device and read at log steps."""

from __future__ import annotations

import logging

import torch
from diffusers.optimization import get_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


def build_schedulers(optimizers: list[torch.optim.Optimizer], name: str, warmup_steps: int, steps: int) -> list:
    """diffusers' learning-rate schedule ``name`` for each optimiser, over ``steps`` generator steps."""
    return [get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=max(1, steps)) for opt in optimizers]


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
