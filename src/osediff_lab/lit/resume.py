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
    """The most recently written loadable checkpoint in ``checkpoint_dir``, skipping corrupt ones loudly."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        problem = checkpoint_is_loadable(path)
        if problem is None:
            return path
        log.error("checkpoint %s is corrupt or truncated (%s); trying the previous one", path, problem)
    return None


class RNGState(pl.Callback):
    """Saves torch / numpy / python / CUDA RNG states with each checkpoint and restores them right
    before the first batch after a resume, so the resumed run draws the same random numbers.
    States are stored as tensors and plain values, so checkpoints load with ``weights_only=True``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        name, keys, pos, has_gauss, gauss = self._pending["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(self._pending["python"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


class DataPosition(pl.Callback):
    """Counts the batches trained in the current epoch and saves (epoch, batches) with each checkpoint;
    on resume it tells the datamodule where to restart, before Lightning builds the loader.

    Must come before any callback that saves in ``on_train_batch_end`` (ModelCheckpoint is always
    ordered last by Lightning; Preemption is listed after this one)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self._restored = False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.batches = state_dict["epoch"], state_dict["batches"]
        self._restored = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if self._restored and hasattr(datamodule, "resume_at"):
            datamodule.resume_at(self.epoch, self.batches)
            log.info("data position restored: epoch %d after %d batches", self.epoch, self.batches)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self._restored and trainer.current_epoch == self.epoch:
            self._restored = False
            return
        self._restored = False
        self.epoch, self.batches = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.batches += 1


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
