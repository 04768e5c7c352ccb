"""Training-health telemetry: named warnings from the quantities the loop logs at log steps (each loss term's
gradient at the generator output, discriminator accuracy, every further group's loss), each threshold a key of
``health.warnings``. Reads only the metrics of log steps, which are read back there anyway."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)
TERM_GRAD = "train/grad_zh_"  # + term: the weighted term's gradient norm at z_H (SRModule.optimize_batch)
FIT = "train/fit_"  # + group: its loss over a fresh LoRA's on the same sample (OSEDiff.health_metrics)


@dataclass
class HealthRules:
    """The warning rules over a stream of (step, metrics) at log steps; ``warnings`` keeps each one's first message."""

    term_ratio: float = 40.0
    term_ratio_steps: int = 300
    d_accuracy: float = 0.99
    d_accuracy_steps: int = 500
    rising_window: int = 5
    rising_ratio: float = 1.5
    fit_max: float = 1.25
    groups: tuple[str, ...] = ()  # the further parameter groups, whose losses are train/loss_<group>
    warnings: dict[str, dict[str, Any]] = field(default_factory=dict)
    _since: dict[str, int] = field(default_factory=dict)
    _history: dict[str, deque] = field(default_factory=dict)

    def observe(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Apply every rule to one log step's metrics; returns the warnings first raised at this step."""
        raised = []
        grads = {k[len(TERM_GRAD):]: v for k, v in metrics.items() if k.startswith(TERM_GRAD)}
        for big, g_big in grads.items():
            for small, g_small in grads.items():
                if big == small:
                    continue
                ratio = g_big / g_small if g_small > 0 else float("inf")
                raised += self._held(f"term_ratio:{big}:{small}", step, ratio >= self.term_ratio, self.term_ratio_steps,
                                     lambda since, r=ratio, b=big, s=small: (
                                         f"{b.upper()} gradient is {r:.0f}x {s.upper()}'s at z_H since step {since}"))
        if "train/d_accuracy" in metrics:
            raised += self._held("d_accuracy", step, metrics["train/d_accuracy"] >= self.d_accuracy, self.d_accuracy_steps,
                                 lambda since: (f"D accuracy >= {self.d_accuracy} for {step - since} steps since step {since}: "
                                                "the generator gets no signal"))
        for group in self.groups:
            if f"{FIT}{group}" in metrics:
                raised += self._rising(group, step, metrics[f"{FIT}{group}"], fit=True)
            elif f"train/loss_{group}" in metrics:
                raised += self._rising(group, step, metrics[f"train/loss_{group}"])
        return raised

    def _held(self, rule: str, step: int, holds: bool, span: int, message) -> list[str]:
        """A condition that must hold at every log step for ``span`` steps before it warns."""
        if not holds:
            self._since.pop(rule, None)
            return []
        since = self._since.setdefault(rule, step)
        if step - since >= span and rule not in self.warnings:
            return [self._warn(rule, step, message(since))]
        return []

    def _rising(self, group: str, step: int, value: float, fit: bool = False) -> list[str]:
        """A group's loss whose mean over the last ``rising_window`` log steps exceeds the window before by
        ``rising_ratio``; with ``fit`` the value is its loss over a fresh LoRA's on the same sample (the generator's
        drift cancels out), which also warns when that window's mean is above ``fit_max``."""
        history = self._history.setdefault(group, deque(maxlen=2 * self.rising_window))
        history.append((step, value))
        rule, n = f"rising:{group}", self.rising_window
        if len(history) < n or rule in self.warnings:
            return []
        values = [v for _, v in history]
        after, first = values[-n:], history[-n][0]
        mean_after = sum(after) / n
        unit = "x a fresh LoRA's on the same noised latents" if fit else ""
        if fit and mean_after > self.fit_max:
            return [self._warn(rule, step, f"{group} loss rising: {mean_after:.2f}{unit} over steps {first}-{step} "
                                           f"(above health.warnings.fit_max={self.fit_max})")]
        if len(history) < 2 * n:
            return []
        mean_before = sum(values[:n]) / n
        if mean_before > 0 and mean_after > self.rising_ratio * mean_before:
            return [self._warn(rule, step, f"{group} loss rising: mean {mean_after:.4g}{unit} over steps {first}-{step}, "
                                           f"{mean_before:.4g} over the {n} log steps before")]
        return []

    def _warn(self, rule: str, step: int, message: str) -> str:
        self.warnings[rule] = {"step": step, "message": message}
        log.warning("health: %s", message)
        return message

    def state_dict(self) -> dict[str, Any]:
        return {"warnings": self.warnings, "since": self._since,
                "history": {k: list(v) for k, v in self._history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warnings, self._since = dict(state["warnings"]), dict(state["since"])
        self._history = {k: deque([tuple(x) for x in v], maxlen=2 * self.rising_window) for k, v in state["history"].items()}


class HealthMonitor(pl.Callback):
    """Feeds the module's step metrics at log steps (``trainer.log_every_n_steps``) to ``HealthRules``; the run's
    summary gets ``health`` (``summary()``) and the end-of-run message its warnings."""

    def __init__(self, rules: HealthRules, every: int) -> None:
        self.rules, self.every = rules, max(1, int(every))
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.rules.groups = tuple(g for g in pl_module.groups if g != "generator")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = pl_module.batches_trained - 1
        if (step + 1) % self.every or not outputs:  # only log steps: values there are read back anyway
            return
        self.last = {k: v for k, v in outputs.items() if k.startswith("train/") and isinstance(v, float)}  # read back once
        self.rules.observe(step, self.last)

    def state_dict(self) -> dict[str, Any]:
        return self.rules.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rules.load_state_dict(state_dict)

    def summary(self) -> dict[str, Any]:
        """The ``health`` block of summary.json: the warnings raised (with their first step) and the last values."""
        watched = {k: v for k, v in self.last.items() if k.startswith((TERM_GRAD, FIT, "train/grad_norm", "train/d_", "train/loss_"))}
        return {"warnings": [w["message"] for w in self.rules.warnings.values()], "first_steps":
                {rule: w["step"] for rule, w in self.rules.warnings.items()}, "last": watched}
