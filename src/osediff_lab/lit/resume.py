"""Fault tolerance plumbing: find a good checkpoint to resume, restore RNG and data position, and
checkpoint-then-stop on preemption signals (SIGTERM, SIGUSR1, SIGUSR2)."""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def checkpoint_is_loadable(path: Path) -> str | None:
    """None when ``path`` is a complete Lightning checkpoint, else the reason it is not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, corrupt, or not a torch file at all
        return f"{type(exc).__name__}: {exc}"
    missing = [k for k in ("state_dict", "global_step", "optimizer_states", "loops") if k not in ckpt]
    return f"missing {missing}" if missing else None


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest loadable checkpoint in ``checkpoint_dir`` (last.ckpt first), skipping corrupt ones loudly."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True)
    for path in candidates:
        problem = checkpoint_is_loadable(path)
        if problem is None:
            return path
        log.error("checkpoint %s is corrupt or truncated (%s); trying the previous one", path, problem)
    return None


class RNGState(pl.Callback):
    """Saves torch / numpy / python / CUDA RNG states with each checkpoint and restores them right
    before the first batch after a resume, so the resumed run draws the same random numbers."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        np.random.set_state(self._pending["numpy"])
        random.setstate(self._pending["python"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


class DataPosition(pl.Callback):
    """On resume mid-epoch, tell the resumable sampler how many of this epoch's batches were done."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        sampler = getattr(trainer.datamodule, "sampler", None)
        if done and sampler is not None:
            sampler.skip_next(done * trainer.datamodule.cfg.batch_size)
            log.info("resuming epoch %d after %d batches", trainer.current_epoch, done)


class Preemption(pl.Callback):
    """On SIGTERM / SIGUSR1 / SIGUSR2 (what Slurm sends before a kill): finish the current step, write
    last.ckpt, stop cleanly, then hand the signal to whoever handled it before (Lightning's SLURM
    requeue, submitit's requeue), so the job comes back and resumes automatically."""

    def __init__(self, checkpoint_path: Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: checkpointing after this step, then stopping", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        for name in PREEMPTION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.received is None:
            return
        trainer.save_checkpoint(self.checkpoint_path)
        log.warning("preemption checkpoint written to %s; stopping", self.checkpoint_path)
        trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        signum, self.received = self.received, None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if signum is not None:
            previous = self._previous.get(signum)
            if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
                previous(signum, None)
