"""`python -m osediff_lab.evaluate sr_dir=... gt_dir=...`: the paper's metrics on a folder of SR images.

Writes per_image.csv (the scored pairs), summary.json (means, and a ``failed`` list of pairs with the
reason) and results.md to ``out_dir``. Images are matched by file name and read by the one loader
(``osediff_lab.data.images``). A pair that cannot be scored (unreadable file, size mismatch without
``center_crop=true``, too small for a metric) is reported and the others are scored; the exit status is 1
when any pair failed. ``allow_subset=true`` scores an SR folder that covers only part of the GT folder.
Metrics whose weight files are missing are reported as unavailable before any image is read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from osediff_lab.data.images import UnreadableImage, list_images
from osediff_lab.errors import ConfigError, user_errors
from osediff_lab.io import atomic_write_text
from osediff_lab.metrics import MetricDef, MetricError, MetricSuite, center_crop, load_image01, metric_defs
from osediff_lab.paths import CONF_DIR, resolve_dir
from osediff_lab.tables import markdown_table

log = logging.getLogger(__name__)


def match_by_name(sr_dir: str | Path, gt_dir: str | Path, allow_subset: bool = False) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, SR path, GT path) matched by relative path without extension, and the GT names left out.

    SR images without GT are an error; GT images without SR are an error unless ``allow_subset``; the error
    names every unmatched file of both folders. Relative folders missing from the working directory are taken
    from the repository root (as data roots are)."""
    sr_dir, gt_dir = resolve_dir(sr_dir), resolve_dir(gt_dir)  # ~ expanded; ../shared/... also from elsewhere
    for key, d in (("sr_dir", sr_dir), ("gt_dir", gt_dir)):
        if not d.is_dir():
            raise ConfigError(f"evaluate: {key}={d} is not a directory")
    srs = {p.relative_to(sr_dir).with_suffix("").as_posix(): p for p in list_images(sr_dir)}
    gts = {p.relative_to(gt_dir).with_suffix("").as_posix(): p for p in list_images(gt_dir)}
    if not srs:
        raise ConfigError(f"evaluate: no images in sr_dir={sr_dir}")
    no_gt = sorted(set(srs) - set(gts))
    left_out = sorted(set(gts) - set(srs))
    if no_gt or (left_out and not allow_subset):
        raise ConfigError(unmatched_message(
            [srs[k] for k in no_gt], gt_dir, [] if allow_subset else [gts[k] for k in left_out], sr_dir, len(srs) - len(no_gt)
        ))
    return [(k, srs[k], gts[k]) for k in sorted(srs)], left_out


def unmatched_message(no_gt: list[Path], gt_dir: Path, no_sr: list[Path], sr_dir: Path, matched: int) -> str:
    """The error for files not matched by name: every SR image without GT and every GT image without SR, one a line."""
    lines = ["evaluate: files not matched by name (by relative path without extension):"]
    lines += [f"  {p} has no GT in {gt_dir}" for p in no_gt]
    lines += [f"  {p} has no SR in {sr_dir}" for p in no_sr]
    if no_sr:
        lines.append(f"set allow_subset=true to score only the {matched} GT image(s) that have an SR image")
    return "\n".join(lines)


