"""EMA of the generator's trained tensors as a Lightning callback (``callbacks=ema``): updated after every
``every_n_steps``-th optimiser step, saved in checkpoints, used for validation and a second export when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl

from osediff_lab.ema import EMA


class EMACallback(pl.Callback):
    """Keeps ``EMA`` of the generator's trained tensors (``SRModule.ema_tensors``)."""

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = []
        if not 0 <= args.get("decay", 0.999) < 1:
            problems.append(f"callbacks.ema.decay={args['decay']} must be in [0, 1)")
        if args.get("every_n_steps", 1) < 1:
            problems.append(f"callbacks.ema.every_n_steps={args['every_n_steps']} must be >= 1")
        if args.get("warmup", 0) < 0:
            problems.append(f"callbacks.ema.warmup={args['warmup']} must be >= 0")
        return problems

    def __init__(self, decay: float = 0.999, warmup: int = 0, every_n_steps: int = 1, on_cpu: bool = False,
                 validate: bool = True, export: bool = True) -> None:
        self.decay, self.warmup, self.every = decay, warmup, every_n_steps
        self.on_cpu, self.validate, self.export = on_cpu, validate, export
        self.ema: EMA | None = None
        self.last_step = 0  # the optimiser step the EMA last saw
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before the shadow exists
        self._swap: contextlib.ExitStack | None = None

    def settings(self) -> dict[str, Any]:
        """What the EMA export's sidecar says about these weights."""
        return {"decay": self.decay, "warmup": self.warmup, "every_n_steps": self.every,
                "updates": self.ema.updates if self.ema else 0}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The shadow starts as the weights at the start of training (on their device, or the CPU)."""
        self.ema = EMA(pl_module.ema_tensors(), self.decay, self.warmup, "cpu" if self.on_cpu else None)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending["ema"])
            self.last_step = int(self._pending["last_step"])
            self._pending = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > self.last_step:  # an optimiser step happened (not every micro-batch steps)
            self.last_step = step
            if step % self.every == 0:
                self.ema.update(pl_module.ema_tensors())

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "last_step": self.last_step} if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's EMA: loaded now, or when the shadow is made at the start of fitting."""
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict
        else:
            self.ema.load_state_dict(state_dict["ema"])
            self.last_step = int(state_dict["last_step"])

    @contextlib.contextmanager
    def weights(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Inside, the generator runs with the EMA weights."""
        with self.ema.swapped(pl_module.ema_tensors()):
            yield

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate and self.ema is not None and not trainer.sanity_checking:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self.weights(pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swap is not None:
            self._swap.close()
            self._swap = None


def find_ema(trainer: pl.Trainer) -> EMACallback | None:
    """The trainer's EMA callback, if any."""
    return next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)

