"""Run statistics for the final summary: loss means/variances and the best value of each validation metric."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from osediff_lab.io import atomic_write_text


class RunStats(pl.Callback):
    """Welford mean/variance of every ``train/loss_*`` (the VSD loss oscillates: its variance is a
    study result), best-so-far of every ``val/*`` metric (direction from ``metric_defs``) and the last
    value of every scalar metric.

    All of it travels in the checkpoints, with the wall time and the number of attempts so far, so the
    summary of a run that was preempted and resumed covers every attempt, not only the last one. The
    wall time of an attempt counts from this callback's creation to its last checkpoint (or the end)."""

    def __init__(self, metric_defs: DictConfig | None) -> None:
        self.metric_defs = metric_defs or {}
        self.loss: dict[str, list[float]] = {}  # name -> [count, mean, M2]
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.pending: list[dict[str, torch.Tensor]] = []  # train/ scalars of batches not yet folded in
        self.started = time.monotonic()
        self.earlier_wall_s = 0.0  # wall time of the earlier attempts, from the checkpoint resumed
        self.earlier_attempts = 0

    @property
    def wall_time_s(self) -> float:
        """Wall time of all attempts up to now."""
        return self.earlier_wall_s + time.monotonic() - self.started

    @property
    def attempts(self) -> int:
        """Attempts of this run, this one included."""
        return self.earlier_attempts + 1

    def state_dict(self) -> dict:
        self.flush()
        return {"loss": self.loss, "best": self.best, "last": self.last, "wall_time_s": self.wall_time_s,
                "attempts": self.attempts}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loss, self.best = state_dict["loss"], state_dict["best"]
        self.last = state_dict.get("last", {})
        self.earlier_wall_s = float(state_dict.get("wall_time_s", 0.0))
        self.earlier_attempts = int(state_dict.get("attempts", 0))

    def _record_last(self, trainer: pl.Trainer, prefix: str) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and torch.is_tensor(value) and value.numel() == 1:
                self.last[key] = float(value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Keep the batch's ``train/*`` scalars (``outputs``: the module's step metrics) as they are, on the
        device, and fold them in at log steps: reading them every batch would make the host wait each step."""
        self.pending.append({k: v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
                             for k, v in (outputs or {}).items() if k.startswith("train/")})
        if len(self.pending) >= trainer.log_every_n_steps:
            self.flush()

    def flush(self) -> None:
        """Fold the pending batches into the statistics with one read of all their values."""
        if not self.pending:
            return
        flat = [(key, value) for batch in self.pending for key, value in batch.items()]
        self.pending = []
        if not flat:
            return
        device = next((v.device for _, v in flat if v.device.type != "cpu"), torch.device("cpu"))  # one copy back
        values = torch.stack([value.float().reshape(()).to(device) for _, value in flat]).tolist()
        for (key, _), x in zip(flat, values, strict=True):
            self.last[key] = x
            if key.startswith("train/loss_") and math.isfinite(x):
                n, mean, m2 = self.loss.get(key, [0, 0.0, 0.0])
                n += 1
                delta = x - mean
                mean += delta / n
                m2 += delta * (x - mean)
                self.loss[key] = [n, mean, m2]

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._record_last(trainer, "val/")
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val/") or not torch.is_tensor(value):
                continue
            defs = self.metric_defs.get(key.removeprefix("val/"), {})
            lower = bool(defs.get("lower_better", False))
            x = float(value)
            old = self.best.get(key)
            if old is None or (x < old if lower else x > old):
                self.best[key] = x

    def summary(self) -> dict:
        """Loss statistics, best and last metrics, wall time and attempts over every attempt of the run."""
        self.flush()
        losses = {k: {"mean": m, "var": m2 / (n - 1) if n > 1 else 0.0, "count": n} for k, (n, m, m2) in self.loss.items()}
        return {"loss_stats": losses, "best_metrics": dict(self.best), "last_metrics": dict(self.last),
                "wall_time_s": round(self.wall_time_s, 2), "attempts": self.attempts}


class RankReport(pl.Callback):
    """In multi-process runs, each rank writes ranks/rank<r>.json: the sample paths it trained on and a
    sha256 of its trained tensors, so a user (or a test) can see the ranks agree on weights and split data."""

    def __init__(self, out_dir) -> None:
        from pathlib import Path

        self.out_dir = Path(out_dir)
        self.paths: list[str] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size > 1:
            self.paths.extend(str(p) for p in batch.get("path", []))

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        import hashlib
        import json

        def sha256(tensors: dict) -> str:
            digest = hashlib.sha256()
            for name, tensor in sorted(tensors.items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            return digest.hexdigest()

        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "paths": self.paths,
                  "trained_sha256": sha256(pl_module.trained_state_dict()),
                  "generator_sha256": sha256(pl_module.generator_state_dict()),
                  "global_step": trainer.global_step}
        report |= {f"{stem}_sha256": sha256(tensors) for stem, tensors in pl_module.method.extra_exports().items()}
        atomic_write_text(self.out_dir / f"rank{trainer.global_rank}.json", json.dumps(report, indent=1))
