"""`python -m osediff_lab.train [overrides]`: train the configured method (`method=`: OSEDiff, PiSA-SR or any other)
on the configured backbone, as conf/ (Hydra) composes it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from osediff_lab import resolvers  # registers ${run_id:...} before Hydra composes
from osediff_lab.build import build
from osediff_lab.checks import validate_config
from osediff_lab.data.datamodule import HQDataModule
from osediff_lab.data.degradation import build_degradation
from osediff_lab.errors import USER_ERRORS, ConfigError, user_errors
from osediff_lab.export import write_run_card
from osediff_lab.io import atomic_write_text
from osediff_lab.lit.callbacks import AtomicCheckpointIO, SampleGrid, StepProgress
from osediff_lab.lit.ema import find_ema
from osediff_lab.lit.health import HealthMonitor, HealthRules
from osediff_lab.lit.loggers import build_logger, close_logger
from osediff_lab.lit.module import SRModule
from osediff_lab.lit.precision import precision_plugin
from osediff_lab.lit.resume import (
    PREEMPTED_EXIT_CODE,
    DataPosition,
    Preemption,
    RNGState,
    checkpoint_meta,
    config_changes,
    find_resume_checkpoint,
)
from osediff_lab.lit.stats import RankReport, RunStats
from osediff_lab.lit.validation import best_checkpoint
from osediff_lab.lit.validation import trainer_kwargs as val_trainer_kwargs
from osediff_lab.models.components import build_components
from osediff_lab.models.lora_files import export_from_checkpoint, export_lora, save_lora_tensors
from osediff_lab.models.perceptual import build_lpips
from osediff_lab.models.text import PromptEmbedder
from osediff_lab.paths import CONF_DIR
from osediff_lab.prompts import build_prompt_provider
from osediff_lab.prompts.cache import cached_text_encoders, run_prompts
from osediff_lab.report import clear_failure, record_failure

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> SRModule:
    """The LightningModule for a (validated) config: the ``method`` built by ``instantiate`` from the base model,
    the text encoder's cached embeddings and LPIPS (when the method weighs it)."""
    components = build_components(cfg.model)
    text = components.text
    if cfg.text_cache.enabled:  # embeddings from disk; keep_encoders=false lets T5 / CLIP go
        prompts = run_prompts(cfg.get("prompt"), cfg.method, cfg.text_cache.prompts)
        text = cached_text_encoders(cfg.text_cache, OmegaConf.to_container(cfg.model, resolve=True), int(cfg.seed), text, prompts)
    embedder = PromptEmbedder(text, max_cached=4096)
    lpips_model = build_lpips(cfg.loss.lpips, cfg.paths.weights_dir) if cfg.method.get("lpips_weight", 0) > 0 else None
    try:
        method = instantiate(cfg.method, components=components, encode_text=embedder, lpips=lpips_model, _recursive_=False)
    except InstantiationException as exc:  # Hydra wraps the method's own ConfigError: raise that one
        if isinstance(exc.__cause__, USER_ERRORS):
            raise exc.__cause__ from None
        raise
    return SRModule(
        method, text, embedder, build_prompt_provider(cfg.get("prompt")),
        build_degradation(cfg.degradation, cfg.scale), cfg,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path, preemption: Preemption) -> tuple[list[pl.Callback], SampleGrid]:
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
    fault_tolerance = [RNGState(cfg.seed), DataPosition(), preemption]
    stats = RunStats(cfg.get("metric_defs"))
    best = [best_checkpoint(cc.checkpoint, run_dir / "checkpoints" / "best")] if cc.checkpoint.get("monitor") else []
    rules = HealthRules(**OmegaConf.to_container(cfg.health.warnings, resolve=True))
    health = HealthMonitor(rules, cfg.trainer.get("log_every_n_steps", 10))
    monitors = [stats, health, RankReport(run_dir / "ranks")]  # learning rates: the module logs train/lr_*
    if cfg.trainer.get("enable_progress_bar", True):
        monitors.append(StepProgress(cfg.trainer.get("log_every_n_steps", 10)))  # steps of max_steps; lines in logs
    return [ckpt, *best, samples, *monitors, *fault_tolerance, *configured_callbacks(cc)], samples


