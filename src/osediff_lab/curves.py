"""Per-step curves of runs for ``report``: seeds aggregated per arm (mean +- std), paired differences against a baseline
arm at every validation step, and reference envelopes (per-step min / max / mean over seeds) a run is checked against.

Pure functions over plain data: a run's curves are ``{quantity: {step: value}}`` (its CSV journal, ``run_curves``)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Curve = dict[int, float]
REFERENCE_DIR = Path(__file__).parent / "assets" / "reference_curves"
# what a reference envelope holds: the health telemetry (lit/health.py) and the validation metrics
REFERENCE_PREFIXES = ("train/grad_zh_", "train/grad_norm_", "train/fit_", "train/d_accuracy", "train/d_logit_",
                      "train/loss_", "val/psnr", "val/ssim", "val/niqe")


def mean_std(values: Iterable[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1; None for one value) and count."""
    values = list(values)
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def fmt_mean_std(stats: tuple[float, float | None, int] | None, digits: int = 3) -> str:
    """``mean +- std`` (or the mean alone for one value; ``-`` for none)."""
    if stats is None:
        return "-"
    mean, std, _ = stats
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def seed_of(overrides: Iterable[str], key: str = "seed") -> str | None:
    """The value of ``key`` among a run's overrides (``seed=2``), or None."""
    for o in overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


def arm_label(overrides: Iterable[str], keys: Iterable[str]) -> str:
    """A run's arm: its values of the study's varying ``keys`` (the seed left out), ``k=v`` joined by spaces."""
    given = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in overrides}
    return " ".join(f"{k}={given.get(k, '(default)')}" for k in keys)


def by_arm(runs: list[dict], keys: list[str], seed_key: str = "seed") -> dict[str, dict[str, dict]]:
    """Runs grouped ``{arm: {seed: run}}`` by their varying override ``keys`` other than ``seed_key``."""
    arm_keys = [k for k in keys if k != seed_key]
    out: dict[str, dict[str, dict]] = {}
    for r in runs:
        overrides = r.get("overrides", [])
        out.setdefault(arm_label(overrides, arm_keys), {})[seed_of(overrides, seed_key) or "(default)"] = r
    return out


def aggregate_final(arms: Mapping[str, Mapping[str, dict]], metrics: list[str]) -> dict[str, dict[str, tuple]]:
    """Per arm and metric: mean +- std over seeds of each run's last value (``last_metrics``)."""
    out = {}
    for arm, seeds in arms.items():
        out[arm] = {}
        for m in metrics:
            values = [r.get("last_metrics", {}).get(m) for r in seeds.values()]
            values = [v for v in values if v is not None]
            if values:
                out[arm][m] = mean_std(values)
    return out


def paired_differences(curves: Mapping[str, Mapping[str, Curve]], baseline: str) -> dict[str, dict[int, tuple]]:
    """Per arm other than ``baseline`` and per step: mean +- std over seeds of (arm - baseline) on the same seed;
    ``curves`` is ``{arm: {seed: {step: value}}}`` of one quantity. A step counts the seeds both arms have there."""
    base = curves[baseline]
    out = {}
    for arm, seeds in curves.items():
        if arm == baseline:
            continue
        steps = sorted({s for seed, c in seeds.items() if seed in base for s in c if s in base[seed]})
        out[arm] = {s: mean_std(c[s] - base[seed][s] for seed, c in seeds.items() if seed in base and s in c and s in base[seed])
                    for s in steps}
    return out


def envelope(curves: Iterable[Curve]) -> dict[str, list]:
    """Per step held by every curve: the min, max and mean over the curves (a reference envelope)."""
    curves = list(curves)
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {"steps": steps, "min": [min(c[s] for c in curves) for s in steps],
            "max": [max(c[s] for c in curves) for s in steps],
            "mean": [statistics.fmean(c[s] for c in curves) for s in steps]}


def first_exit(curve: Curve, env: Mapping[str, list], margin: float = 0.0, persist: int = 1) -> dict[str, float] | None:
    """The first step of the envelope from which ``curve`` lies outside [min, max] (widened on each side by ``margin`` x
    (max - min)) at ``persist`` consecutive steps both hold, with its value and bounds there; None when it never does."""
    run: list[dict[str, float]] = []
    for step, lo, hi in zip(env["steps"], env["min"], env["max"], strict=True):
        if step not in curve:
            continue
        pad = margin * (hi - lo)
        if math.isfinite(curve[step]) and lo - pad <= curve[step] <= hi + pad:
            run = []
            continue
        run.append({"step": step, "value": curve[step], "min": lo, "max": hi})
        if len(run) >= persist:
            return run[0]
    return None


def run_curves(run_dir: Path, prefixes: tuple[str, ...] = REFERENCE_PREFIXES) -> dict[str, Curve]:
    """A run's logged quantities starting with one of ``prefixes``, per step, from its CSV journal (csv/metrics.csv)."""
    from osediff_lab.lit.loggers import journal_rows

    out: dict[str, Curve] = {}
    for step, row in journal_rows(Path(run_dir) / "csv"):
        for key, value in row.items():
            if key.startswith(prefixes):
                out.setdefault(key, {})[step] = value
    return out


def reference(runs_curves: list[dict[str, Curve]], about: dict[str, Any]) -> dict[str, Any]:
    """A reference file's content: ``about`` (recipe, seeds) and the envelope of every quantity all runs logged."""
    names = sorted(set.intersection(*(set(c) for c in runs_curves))) if runs_curves else []
    return about | {"quantities": {n: envelope(c[n] for c in runs_curves) for n in names}}


def load_reference(name_or_path: str) -> dict[str, Any]:
    """A reference file: a path, or a name in the package's ``assets/reference_curves`` (``nano_osediff``)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = REFERENCE_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise SystemExit(f"no reference curves '{name_or_path}': give a file or one of {shipped}")
    return json.loads(path.read_text())


def exits(curves: Mapping[str, Curve], ref: Mapping[str, Any], margin: float, persist: int = 1) -> list[dict[str, Any]]:
    """Where a run leaves the reference: per quantity both hold, the first step from which it stays outside the
    envelope ``persist`` steps (``first_exit``), earliest first."""
    found = []
    for name, env in ref["quantities"].items():
        if name in curves:
            hit = first_exit(curves[name], env, margin, persist)
            if hit is not None:
                found.append({"quantity": name} | hit)
    return sorted(found, key=lambda e: (e["step"], e["quantity"]))
