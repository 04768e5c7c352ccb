"""`python -m osediff_lab.evaluate sr_dir=... gt_dir=...`: the paper's metrics on a folder of SR images.

Writes per_image.csv, summary.json and results.md to ``out_dir``. Images are matched by file name (any
Pillow format, 8 or 16 bit); a size mismatch is an error naming the file unless ``center_crop=true``.
Metrics whose weight files are missing are reported as unavailable before any image is read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from osediff_lab.data.images import image_size, list_images
from osediff_lab.errors import ConfigError
from osediff_lab.io import atomic_write_text
from osediff_lab.metrics import MetricDef, MetricSuite, center_crop, load_image01, metric_defs
from osediff_lab.paths import CONF_DIR

log = logging.getLogger(__name__)


def match_by_name(sr_dir: str | Path, gt_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, SR path, GT path) matched by relative path without extension; unmatched files are an error."""
    sr_dir, gt_dir = Path(sr_dir).expanduser(), Path(gt_dir).expanduser()
    for key, d in (("sr_dir", sr_dir), ("gt_dir", gt_dir)):
        if not d.is_dir():
            raise ConfigError(f"evaluate: {key}={d} is not a directory")
    srs = {p.relative_to(sr_dir).with_suffix("").as_posix(): p for p in list_images(sr_dir)}
    gts = {p.relative_to(gt_dir).with_suffix("").as_posix(): p for p in list_images(gt_dir)}
    if not srs:
        raise ConfigError(f"evaluate: no images in sr_dir={sr_dir}")
    unmatched = [f"{srs[k]} has no GT in {gt_dir}" for k in sorted(set(srs) - set(gts))]
    unmatched += [f"{gts[k]} has no SR in {sr_dir}" for k in sorted(set(gts) - set(srs))]
    if unmatched:
        more = f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise ConfigError("evaluate: files not matched by name: " + "; ".join(unmatched[:5]) + more)
    return [(k, srs[k], gts[k]) for k in sorted(srs)]


