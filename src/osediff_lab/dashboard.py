"""A W&B workspace definition for a study, generated from its experiment config: the study's group (its
runs), one line panel per validation metric and per loss term on the generator-step axis with the arms
(the sweep's parameters) side by side, the per-validation image tables (LQ | SR | HQ and per-image
scores) and the sample grids. ``python -m osediff_lab.report --wandb-workspace ablate_rank --out ws.json``.

The definition is plain JSON, one section per topic; it mirrors the structure of the ``wandb-workspaces``
library (runset filter and grouping, sections of panels), which can build the workspace from it on a
connected machine. Nothing here needs the network."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from osediff_lab.lit.loggers import STEP_KEY, override_key

LOSS_TERMS = ("total", "l2", "lpips", "vsd", "reg")


def experiment_config(experiment: str) -> DictConfig:
    """The composed train config of ``+experiment=<experiment>``, with its hydra node (the sweep)."""
    from hydra import compose, initialize_config_dir

    from osediff_lab import resolvers  # noqa: F401  (registers the resolvers the config uses)
    from osediff_lab.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={experiment}"], return_hydra_config=True)


def sweep_arms(cfg: DictConfig) -> dict[str, list[str]]:
    """The sweep's parameters and their values (``hydra.sweeper.params``), e.g. {"loss": ["osediff", "no_vsd"]}."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return {str(k): [v.strip() for v in str(values).split(",")] for k, values in params.items()}


def line_panel(metric: str, arms: list[str], lower_better: bool | None = None) -> dict[str, Any]:
    panel = {"type": "line", "title": metric, "x": STEP_KEY, "y": [metric], "group_by": arms, "smoothing": 0.0}
    if lower_better is not None:
        panel["better"] = "lower" if lower_better else "higher"
    return panel


def workspace_definition(experiment: str) -> dict[str, Any]:
    """The workspace of one study: see the module docstring."""
    cfg = experiment_config(experiment)
    arms = sweep_arms(cfg)
    group_by = [f"config.overrides.{override_key(k)}" for k in arms]  # where the logger records each job's overrides
    val_metrics = list(OmegaConf.select(cfg, "val.metrics") or [])
    defs = cfg.get("metric_defs") or {}
    sections = []
    if val_metrics:
        sections.append({"name": "validation", "panels": [
            line_panel(f"val/{m}", group_by, bool((defs.get(m) or {}).get("lower_better", False))) for m in val_metrics]})
        sections.append({"name": "validation images", "panels": [
            {"type": "table", "title": "LQ | SR | HQ per arm", "key": "val/images", "columns":
             ["step", "name", "LQ", "SR", "HQ", *val_metrics], "group_by": group_by, "layout": "side_by_side"}]})
    sections.append({"name": "training", "panels": [line_panel(f"train/loss_{t}", group_by) for t in LOSS_TERMS]
                     + [line_panel("train/vsd_weight_factor", group_by)]})
    sections.append({"name": "samples", "panels": [
        {"type": "media", "title": "LQ | output | HQ", "key": "samples/lq_sr_hq", "group_by": group_by}]})
    return {
        "name": f"{cfg.task_name}: {', '.join(arms) or 'single run'}",
        "project": str(cfg.logger.get("project", "osediff-lab")),
        "runset": {"filters": {"group": str(OmegaConf.select(cfg, "logger.group", default=cfg.task_name)),
                               "job_type": str(OmegaConf.select(cfg, "logger.job_type", default="train"))},
                   "grouping": group_by},
        "arms": arms,
        "sections": sections,
    }