def configured_callbacks(cc: DictConfig) -> list[pl.Callback]:
    """Every entry of ``callbacks`` that names its class (``_target_``), built from its keys (EMA: ``callbacks=ema``)."""
    return [build(entry, f"callbacks.{key}") for key, entry in cc.items()
            if isinstance(entry, DictConfig) and entry.get("_target_")]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int]:
    """(checkpoint to resume, its global step): ``ckpt_path`` if given; else, with ``resume=true``, the
    newest good checkpoint of this run directory, refused when it was trained with another config."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path), checkpoint_meta(cfg.ckpt_path)[1]
    if not cfg.get("resume", True):
        return None, 0
    found = find_resume_checkpoint(run_dir / "checkpoints")
    if found is None:
        return None, 0
    saved, step = checkpoint_meta(found)
    changes = config_changes(saved, OmegaConf.to_container(cfg, resolve=True)) if saved is not None else []
    if changes:
        raise ConfigError(
            f"{run_dir} holds a run trained with another config, so it is not resumed automatically:\n  - "
            + "\n  - ".join(changes[:20])
            + f"\nresume=false starts this run over; ckpt_path={found} resumes it with the new config deliberately"
        )
    return str(found), step


def export_best(trainer: pl.Trainer, out: Path) -> str | None:
    """With ``callbacks.checkpoint.monitor``: the LoRA export of the best checkpoint by that metric (the
    plain ``lora/`` export is the last step); None when no checkpoint was monitored."""
    monitored = [c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path]
    if not monitored:
        return None
    best = monitored[0]
    path, _ = export_from_checkpoint(best.best_model_path, out)
    log.info("best checkpoint by %s (%s) exported to %s", best.monitor, best.best_model_path, path)
    return str(path)


def train(cfg: DictConfig) -> dict:
    """Validate, build, fit, export LoRA weights; returns the run summary (also written as summary.json)."""
    return run(cfg)[2]


def already_trained(cfg: DictConfig, run_dir: Path, ckpt: str | None, step: int) -> dict | None:
    """The existing summary when ``ckpt``, the checkpoint the run resumes from, is at or past ``trainer.max_steps``
    (re-running a finished command must not overwrite it); None when there is training left to do."""
    if ckpt is None or step < cfg.trainer.max_steps:
        return None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"run_dir": str(run_dir), "steps": step}
    print(f"\nosediff-lab: {ckpt} is at step {step}, not below trainer.max_steps={cfg.trainer.max_steps}: nothing to "
          f"train, the run is left as it is ({summary_path if summary_path.is_file() else 'no summary.json yet'}). "
          "Raise trainer.max_steps to continue it, or set resume=false to start over.")
    return summary


def run(cfg: DictConfig) -> tuple[pl.Trainer | None, SRModule | None, dict]:
    """``train`` that also hands back the trainer and the trained module (tests, notebooks); both are None
    when the run is already at ``max_steps`` (``already_trained``).

    A run stopped by a preemption signal before ``max_steps`` writes its checkpoint but no summary and no
    LoRA export, lets the scheduler requeue it and exits with ``PREEMPTED_EXIT_CODE`` (SystemExit): the
    attempt that reaches ``max_steps`` writes them, with wall time and metrics of every attempt."""
    validate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt, step = resume_checkpoint(cfg, run_dir)
    done = already_trained(cfg, run_dir, ckpt, step)
    if done is not None:  # nothing to fit: no trainer or module is built
        return None, None, done
    if ckpt is not None and not cfg.get("ckpt_path"):
        log.warning("resuming automatically from %s (resume=false starts over)", ckpt)
    preemption = Preemption(run_dir / "checkpoints" / "last.ckpt")
    preemption.install()  # a signal while the model is built still stops the run after its first step
    try:
        trainer, module, summary = _fit(cfg, run_dir, preemption, ckpt)
    finally:
        preemption.release()
    if preemption.preempted:
        preemption.hand_over(trainer.global_rank)
        log.warning("run preempted at step %d of %d: checkpoint kept, no summary or export; the requeued "
                    "attempt resumes it", trainer.global_step, trainer.max_steps)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    return trainer, module, summary


def _fit(cfg: DictConfig, run_dir: Path, preemption: Preemption, ckpt: str | None) -> tuple[pl.Trainer, SRModule, dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = HQDataModule(cfg.data, seed=cfg.seed, val=cfg.get("val"), scale=cfg.scale)
    datamodule.setup("fit")
    module = build_module(cfg)
    callbacks, samples = build_callbacks(cfg, run_dir, preemption)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True) | val_trainer_kwargs(cfg)
    precision = precision_plugin(trainer_cfg.pop("precision", "32-true"), trainer_cfg.get("accelerator"))
    if cfg.generator.shard_frozen_base:  # DTensor layers (SRModule.configure_model): no wrap-time broadcast,
        trainer_cfg["strategy"] = DDPStrategy(init_sync=False)  # every rank built the same module from one seed
    trainer = pl.Trainer(
        **trainer_cfg,
        logger=build_logger(cfg, run_dir),
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(), precision],
        use_distributed_sampler=False,  # the datamodule's ResumableRandomSampler shards over ranks itself
    )
    summary: dict = {}
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        except SIGTERMException:  # Lightning's own SIGTERM path (a signal before our handlers took over)
            preemption.preempted = True
        if preemption.preempted:
            return trainer, module, summary
        stats = next(c for c in trainer.callbacks if isinstance(c, RunStats))
        summary = {
            "run_dir": str(run_dir),
            "task_name": cfg.task_name,
            "overrides": _overrides(),
            "steps": trainer.global_step,
            # unreadable training images (skipped at the scan, or in this process during training)
            "skipped_images": [
                {"path": p, "reason": r} for p, r in (datamodule.train_set.reasons | module.unreadable).items()
            ],
        } | stats.summary()
        summary["health"] = next(c for c in trainer.callbacks if isinstance(c, HealthMonitor)).summary()
        if trainer.is_global_zero:
            stem = module.method.export_stem
            lora, sidecar = export_lora(
                module.generator_state_dict(), cfg, module.lora_targets, run_dir / "lora" / f"{stem}.safetensors"
            )
            ema = find_ema(trainer)
            if ema is not None and ema.export:  # the same files with the EMA weights, beside the live ones
                with ema.weights(module):
                    ema_lora, _ = export_lora(module.generator_state_dict(), cfg, module.lora_targets,
                                              run_dir / "lora" / "ema" / f"{stem}.safetensors", ema.settings())
                summary["lora_ema"] = str(ema_lora)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
            summary |= {
                "last_metrics": summary["last_metrics"] | metrics,  # earlier attempts' values where this one has none
                "lora": str(lora),
                "lora_sidecar": str(sidecar),
                **{stem: str(save_lora_tensors(tensors, run_dir / "lora" / f"{stem}.safetensors", f"osediff-lab-{stem}/1"))
                   for stem, tensors in module.method.extra_exports().items()},
                "lora_best": export_best(trainer, run_dir / "lora" / "best" / f"{stem}.safetensors"),
                "checkpoint_dir": str(run_dir / "checkpoints"),
                "samples_dir": str(samples.out_dir),
                "last_sample_grid": str(samples.last_path) if samples.last_path else None,
                "logger_dir": str(getattr(trainer.logger, "save_dir", run_dir)),
                "peak_memory_mb": _peak_memory_mb(),
            }
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
            try:  # lora/README.md: reads summary.json, so after it; a card problem does not fail a finished run
                write_run_card(run_dir, Path(sidecar))
            except (ConfigError, OSError) as exc:
                log.error("model card not written: %s", exc)
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
    # run directories hold '=' and ',': Hydra needs the value quoted
    print(f"  try it          python -m osediff_lab.infer input=<image or folder> output=<folder> \"ckpt='{summary['lora']}'\"")
    for item in summary.get("skipped_images", []):
        print(f"  SKIPPED image  {item['path']}: {item['reason']}")
    for message in summary.get("health", {}).get("warnings", []):
        print(f"  HEALTH warning {message}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@user_errors
def main(cfg: DictConfig) -> dict:
    """The CLI: a failure is logged with its traceback (into the job's own log, not only the sweep's) and
    recorded in the run directory's failure.json for ``report``, then raised (non-zero exit). Returns the
    summary (a sweep's job table reads it). Unreadable training images that were skipped are logged and listed
    in summary.json; with ``strict_images=true`` a single run that skipped any exits with 1."""
    run_dir = Path(cfg.paths.output_dir)
    if not isinstance(cfg.strict_images, bool):
        raise ConfigError(f"strict_images={cfg.strict_images} must be true or false")
    try:
        summary = train(cfg)
    except Exception as exc:
        if not isinstance(exc, USER_ERRORS):  # those name their fix: logged once, without traceback, by user_errors
            log.exception("training failed: %s: %s", type(exc).__name__, exc)
        record_failure(run_dir, exc)
        raise
    clear_failure(run_dir)
    skipped = summary.get("skipped_images", [])
    if skipped:
        strict = cfg.strict_images and not _multirun()  # a sweep's jobs report through their summaries
        log.warning("%d training image(s) were unreadable and skipped, listed in summary.json%s:\n%s", len(skipped),
                    "; exit status 1 (strict_images=true)" if strict else "",
                    "\n".join(f"  {item['path']}: {item['reason']}" for item in skipped))
        if strict:
            raise SystemExit(1)
    return summary


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    resolvers.refuse_renamed_choices(sys.argv)
    main()
