"""Experiment loggers: W&B (offline by default) with a local CSV fallback that never crashes a run."""

from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from osediff_lab.io import atomic_write_text

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """The configured logger; if W&B cannot start (no key online, unwritable dir), warn once and use CSV."""
    lc = cfg.logger
    if lc.name == "csv":
        return _csv(run_dir)
    if lc.name != "wandb":
        raise ValueError(f"logger.name must be 'wandb' or 'csv', got '{lc.name}'")
    mode = str(lc.mode)
    try:
        os.makedirs(run_dir, exist_ok=True)
        logger = WandbLogger(
            project=lc.project,
            group=lc.group,
            tags=list(lc.tags),
            job_type=lc.job_type,
            save_dir=str(run_dir),
            mode=mode,
            id=_wandb_run_id(run_dir),
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        _ = logger.experiment  # start the run now, so a broken setup falls back here, not mid-training
        return logger
    except Exception as exc:  # any W&B failure must degrade to local logging
        log.warning("W&B logging unavailable (%s: %s); logging to CSV under %s instead", type(exc).__name__, exc, run_dir)
        return _csv(run_dir)


def close_logger(logger: Logger | None) -> None:
    """Finish the W&B run of this job: wandb keeps one global run per process, and a sweep's next job
    in the same process would otherwise keep logging into it."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that continues an existing metrics.csv after a resume: Lightning's writer deletes
    the file when it starts, which would lose every row logged before a kill."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        previous = path.read_bytes() if path.is_file() else None
        exp = super().experiment
        if previous:
            path.write_bytes(previous)
            header = next(csv.reader(previous.decode().splitlines()), [])
            exp.metrics_keys = sorted(set(exp.metrics_keys) | set(header))
        return exp


def _csv(run_dir: Path) -> CSVLogger:
    """CSV metrics flushed every step, so a killed run loses no logged value."""
    return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)


def _wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run directory: a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    atomic_write_text(path, run_id)
    return run_id
