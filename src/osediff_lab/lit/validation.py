"""Validation during training: super-resolve a paired benchmark, score it with the configured metrics,
log their means as ``val/<metric>`` (so ModelCheckpoint can monitor them) and, on W&B, a table of
LQ / SR / HQ images. Scores are exact means over all images, also across DDP ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from osediff_lab.data.resize import upsample_to
from osediff_lab.errors import ConfigError
from osediff_lab.metrics import MetricSuite, metric_defs

log = logging.getLogger(__name__)


def val_enabled(cfg: DictConfig) -> bool:
    """True when ``cfg.val`` names a benchmark (``val=none`` or no val group disables validation)."""
    val = cfg.get("val")
    return val is not None and val.get("name", "none") != "none"


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments for validation every ``val.every_n_steps`` generator steps (one batch = one step),
    counted across epochs; validation off entirely when disabled."""
    if not val_enabled(cfg):
        return {"limit_val_batches": 0}
    every = int(cfg.val.every_n_steps)
    if every < 1:
        raise ConfigError(f"val.every_n_steps={every} must be >= 1 (or use val=none)")
    return {"val_check_interval": every, "check_val_every_n_epoch": None}


def best_checkpoint(cc: DictConfig, dirpath: Path) -> ModelCheckpoint:
    """Keeps the ``cc.best_k`` checkpoints by ``cc.monitor`` (e.g. val/psnr), saved right after each validation."""
    return ModelCheckpoint(
        dirpath=dirpath,
        monitor=cc.monitor,
        mode=cc.mode,
        save_top_k=int(cc.best_k),
        every_n_epochs=1,
        save_on_train_epoch_end=False,
        filename="best-step{step:06d}",
        auto_insert_metric_name=False,
    )


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 for image logging."""
    return (x01.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def table_rows(examples: list[dict], metrics: list[str], step: int) -> tuple[list[str], list[list]]:
    """Columns and rows (step, name, LQ, SR, HQ as uint8 arrays, per-image scores) for an image table."""
    columns = ["step", "name", "LQ", "SR", "HQ", *metrics]
    rows = [[step, e["name"], to_uint8(e["lq"]), to_uint8(e["sr"]), to_uint8(e["hq"]), *[e[m] for m in metrics]] for e in examples]
    return columns, rows


class Validator:
    """Scores one validation pass; the metric networks live here, not in the LightningModule's state."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg.val
        defs = metric_defs(cfg.metric_defs, list(self.cfg.metrics))
        folder = [d.name for d in defs if d.mode == "fid"]
        if folder:
            raise ConfigError(f"val.metrics: {folder} compare folders of images; run them with `python -m osediff_lab.evaluate`")
        self.suite = MetricSuite(defs, cfg.paths.weights_dir, "cpu")
        for u in self.suite.unavailable:
            log.warning("validation metric %s is not computed: %s", u.name, u.reason)
        self.reset()

    @property
    def metrics(self) -> list[str]:
        return self.suite.per_image

    def reset(self) -> None:
        self.scores: dict[str, list[float]] = {m: [] for m in self.metrics}
        if self.cfg.get("bicubic_baseline"):  # val/bicubic_<metric>: plain bicubic upsampling, same crops
            self.scores |= {f"bicubic_{m}": [] for m in self.metrics}
        self.examples: list[dict] = []

    @torch.no_grad()
    def step(self, module: pl.LightningModule, batch: dict[str, Any]) -> torch.Tensor:
        """Super-resolve one batch (``lq``/``hq`` in [-1, 1]), record per-image scores; returns the scored SR in [0, 1]."""
        lq01, hq01 = to_unit(batch["lq"]), to_unit(batch["hq"])
        sr01 = module.inference_pipeline().enhance(lq01)[0]
        if self.cfg.quantize_8bit:  # score what a saved 8-bit PNG would hold, as `evaluate` does
            sr01 = (sr01 * 255).round() / 255
        if self.suite.device != module.device:
            self.suite.to(module.device)
        scores = self.suite.score(sr01, hq01)
        for m, values in scores.items():
            self.scores[m].extend(values)
        if self.cfg.get("bicubic_baseline"):
            bic01 = to_unit(upsample_to(batch["lq"], batch["hq"].shape[-2:]))
            bic01 = (bic01 * 255).round() / 255 if self.cfg.quantize_8bit else bic01
            for m, values in self.suite.score(bic01, hq01).items():
                self.scores[f"bicubic_{m}"].extend(values)
        for i in range(sr01.shape[0]):
            if len(self.examples) >= int(self.cfg.log_images):
                break
            self.examples.append(
                {"name": batch["name"][i], "lq": lq01[i].cpu(), "sr": sr01[i].cpu(), "hq": hq01[i].cpu()}
                | {m: scores[m][i] for m in self.metrics}
            )
        return sr01

    def means(self, module: pl.LightningModule) -> dict[str, float]:
        """Mean of every metric over all images of all ranks (sums and counts are gathered, not means),
        and ``num_images``: how many images were scored in all (each rank scores its own share)."""
        out = {}
        for m, values in self.scores.items():
            local = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=module.device)
            gathered = module.all_gather(local)
            total = gathered.reshape(-1, 2).sum(0)
            if total[1] > 0:
                out[m] = float(total[0] / total[1])
                out["num_images"] = float(total[1])
        return out

    def epoch_end(self, module: pl.LightningModule) -> dict[str, float]:
        """Log ``val/<metric>`` means (and the W&B image table on rank 0), then reset."""
        means = self.means(module)
        for m, value in means.items():
            key = "val_info/num_images" if m == "num_images" else f"val/{m}"  # a count, not a metric to rank by
            module.log(key, value, prog_bar=m == self.metrics[0], rank_zero_only=False)
        if isinstance(module.logger, WandbLogger) and module.trainer.is_global_zero and self.examples:
            import wandb

            columns, rows = table_rows(self.examples, self.metrics, module.global_step)
            data = [[r[0], r[1], *[wandb.Image(a) for a in r[2:5]], *r[5:]] for r in rows]
            module.logger.log_table(key="val/images", columns=columns, data=data)
        self.reset()
        return means


def build_validator(cfg: DictConfig) -> Validator | None:
    """A Validator for ``cfg.val``, or None when validation is off."""
    return Validator(cfg) if val_enabled(cfg) else None
