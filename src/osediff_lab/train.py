"""`python -m osediff_lab.train [overrides]`: train OSEDiff as configured in conf/ (Hydra)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from osediff_lab import resolvers  # registers ${run_id:...} before Hydra composes
from osediff_lab.checks import validate_config
from osediff_lab.data.datamodule import HQDataModule
from osediff_lab.data.degradation import build_degradation
from osediff_lab.export import export_lora
from osediff_lab.io import atomic_write_text
from osediff_lab.lit.callbacks import AtomicCheckpointIO, SampleGrid
from osediff_lab.lit.loggers import build_logger, close_logger
from osediff_lab.lit.module import OSEDiffModule
from osediff_lab.lit.resume import DataPosition, Preemption, RNGState, find_resume_checkpoint
from osediff_lab.lit.stats import RankReport, RunStats
from osediff_lab.lit.validation import best_checkpoint
from osediff_lab.lit.validation import trainer_kwargs as val_trainer_kwargs
from osediff_lab.models.components import build_components
from osediff_lab.models.osediff import build_osediff
from osediff_lab.models.perceptual import build_lpips
from osediff_lab.paths import CONF_DIR
from osediff_lab.prompts import build_prompt_provider

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> OSEDiffModule:
    """The LightningModule for a (validated) config."""
    parts = build_osediff(build_components(cfg.model), cfg.generator)
    lpips_model = build_lpips(cfg.loss.lpips, cfg.paths.weights_dir) if cfg.loss.lpips_weight > 0 else None
    return OSEDiffModule(
        parts, lpips_model, build_prompt_provider(cfg.get("prompt")), build_degradation(cfg.degradation, cfg.scale), cfg
    )


def build_callbacks(cfg: DictConfig, run_dir: Path) -> tuple[list[pl.Callback], SampleGrid]:
    cc = cfg.callbacks
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=cc.checkpoint.every_n_train_steps,
        save_last=cc.checkpoint.save_last,
        save_top_k=cc.checkpoint.save_top_k,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
    )
    samples = SampleGrid(run_dir / "samples", cc.samples.every_n_steps, cc.samples.num_images)
    fault_tolerance = [RNGState(), DataPosition(), Preemption(run_dir / "checkpoints" / "last.ckpt")]
    stats = RunStats(cfg.get("metric_defs"))
    best = [best_checkpoint(cc.checkpoint, run_dir / "checkpoints" / "best")] if cc.checkpoint.get("monitor") else []
    monitors = [stats, RankReport(run_dir / "ranks"), LearningRateMonitor(logging_interval="step")]
    return [ckpt, *best, samples, *monitors, *fault_tolerance], samples


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path`` if given; else, with ``resume=true``, the newest good checkpoint of this run directory."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if not cfg.get("resume", True):
        return None
    found = find_resume_checkpoint(run_dir / "checkpoints")
    if found is not None:
        log.warning("resuming automatically from %s (resume=false starts over)", found)
    return str(found) if found else None


def train(cfg: DictConfig) -> dict:
    """Validate, build, fit, export LoRA weights; returns the run summary (also written as summary.json)."""
    return run(cfg)[2]


def run(cfg: DictConfig) -> tuple[pl.Trainer, OSEDiffModule, dict]:
    """``train`` that also hands back the trainer and the trained module (tests, notebooks)."""
    validate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = HQDataModule(cfg.data, seed=cfg.seed, val=cfg.get("val"), scale=cfg.scale)
    datamodule.setup("fit")
    module = build_module(cfg)
    callbacks, samples = build_callbacks(cfg, run_dir)
    trainer = pl.Trainer(
        **(OmegaConf.to_container(cfg.trainer, resolve=True) | val_trainer_kwargs(cfg)),
        logger=build_logger(cfg, run_dir),
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule's ResumableRandomSampler shards over ranks itself
    )
    try:
        start = time.time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir))
        wall = time.time() - start

        summary = {
            "run_dir": str(run_dir),
            "task_name": cfg.task_name,
            "overrides": _overrides(),
            "steps": trainer.global_step,
            "wall_time_s": round(wall, 2),
        }
        if trainer.is_global_zero:
            lora, sidecar = export_lora(
                module.generator_state_dict(), cfg, module.lora_targets, run_dir / "lora" / "osediff_lora.safetensors"
            )
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
            stats = next(c for c in trainer.callbacks if isinstance(c, RunStats))
            summary |= stats.summary() | {
                "last_metrics": metrics,
                "lora": str(lora),
                "lora_sidecar": str(sidecar),
                "checkpoint_dir": str(run_dir / "checkpoints"),
                "samples_dir": str(samples.out_dir),
                "last_sample_grid": str(samples.last_path) if samples.last_path else None,
                "logger_dir": str(getattr(trainer.logger, "save_dir", run_dir)),
                "peak_memory_mb": _peak_memory_mb(),
            }
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
            _print_outputs(summary)
    finally:
        close_logger(trainer.logger)  # a W&B run left open would swallow the next job of a sweep
    return trainer, module, summary


def _overrides() -> list[str]:
    """The command-line overrides of this Hydra job (what distinguishes the runs of a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _print_outputs(summary: dict) -> None:
    print("\nosediff-lab: run finished")
    for label, key in (
        ("run directory", "run_dir"),
        ("LoRA weights", "lora"),
        ("LoRA sidecar", "lora_sidecar"),
        ("checkpoints", "checkpoint_dir"),
        ("sample grids", "samples_dir"),
        ("latest grid", "last_sample_grid"),
        ("logs (W&B/CSV)", "logger_dir"),
    ):
        print(f"  {label:15s} {summary[key]}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv = resolvers.quote_null_choices(sys.argv)
    main()
