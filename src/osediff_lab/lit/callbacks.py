"""Callbacks: sample grids (LQ | bicubic | output | HQ), atomic checkpoint writing, step progress."""

from __future__ import annotations

import errno
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ProgressBar
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from osediff_lab.io import atomic_write

log = logging.getLogger(__name__)


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (or quota); the earlier checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into memory, then write a temporary file and rename: a kill or a full disk mid-write leaves
    the previous file intact. Serialising first makes a full disk an OSError(ENOSPC) from the file write
    (torch.save straight to a file reports it as an opaque RuntimeError), turned into a DiskFullError."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        path = Path(path)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getbuffer()))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = max(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
            last = f"the last good checkpoint is kept: {kept}" if kept else "no earlier checkpoint exists"
            raise DiskFullError(
                exc.errno,
                f"No space left on {path.parent}: {path} not written ({buf.getbuffer().nbytes / 2**20:.1f} MiB); {last}. "
                "Free space and re-run the same command to resume",
            ) from exc


class StepProgress(ProgressBar):
    """Training progress in steps of ``trainer.max_steps`` (never epochs): a bar on a terminal, otherwise
    (a log file, CI, nohup) one flushed line every ``every`` steps and at the end."""

    def __init__(self, every: int = 10, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every = max(1, int(every))
        self.stream = stream
        self.enabled = True
        self.bar: tqdm | None = None
        self.started = 0.0
        self.first_step = 0
        self.last_step = -1
        self.printed = -1

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and trainer.is_global_zero

    def _metrics(self, trainer: pl.Trainer, pl_module) -> str:
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        self.started, self.first_step, self.last_step = time.monotonic(), trainer.global_step, trainer.global_step
        if self._out().isatty():
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step", file=self._out(),
                            dynamic_ncols=True)
        else:
            print(f"train: step {trainer.global_step}/{trainer.max_steps}", file=self._out(), flush=True)

    def _line(self, trainer: pl.Trainer, pl_module) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(total - step) / rate:.0f}s" if rate > 0 else ""
        return f"train: step {step}/{total} ({100 * step / total:.0f}%), {rate:.2f} step/s{eta}  {self._metrics(trainer, pl_module)}".rstrip()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._active(trainer) or step == self.last_step:
            return
        self.last_step = step
        if self.bar is not None:
            if step % self.every == 0:  # reading the metrics waits for the device: at log steps only
                self.bar.set_postfix_str(self._metrics(trainer, pl_module), refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step >= trainer.max_steps:
            self._print(trainer, pl_module)

    def _print(self, trainer: pl.Trainer, pl_module) -> None:
        self.printed = trainer.global_step
        print(self._line(trainer, pl_module), file=self._out(), flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self._active(trainer) and self.printed != trainer.global_step:
            self._print(trainer, pl_module)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` (and at the end) save a PNG grid: rows of LQ (nearest, to show its pixels) |
    bicubic upsampling | SR | HQ.

    Uses the first training batch seen, so grids over time show the same images; SR comes from the
    module's inference pipeline, i.e. what ``infer`` would produce with the weights of that step.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int, num_images: int) -> None:
        self.out_dir = Path(out_dir)
        self.every = every_n_steps
        self.num = num_images
        self.fixed: dict[str, Any] | None = None
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.num <= 0:  # callbacks.samples.num_images=0: no grids at all
            return
        if self.fixed is None:
            self.fixed = {k: batch[k][: self.num].detach().float().clone() for k in ("lq", "lq_up", "hq")}
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0:
            self.write(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.fixed is not None:
            self.write(trainer, pl_module, trainer.global_step)

    def write(self, trainer: pl.Trainer, pl_module, step: int) -> None:
        if not trainer.is_global_zero:
            return
        f = {k: (v + 1) / 2 for k, v in self.fixed.items()}  # [-1, 1] -> [0, 1]
        sr = pl_module.inference_pipeline().enhance(f["lq"])[0]
        lq_px = torch.nn.functional.interpolate(f["lq"], size=f["hq"].shape[-2:], mode="nearest").clamp(0, 1)
        rows = torch.stack([lq_px, f["lq_up"].clamp(0, 1), sr.to(f["hq"].device), f["hq"]], dim=1).flatten(0, 1)
        grid = make_grid(rows.cpu(), nrow=4, padding=2)
        path = self.out_dir / f"step_{step:06d}.png"
        try:
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
        except OSError as exc:
            log.error("sample grid not written: %s", exc)
            return
        self.last_path = path
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="samples/lq_sr_hq", images=[str(path)])  # joins the row of this step's metrics
