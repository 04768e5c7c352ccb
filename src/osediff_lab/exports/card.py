"""The model card (``README.md`` of an export folder) through huggingface_hub's ``ModelCard`` / ``ModelCardData``: base
model, method, recipe (the command and the composed config), training data, steps, the validation table beside
bicubic, the run's sample grids, the base's licence, how to use the files, intended use and limits.

What a run wrote is read from its directory (``config.yaml``, ``summary.json``, ``samples/``); an export without one
(a LoRA file copied elsewhere) gets a card from its sidecar alone. ``card_problems`` validates a card offline:
huggingface_hub's ``ModelCard.validate`` posts the card to the Hub, so without network the card is parsed back with
``ModelCard.load`` and its metadata rebuilt strictly by ``ModelCardData`` (eval results included).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from omegaconf import DictConfig, OmegaConf

from osediff_lab.backbones import releases

CARD = "README.md"
IMAGES = "images"
RUN_MARKERS = ("summary.json", "config.yaml")


@dataclass
class RunRecord:
    """What a run directory tells the card: summary.json, the composed config and the newest sample grids."""

    run_dir: Path | None = None
    summary: dict = field(default_factory=dict)
    config_yaml: str | None = None
    images: list[Path] = field(default_factory=list)

    @classmethod
    def from_dir(cls, run_dir: Path | None, max_images: int) -> RunRecord:
        """The record of ``run_dir`` (an empty one for None); the last ``max_images`` sample grids."""
        if run_dir is None:
            return cls()
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
        grids = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
        return cls(run_dir, summary, config, grids[-max_images:] if max_images > 0 else [])


def find_run_dir(path: str | Path, depth: int = 3) -> Path | None:
    """The run directory an export or checkpoint at ``path`` came from: the nearest of its first ``depth`` ancestors
    holding summary.json or config.yaml (``<run>/lora/x.safetensors``, ``<run>/checkpoints/last.ckpt``)."""
    for parent in list(Path(path).resolve().parents)[:depth]:
        if any((parent / marker).is_file() for marker in RUN_MARKERS):
            return parent
    return None


def base_licence(base_name: str, card_cfg: DictConfig) -> tuple[str, str | None, str | None]:
    """(Hub licence id, the release's licence text or None, its repo or None) of the base model ``base_name`` (a
    release's weights group, e.g. sd21_base; ``card.licences`` maps groups to Hub ids, ``default`` for the others)."""
    ids = card_cfg.licences
    for _, release in releases():
        if release.group == base_name:
            return str(ids.get(release.group, ids.default)), release.licence, release.repo
    return str(ids.default), None, None


def validation_rows(summary: Mapping[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, last, best, bicubic) per validation metric of a summary (``val/<m>``; bicubic: ``val/bicubic_<m>``)."""
    last, best = summary.get("last_metrics", {}), summary.get("best_metrics", {})
    names = sorted(k.removeprefix("val/") for k in last if k.startswith("val/") and not k.startswith("val/bicubic_"))
    return [(m, last.get(f"val/{m}"), best.get(f"val/{m}"), last.get(f"val/bicubic_{m}")) for m in names]


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def method_name(sidecar: Mapping[str, Any]) -> str:
    """The class name of the method that trained the export (OSEDiff for sidecars naming none)."""
    return str((sidecar.get("method") or {}).get("_target_", "OSEDiff")).rsplit(".", 1)[-1]


def build_card(sidecar: Mapping[str, Any], run: RunRecord, fmt: str, usage: str, card_cfg: DictConfig) -> ModelCard:
    """The card of an export in format ``fmt`` (``usage``: markdown on loading its files) from its sidecar and run."""
    base = sidecar["base_model"]["name"]
    licence, licence_text, repo = base_licence(base, card_cfg)
    method, scale = method_name(sidecar), sidecar.get("scale")
    title = f"{method} x{scale} super-resolution on {base}"
    rows = validation_rows(run.summary)
    val_name = _config_value(run.config_yaml, "val", "name")
    eval_results = [EvalResult(task_type="image-to-image", dataset_type=val_name, dataset_name=val_name,
                               metric_type=m, metric_value=last) for m, last, _, _ in rows if last is not None]
    card_data = ModelCardData(
        model_name=title, license=licence, base_model=repo, library_name="diffusers" if fmt == "diffusers" else None,
        pipeline_tag="image-to-image", tags=[*card_cfg.tags, method.lower(), f"format-{fmt}"],
        eval_results=eval_results or None,
    )
    steps = run.summary.get("steps")
    overrides = run.summary.get("overrides")
    command = "python -m osediff_lab.train " + " ".join(overrides) if overrides is not None else None
    sections = [
        f"# {title}", "",
        f"One-step diffusion super-resolution (x{scale}) trained with osediff-lab by **{method}** "
        f"on the base model **{base}**{f' ([{repo}](https://huggingface.co/{repo}))' if repo else ''}: the low-quality "
        f"image, bicubic-upsampled, is encoded by the VAE, the denoiser runs once at timestep {sidecar.get('timestep')} "
        "and the VAE decodes the result. Weights: the method's LoRA (and any tensors it trains in full) over the "
        f"base, exported as `{fmt}`.", "",
        "## How to use", "", usage.strip(), "",
        "## Training", "",
        f"- method: `{(sidecar.get('method') or {}).get('_target_', 'OSEDiff')}`",
        f"- training data: {training_data(run.config_yaml)}",
        f"- steps: {steps if steps is not None else 'unknown (no summary.json beside the export)'}"
        + (f", wall time {run.summary['wall_time_s']:.0f} s" if "wall_time_s" in run.summary else ""),
        f"- prompt: {json.dumps(sidecar.get('prompt'))}",
        f"- config hash: `{sidecar.get('config_hash')}`",
    ]
    if command:
        sections += ["", "Command (re-running it in the same checkout resumes or reproduces the run):", "", "```bash", command, "```"]
    if run.config_yaml:
        sections += ["", "<details><summary>Composed config (config.yaml)</summary>", "", "```yaml",
                     run.config_yaml.rstrip(), "```", "", "</details>"]
    sections += ["", "## Validation", ""]
    if rows:
        sections += [f"At step {steps} (the run's held-out images; bicubic: plain bicubic upsampling of the same crops):", "",
                     "| metric | this model (last) | this model (best) | bicubic |", "|---|---|---|---|",
                     *[f"| {m} | {_number(last)} | {_number(best)} | {_number(bic)} |" for m, last, best, bic in rows]]
    else:
        sections.append("No validation metrics were recorded for this export (train with `val=...` to get them).")
    if run.images:
        sections += ["", "## Samples", "", "Rows: LQ (nearest) | bicubic | this model | HQ, from the run's sample grids.", ""]
        sections += [f"![{p.stem}]({IMAGES}/{p.name})" for p in run.images]
    sections += ["", "## Licence", "",
                 f"Inherited from the base model {base}: `{licence}`" + (f" ({licence_text})." if licence_text else ".")
                 + " " + str(card_cfg.licence_note), "",
                 "## Intended use and limits", "", str(card_cfg.intended_use).strip(), ""]
    return ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(sections))


def _config_value(config_yaml: str | None, *keys: str) -> str:
    """A value of a composed config's text (``unknown`` without one)."""
    node: Any = OmegaConf.create(config_yaml) if config_yaml else None
    for key in keys:
        node = node.get(key) if isinstance(node, DictConfig) else None
    return "unknown" if node is None else str(node)


def training_data(config_yaml: str | None) -> str:
    """The training set's name with its image list or root, and the degradation, from the composed config."""
    name = _config_value(config_yaml, "data", "name")
    where = _config_value(config_yaml, "data", "root")
    images = _config_value(config_yaml, "data", "images")
    detail = f" (root {where})" if where != "unknown" else (f" (images {images})" if images != "unknown" else "")
    return f"`{name}`{detail}, degradation `{_config_value(config_yaml, 'degradation', 'name')}`"


def write_card(folder: Path, card: ModelCard, run: RunRecord) -> Path:
    """``README.md`` in ``folder`` and the run's sample grids it shows under ``images/``."""
    if run.images:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        for image in run.images:
            shutil.copyfile(image, folder / IMAGES / image.name)
    path = folder / CARD
    card.save(path)
    return path


def card_problems(path: Path) -> list[str]:
    """What is wrong with the card at ``path``, offline: it must parse (``ModelCard.load``), its metadata must rebuild
    strictly (``ModelCardData``: eval results need their fields) and name a licence, and every image it shows must
    exist beside it."""
    try:
        card = ModelCard.load(path)
        data = card.data.to_dict()
        ModelCardData(**data)  # raises on malformed eval results / model-index
    except Exception as exc:  # huggingface_hub raises ValueError and friends; the caller reports them
        return [f"{path}: {type(exc).__name__}: {exc}"]
    problems = [] if data.get("license") else [f"{path}: metadata names no licence"]
    for line in card.text.splitlines():
        if line.startswith("![") and "](" in line:
            target = line.split("](", 1)[1].rstrip(")")
            if not (path.parent / target).is_file():
                problems.append(f"{path}: image {target} is missing")
    return problems
