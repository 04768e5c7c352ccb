"""`python -m osediff_lab.report <sweep dir | W&B group>`: a study's results table (+ a plot) from run summaries."""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

from osediff_lab.io import atomic_write_text
from osediff_lab.tables import markdown_table

PLOT_AXES = ("val/psnr", "val/musiq")
FAILURE_FILE = "failure.json"


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Write ``failure.json`` (error, traceback, Slurm job) into a run directory, for ``report``."""
    info = {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(traceback.format_exception(exc)),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(Path(run_dir) / FAILURE_FILE, json.dumps(info, indent=2))


def clear_failure(run_dir: Path) -> None:
    """A run that finished is no longer failed, whatever an earlier attempt recorded."""
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)


def load_local(sweep_dir: Path) -> list[dict]:
    """Every run summary (summary.json) under a sweep or run directory."""
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]


def unfinished_runs(sweep_dir: Path) -> list[dict]:
    """Runs Hydra started under ``sweep_dir`` (a ``.hydra/overrides.yaml``) that have no summary.json:
    failed (with the reason from failure.json) or missing (running, waiting for a requeue, or killed)."""
    from omegaconf import OmegaConf

    out = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        if (run_dir / "summary.json").is_file():
            continue
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        failure = run_dir / FAILURE_FILE
        if failure.is_file():
            reason = json.loads(failure.read_text())["error"]
            out.append({"run_dir": str(run_dir), "overrides": overrides, "status": "failed", "reason": reason})
        else:
            out.append({"run_dir": str(run_dir), "overrides": overrides, "status": "missing",
                        "reason": "no summary.json: still running, preempted and waiting for its requeue, or killed"})
    return out


def unfinished_table(runs: list[dict]) -> str:
    """Markdown: the runs without a result, each with its overrides, status and reason."""
    rows = [[Path(r["run_dir"]).name, " ".join(r["overrides"]), r["status"], r["reason"].splitlines()[0]] for r in runs]
    return "\n".join(markdown_table(["run", "overrides", "status", "reason"], rows)) + "\n"


def load_wandb(group: str, project: str) -> list[dict]:
    """Run summaries of a W&B group through the public API (needs network and a logged-in user)."""
    import wandb

    runs = wandb.Api().runs(project, filters={"group": group})
    out = []
    for r in runs:
        metrics = {k: v for k, v in r.summary.items() if isinstance(v, int | float)}
        out.append({"run_dir": r.name, "overrides": [f"{k}={v}" for k, v in r.config.items() if not isinstance(v, dict)],
                    "steps": r.summary.get("trainer/global_step"), "last_metrics": metrics, "best_metrics": {}})
    if not out:
        raise SystemExit(f"W&B group '{group}' in project '{project}' has no runs")
    return out


def varying_overrides(runs: list[dict]) -> list[str]:
    """Override keys whose values differ between runs: the study's independent variables."""
    values: dict[str, set[str]] = {}
    for r in runs:
        for o in r.get("overrides", []):
            k, _, v = o.partition("=")
            values.setdefault(k.lstrip("+~"), set()).add(v)
    keys = [k for k, vs in values.items() if len(vs) > 1 or len(runs) == 1]
    return sorted(k for k in keys if not k.startswith("hydra") and k not in ("paths.output_root",))


def run_label(run: dict, keys: list[str]) -> dict[str, str]:
    given = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in run.get("overrides", [])}
    return {k: given.get(k, "(default)") for k in keys}


def metric_columns(runs: list[dict]) -> list[str]:
    names = set()
    for r in runs:
        names |= {k for k in r.get("best_metrics", {}) | r.get("last_metrics", {}) if k.startswith("val/")}
    return sorted(names)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def results_table(runs: list[dict]) -> str:
    """Markdown: one row per run; its varying overrides, steps, wall time, memory, metrics, VSD loss stats."""
    keys = varying_overrides(runs)
    metrics = metric_columns(runs)
    header = [*keys, "steps", "wall (s)", "peak mem (MB)", *[f"{m} (best)" for m in metrics],
              "loss_vsd mean", "loss_vsd var"]
    rows = []
    for r in runs:
        vsd = r.get("loss_stats", {}).get("train/loss_vsd", {})
        best = r.get("best_metrics", {})
        last = r.get("last_metrics", {})
        row = [*run_label(r, keys).values(), r.get("steps"), r.get("wall_time_s"), r.get("peak_memory_mb"),
               *[best.get(m, last.get(m)) for m in metrics], vsd.get("mean"), vsd.get("var")]
        rows.append([fmt(x) for x in row])
    return "\n".join(markdown_table(header, rows)) + "\n"


def plot_tradeoff(runs: list[dict], path: Path, x: str = PLOT_AXES[0], y: str = PLOT_AXES[1]) -> Path | None:
    """Perception-distortion scatter (PSNR vs MUSIQ by default) when both metrics were logged."""
    points = [(r, r.get("last_metrics", {}) | r.get("best_metrics", {})) for r in runs]  # best, as the table
    points = [(r, m) for r, m in points if x in m and y in m]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_overrides(runs)
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, m in points:
        ax.scatter(m[x], m[y])
        ax.annotate(", ".join(run_label(r, keys).values()), (m[x], m[y]), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("perception-distortion trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", nargs="?", help="a sweep/run directory with summary.json files, or a W&B group name")
    parser.add_argument("--wandb-workspace", metavar="EXPERIMENT",
                        help="instead: write the W&B workspace definition of a study (conf/experiment/EXPERIMENT.yaml) "
                             "as JSON to --out (or stdout)")
    parser.add_argument("--project", default="osediff-lab", help="W&B project (when source is a group)")
    parser.add_argument("--out", type=Path, help="write the markdown table here (e.g. experiments/vsd/results.md)")
    parser.add_argument("--plot", type=Path, help="write the perception-distortion plot here (PNG)")
    parser.add_argument("--x", default=PLOT_AXES[0], help="plot x metric (default %(default)s)")
    parser.add_argument("--y", default=PLOT_AXES[1], help="plot y metric (default %(default)s)")
    args = parser.parse_args(argv)
    if args.wandb_workspace:
        from osediff_lab.dashboard import workspace_definition

        text = json.dumps(workspace_definition(args.wandb_workspace), indent=2) + "\n"
        if args.out:
            atomic_write_text(args.out, text)
            print(f"workspace definition written to {args.out}")
        else:
            print(text)
        return
    if args.source is None:
        parser.error("give a sweep directory or W&B group (or --wandb-workspace EXPERIMENT)")
    source = Path(args.source)
    runs = load_local(source) if source.exists() else load_wandb(args.source, args.project)
    unfinished = unfinished_runs(source) if source.exists() else []
    if not runs and not unfinished:
        raise SystemExit(f"no summary.json under {source}: has any run of this sweep started?")
    table = results_table(runs) if runs else "(no finished run)\n"
    if unfinished:
        table += f"\n{len(unfinished)} run(s) without a result:\n\n" + unfinished_table(unfinished)
    print(table)
    if args.out:
        atomic_write_text(args.out, f"<!-- generated by: python -m osediff_lab.report {args.source} -->\n\n" + table)
        print(f"table written to {args.out}")
    if args.plot:
        written = plot_tradeoff(runs, args.plot, args.x, args.y)
        print(f"plot written to {written}" if written else f"no plot: runs lack {args.x} and {args.y}")


if __name__ == "__main__":
    main()