def common_sizes(pairs: list[tuple[str, Path, Path]], allow_crop: bool) -> dict[str, tuple[int, int]]:
    """Per name, the (height, width) both images are compared at; a mismatch without ``allow_crop`` is an error."""
    sizes = {}
    for name, sr, gt in pairs:
        (sw, sh), (gw, gh) = image_size(sr), image_size(gt)
        if (sw, sh) != (gw, gh) and not allow_crop:
            raise ConfigError(
                f"evaluate: size mismatch for {sr} ({sw}x{sh}) vs {gt} ({gw}x{gh}); fix the SR output or set "
                "center_crop=true to compare the centred common region"
            )
        sizes[name] = (min(sh, gh), min(sw, gw))
    return sizes


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_table(summary: dict) -> str:
    """One row per configured metric: mean (and direction) or the unavailable reason."""
    lines = [f"# Evaluation: {summary['count']} images", "", f"- SR: `{summary['sr_dir']}`", f"- GT: `{summary['gt_dir']}`"]
    if summary["center_cropped"]:
        lines.append(f"- NOTE: {len(summary['center_cropped'])} pair(s) differed in size and were centre-cropped (center_crop=true)")
    lines += ["", "| metric | value | better | images |", "|---|---|---|---|"]
    for name, m in summary["metrics"].items():
        arrow = "lower" if m["lower_better"] else "higher"
        if m["value"] is None:
            lines.append(f"| {name} | unavailable: {m['unavailable']} | {arrow} | 0 |")
        else:
            lines.append(f"| {name} | {_fmt(m['value'])} | {arrow} | {m['n']} |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def evaluate_folders(
    sr_dir: str | Path,
    gt_dir: str | Path,
    defs: list[MetricDef],
    weights_dir: str | Path,
    out_dir: str | Path,
    allow_center_crop: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Score every SR image against its GT (files in [0, 1] once read) and write CSV, JSON and markdown."""
    pairs = match_by_name(sr_dir, gt_dir)
    sizes = common_sizes(pairs, allow_center_crop)
    suite = MetricSuite(defs, weights_dir, device)
    for u in suite.unavailable:
        print(u.message)
    cropped, rows = [], []
    for name, sr_path, gt_path in tqdm(pairs, desc="evaluate", unit="img", disable=not progress):
        sr, gt = load_image01(sr_path), load_image01(gt_path)
        h, w = sizes[name]
        if sr.shape[-2:] != gt.shape[-2:]:
            cropped.append(name)
            sr, gt = center_crop(sr, h, w), center_crop(gt, h, w)
        scores = suite.score(sr[None], gt[None])
        rows.append({"name": name, "sr": str(sr_path), "gt": str(gt_path), "height": h, "width": w} | {k: v[0] for k, v in scores.items()})
    folder_scores = suite.score_folders(sr_dir, gt_dir) if suite.folder else {}

    metrics = {}
    for d in defs:
        entry: dict = {"lower_better": d.lower_better, "pyiqa": d.pyiqa, "options": d.options}
        if d.name in suite.per_image:
            entry |= {"value": _mean([r[d.name] for r in rows]), "n": len(rows)}
        elif d.name in folder_scores:
            entry |= {"value": folder_scores[d.name], "n": len(rows)}
        else:
            reason = next(u for u in suite.unavailable if u.name == d.name)
            entry |= {"value": None, "n": 0, "unavailable": reason.reason}
        metrics[d.name] = entry
    summary = {
        "sr_dir": str(sr_dir),
        "gt_dir": str(gt_dir),
        "count": len(rows),
        "center_crop": allow_center_crop,
        "center_cropped": cropped,
        "metrics": metrics,
        "unavailable": [u.name for u in suite.unavailable],
    }
    out = Path(out_dir)
    columns = ["name", "sr", "gt", "height", "width", *suite.per_image]
    atomic_write_text(out / "per_image.csv", _csv_text(rows, columns))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", markdown_table(summary))
    return summary


def generate_sr(cfg: DictConfig, out: Path) -> tuple[Path, Path]:
    """Super-resolve ``cfg.val``'s LR images with ``cfg.checkpoint`` (the inference pipeline, conf ``pipeline``)
    into ``out/sr`` (each with its prompt as .txt); links the matching HR files into ``out/gt``. Returns (sr_dir, gt_dir)."""
    from osediff_lab.data.datamodule import paired_dataset
    from osediff_lab.infer import super_resolve_file
    from osediff_lab.pipeline import OSEDiffPipeline

    if cfg.val.get("name", "none") == "none":
        raise ConfigError("evaluate: checkpoint=... needs a paired benchmark to super-resolve: add val=realsr (or drealsr, div2k_val)")
    pairs = paired_dataset(cfg.val, int(cfg.scale)).pairs
    pipe = OSEDiffPipeline.from_checkpoint(cfg.checkpoint, base=cfg.get("base"), options=cfg.get("pipeline"))
    sr_dir, gt_dir = out / "sr", out / "gt"
    sr_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for lr, hr in tqdm(pairs, desc="super-resolve", unit="img", disable=not cfg.progress):
        super_resolve_file(pipe, lr, sr_dir / lr.stem)
        link = gt_dir / hr.name
        if not link.exists():
            link.symlink_to(hr.resolve())
    return sr_dir, gt_dir


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured evaluation: on ``sr_dir``/``gt_dir``, or on SR images generated from ``checkpoint``."""
    defs = metric_defs(cfg.metric_defs, list(cfg.metrics))
    out = Path(cfg.out_dir)
    if cfg.get("checkpoint"):
        sr_dir, gt_dir = generate_sr(cfg, out)
    elif cfg.get("sr_dir") and cfg.get("gt_dir"):
        sr_dir, gt_dir = cfg.sr_dir, cfg.gt_dir
    else:
        raise ConfigError("evaluate: set sr_dir=<SR folder> gt_dir=<ground truth folder>, or checkpoint=<file> val=realsr")
    summary = evaluate_folders(sr_dir, gt_dir, defs, cfg.paths.weights_dir, out, bool(cfg.center_crop), str(cfg.device), bool(cfg.progress))
    print(markdown_table(summary))
    print(f"outputs: {out}/per_image.csv, summary.json, results.md")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
