"""Fault tolerance plumbing: find a good checkpoint to resume, restore RNG and data position, and
checkpoint-then-stop on preemption signals (SIGTERM, SIGUSR1, SIGUSR2)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from osediff_lab.lit.distributed import gather_objects, own_rank_state

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a preemption signal; the requeued attempt continues the run


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
    """Gives each DDP rank its own random stream and resumes every rank's stream exactly.

    At fit start rank r > 0 reseeds torch / numpy / python with ``seed + r`` (rank 0, and so a single
    process, keeps the stream ``seed_everything`` started), so VSD and regularizer timesteps, noise and VAE
    posterior samples differ between ranks. Each checkpoint stores the torch / numpy / python / CUDA RNG
    states of every rank (gathered); after a resume each rank restores its own right before its first
    batch. States are tensors and plain values, so checkpoints load with ``weights_only=True``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.global_rank > 0:
            seed_streams(self.seed + trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_objects(local_rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = own_rank_state(state_dict, "RNG state")

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


def seed_streams(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def local_rng_state() -> dict[str, Any]:
    """This process's torch / numpy / python (and CUDA) RNG states as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
    """On SIGTERM / SIGUSR1 / SIGUSR2 (what Slurm sends before a kill or a time limit): finish the current
    step, write last.ckpt and stop, unless the run is already at ``max_steps`` (then it just finishes).

    Every rank takes the same decision: the signal numbers are reduced after each step (on the CPU, over
    gloo), so ranks that got the signal at different moments still stop after the same step. Handlers are installed before
    any work (``install``) and again over Lightning's at train start; ``release`` puts back the ones found
    first, and ``hand_over`` lets the job's scheduler requeue a preempted run (submitit's handler, or
    ``scontrol requeue`` for a time-limit signal in a plain Slurm job). The caller then exits with
    ``PREEMPTED_EXIT_CODE`` and writes no summary: the final attempt does."""

    def __init__(self, checkpoint_path: Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: int | None = None
        self.preempted = False
        self._original: dict[int, Any] = {}  # the handlers found by the first install
        self._group: Any = None  # the gloo process group the ranks agree over (None: the default group)

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("received %s: checkpointing after this step, then stopping", signal.Signals(signum).name)
        self.received = signum

    def install(self) -> None:
        """Catch the preemption signals from now on (remembering the handlers found the first time)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPTION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            previous = signal.signal(sig, self._handler)
            self._original.setdefault(sig, previous)

    def release(self) -> None:
        """Restore the handlers that were there before the first ``install``."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._original.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.install()  # over Lightning's own SIGTERM handler, which would raise mid-step
        if trainer.world_size > 1:  # all ranks are here: the one place to make a group collectively
            gloo = torch.distributed.get_backend() == "gloo"
            self._group = None if gloo else torch.distributed.new_group(backend="gloo")

    def agreed_signal(self, world_size: int) -> int:
        """The highest signal number any rank received (0: none). Across ranks by a max all-reduce of a CPU
        tensor over gloo, so this per-step check never waits for the GPU's queue."""
        if world_size == 1:
            return self.received or 0
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        signum = self.agreed_signal(trainer.world_size)
        if signum == 0:
            return
        self.received = self.received or signum
        if not getattr(pl_module, "between_steps", True):  # mid gradient accumulation: stop after the step
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            log.warning("%s at max_steps=%d: finishing the run instead of requeueing it",
                        signal.Signals(signum).name, trainer.max_steps)
            return
        trainer.save_checkpoint(self.checkpoint_path)
        log.warning("preemption checkpoint written to %s at step %d; stopping", self.checkpoint_path, trainer.global_step)
        self.preempted = True
        trainer.should_stop = True

    def hand_over(self, global_rank: int) -> None:
        """After a preempted fit: let the scheduler bring the job back. A time-limit signal (USR1/USR2) goes
        to the handler that was there before (submitit checkpoints its call and requeues); in a plain Slurm
        job rank 0 requeues it. SIGTERM needs nothing: Slurm itself sent it (requeue, preemption, scancel)."""
        signum = self.received
        if signum is None or signum == signal.SIGTERM:
            return
        previous = self._original.get(signum)
        if callable(previous):
            with contextlib.suppress(SystemExit):  # submitit exits after requeueing; the caller exits with its own code
                previous(signum, None)
            return
        job = slurm_job_id()
        if job and global_rank == 0:
            log.warning("requeueing Slurm job %s after %s", job, signal.Signals(signum).name)
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)


def slurm_job_id() -> str | None:
    """This Slurm job's id as scontrol names it (``<array>_<task>`` for an array element), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


# Keys that may differ between the attempts of one run: stop rule, machine, output and logging settings.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.devices", "trainer.num_nodes", "trainer.enable_progress_bar",
                     "trainer.log_every_n_steps", "paths", "resume", "ckpt_path", "strict_images", "logger", "callbacks.samples",
                     "data.num_workers", "val.every_n_steps")


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every value that differs between two resolved configs, leaving out
    ``RESUMABLE_CHANGES`` and keys the saved config does not have (settings added to the lab since)."""
    changes = []
    for key, old in saved.items():
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES or key not in current:
            continue
        new = current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, name + ".")
        elif old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def checkpoint_meta(path: str | Path) -> tuple[dict | None, int]:
    """(the resolved config a training checkpoint was written with, or None; its global step), in one read."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return (ckpt.get("hyper_parameters") or {}).get("config"), int(ckpt.get("global_step", 0))