def read_pair(sr_path: Path, gt_path: Path, allow_crop: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both images in [0, 1] at a common size, and whether they were centre-cropped to it.

    Raises UnreadableImage for a file that cannot be used, ValueError for a size mismatch without ``allow_crop``."""
    sr, gt = load_image01(sr_path), load_image01(gt_path)
    if sr.shape == gt.shape:
        return sr, gt, False
    (sh, sw), (gh, gw) = sr.shape[-2:], gt.shape[-2:]
    if not allow_crop:
        raise ValueError(
            f"size mismatch: {sr_path} ({sw}x{sh}) vs {gt_path} ({gw}x{gh}); fix the SR output or set center_crop=true "
            "to compare the centred common region"
        )
    h, w = min(sh, gh), min(sw, gw)
    return center_crop(sr, h, w), center_crop(gt, h, w), True


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def evaluation_report(summary: dict) -> str:
    """One row per configured metric: mean (and direction) or why there is none; then the failed pairs."""
    lines = [f"# Evaluation: {summary['count']} images", "", f"- SR: `{summary['sr_dir']}`", f"- GT: `{summary['gt_dir']}`"]
    if summary["center_cropped"]:
        lines.append(f"- NOTE: {len(summary['center_cropped'])} pair(s) differed in size and were centre-cropped (center_crop=true)")
    if summary["left_out"]:
        lines.append(f"- NOTE: subset: {len(summary['left_out'])} GT image(s) have no SR image and were left out (allow_subset=true)")
    if summary["failed"]:
        lines.append(f"- FAILED: {len(summary['failed'])} pair(s) could not be scored (listed below)")
    rows = [
        [name, f"unavailable: {m['unavailable']}" if m["value"] is None else _fmt(m["value"]),
         "lower" if m["lower_better"] else "higher", 0 if m["value"] is None else m["n"]]
        for name, m in summary["metrics"].items()
    ]
    lines += ["", *markdown_table(["metric", "value", "better", "images"], rows)]
    if summary["failed"]:
        lines += ["", "## Not scored", ""] + [f"- `{f['name']}`: {f['reason']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def score_pairs(
    pairs: list[tuple[str, Path, Path]], suite: MetricSuite, allow_crop: bool, progress: bool
) -> tuple[list[dict], list[dict], list[str]]:
    """Per-image rows of the pairs that could be scored, the failed pairs with their reason, the cropped names."""
    rows, failed, cropped = [], [], []
    for name, sr_path, gt_path in tqdm(pairs, desc="evaluate", unit="img", disable=not progress):
        try:
            sr, gt, was_cropped = read_pair(sr_path, gt_path, allow_crop)
            small = suite.too_small(*sr.shape[-2:])
            if small:
                raise ValueError("; ".join(small))
            scores = suite.score(sr[None], gt[None])
        except (UnreadableImage, ValueError, MetricError) as exc:
            reason = str(exc)
            failed.append({"name": name, "sr": str(sr_path), "gt": str(gt_path), "reason": reason})
            tqdm.write(f"evaluate: not scored {name}: {reason}")
            continue
        if was_cropped:
            cropped.append(name)
        h, w = sr.shape[-2:]
        rows.append({"name": name, "sr": str(sr_path), "gt": str(gt_path), "height": h, "width": w} | {k: v[0] for k, v in scores.items()})
    return rows, failed, cropped


def score_folder_metrics(suite: MetricSuite, rows: list[dict]) -> dict[str, float]:
    """FID-like metrics over exactly the scored pairs (linked into temporary folders)."""
    if not suite.folder or not rows:
        return {}
    with tempfile.TemporaryDirectory(prefix="osediff_eval_") as tmp:
        sr_dir, gt_dir = Path(tmp) / "sr", Path(tmp) / "gt"
        sr_dir.mkdir()
        gt_dir.mkdir()
        for i, r in enumerate(rows):
            (sr_dir / f"{i:06d}{Path(r['sr']).suffix}").symlink_to(Path(r["sr"]).resolve())
            (gt_dir / f"{i:06d}{Path(r['gt']).suffix}").symlink_to(Path(r["gt"]).resolve())
        return suite.score_folders(sr_dir, gt_dir)


def evaluate_folders(
    sr_dir: str | Path,
    gt_dir: str | Path,
    defs: list[MetricDef],
    weights_dir: str | Path,
    out_dir: str | Path,
    allow_center_crop: bool = False,
    device: str = "auto",
    progress: bool = True,
    allow_subset: bool = False,
    failed_before: list[dict] | None = None,
) -> dict:
    """Score every SR image against its GT (files in [0, 1] once read) and write CSV, JSON and markdown.

    ``failed_before`` are pairs that failed upstream (super-resolution), reported with the others."""
    pairs, left_out = match_by_name(sr_dir, gt_dir, allow_subset)
    suite = MetricSuite(defs, weights_dir, device)
    for u in suite.unavailable:
        print(u.message)
    rows, failed, cropped = score_pairs(pairs, suite, allow_center_crop, progress)
    failed = [*(failed_before or []), *failed]
    folder_scores = score_folder_metrics(suite, rows)

    metrics = {}
    for d in defs:
        entry: dict = {"lower_better": d.lower_better, "pyiqa": d.pyiqa, "options": d.options}
        if d.name in suite.per_image and rows:
            entry |= {"value": _mean([r[d.name] for r in rows]), "n": len(rows)}
        elif d.name in folder_scores:
            entry |= {"value": folder_scores[d.name], "n": len(rows)}
        elif d.name in suite.defs:
            entry |= {"value": None, "n": 0, "unavailable": "no pair could be scored (see failed)"}
        else:
            reason = next(u for u in suite.unavailable if u.name == d.name)
            entry |= {"value": None, "n": 0, "unavailable": reason.reason}
        metrics[d.name] = entry
    summary = {
        "sr_dir": str(sr_dir),
        "gt_dir": str(gt_dir),
        "count": len(rows),
        "failed": failed,
        "left_out": left_out,
        "allow_subset": allow_subset,
        "center_crop": allow_center_crop,
        "center_cropped": cropped,
        "metrics": metrics,
        "unavailable": [u.name for u in suite.unavailable],
    }
    out = Path(out_dir)
    columns = ["name", "sr", "gt", "height", "width", *suite.per_image]
    atomic_write_text(out / "per_image.csv", _csv_text(rows, columns))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", evaluation_report(summary))
    return summary


def generate_sr(cfg: DictConfig, out: Path) -> tuple[Path, Path, list[dict]]:
    """Super-resolve ``cfg.val``'s LR images with ``cfg.checkpoint`` (the inference pipeline, conf ``pipeline``)
    into ``out/sr`` (each with its prompt as .txt); links the matching HR files into ``out/gt``.

    Returns (sr_dir, gt_dir, failed): an LR image that fails is reported there and its HR is not linked."""
    from osediff_lab.data.paired import paired_dataset
    from osediff_lab.infer import try_super_resolve
    from osediff_lab.pipeline import SRPipeline

    if cfg.val.get("name", "none") == "none":
        raise ConfigError("evaluate: checkpoint=... needs a paired benchmark to super-resolve: add val=realsr (or drealsr, div2k_val)")
    pairs = paired_dataset(cfg.val, int(cfg.scale)).pairs
    pipe = SRPipeline.from_checkpoint(cfg.checkpoint, base=cfg.get("base"), options=cfg.get("pipeline"))
    sr_dir, gt_dir = out / "sr", out / "gt"
    sr_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for lr, hr in tqdm(pairs, desc="super-resolve", unit="img", disable=not cfg.progress):
        reason = try_super_resolve(pipe, lr, sr_dir / lr.stem)
        if reason:
            failed.append({"name": lr.stem, "sr": str(lr), "gt": str(hr), "reason": f"super-resolution failed: {reason}"})
            continue
        link = gt_dir / hr.name
        if not link.exists():
            link.symlink_to(hr.resolve())
    return sr_dir, gt_dir, failed


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured evaluation: on ``sr_dir``/``gt_dir``, or on SR images generated from ``checkpoint``."""
    defs = metric_defs(cfg.metric_defs, list(cfg.metrics))
    out = Path(cfg.out_dir)
    failed: list[dict] = []
    if cfg.get("checkpoint"):
        sr_dir, gt_dir, failed = generate_sr(cfg, out)
    elif cfg.get("sr_dir") and cfg.get("gt_dir"):
        sr_dir, gt_dir = cfg.sr_dir, cfg.gt_dir
    else:
        raise ConfigError("evaluate: set sr_dir=<SR folder> gt_dir=<ground truth folder>, or checkpoint=<file> val=realsr")
    summary = evaluate_folders(
        sr_dir, gt_dir, defs, cfg.paths.weights_dir, out, bool(cfg.center_crop), str(cfg.device), bool(cfg.progress),
        bool(cfg.get("allow_subset", False)), failed,
    )
    print(evaluation_report(summary))
    print(f"outputs: {out}/per_image.csv, summary.json, results.md")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    if evaluate(cfg)["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
