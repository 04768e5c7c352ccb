"""Callbacks: sample grids (LQ | output | HQ) and atomic checkpoint writing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torchvision.utils import make_grid, save_image

from osediff_lab.io import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file, then rename: a kill mid-write leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` (and at the end) save a PNG grid: rows of LQ-upsampled | SR | HQ.

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
        rows = torch.stack([f["lq_up"].clamp(0, 1), sr.to(f["hq"].device), f["hq"]], dim=1).flatten(0, 1)
        grid = make_grid(rows.cpu(), nrow=3, padding=2)
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
