"""`python -m osediff_lab.report <sweep dir | W&B group>`: a study's results table (+ a plot) from run summaries."""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

from osediff_lab import curves as cv
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


def arm_curves(arms: dict[str, dict[str, dict]], metric: str) -> dict[str, dict[str, cv.Curve]]:
    """``{arm: {seed: {step: value}}}`` of one logged quantity, from each run's CSV journal."""
    return {arm: {seed: cv.run_curves(Path(r["run_dir"]), (metric,)).get(metric, {}) for seed, r in seeds.items()}
            for arm, seeds in arms.items()}


def seeds_table(runs: list[dict], baseline: str | None, seed_key: str = "seed") -> str:
    """Markdown: per arm (the varying overrides but the seed) the mean +- std over seeds of each final validation metric
    and wall time; with ``baseline`` (an arm, ``objective=vsd``), per metric the paired difference arm - baseline on the
    same seed at every validation step (mean +- std over seeds; steps counted from 1)."""
    arms = cv.by_arm(runs, varying_overrides(runs), seed_key)
    metrics = [m for m in metric_columns(runs) if not m.startswith(("val/bicubic", "val_info"))]
    final = cv.aggregate_final(arms, metrics)
    rows = []
    for arm, seeds in arms.items():
        wall = [r["wall_time_s"] for r in seeds.values() if r.get("wall_time_s") is not None]
        rows.append([arm, len(seeds), *[cv.fmt_mean_std(final[arm].get(m)) for m in metrics],
                     cv.fmt_mean_std(cv.mean_std(wall), 0) if wall else "-"])
    text = f"Final validation, mean ± std over seeds ({seed_key}):\n\n"
    text += "\n".join(markdown_table(["arm", "seeds", *metrics, "wall (s)"], rows)) + "\n"
    if baseline is None:
        return text
    if baseline not in arms:
        raise SystemExit(f"--baseline '{baseline}' is not an arm of these runs: {sorted(arms)}")
    for m in metrics:
        diffs = cv.paired_differences(arm_curves(arms, m), baseline)
        steps = sorted({s for d in diffs.values() for s in d})
        rows = [[arm, *[cv.fmt_mean_std(d.get(s)) for s in steps]] for arm, d in diffs.items()]
        text += f"\n{m}: arm - {baseline}, paired by seed, mean ± std over seeds:\n\n"
        text += "\n".join(markdown_table(["arm", *[f"step {s + 1}" for s in steps]], rows)) + "\n"
    return text


def plot_arms(runs: list[dict], path: Path, metrics: tuple[str, ...] = ("val/psnr", "val/niqe"), seed_key: str = "seed") -> Path:
    """Per validation metric: each arm's mean over seeds at every validation step, +- one std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = cv.by_arm(runs, varying_overrides(runs), seed_key)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for arm, seeds in arm_curves(arms, m).items():
            steps = sorted(set.intersection(*(set(c) for c in seeds.values()))) if seeds else []
            if not steps:
                continue
            stats = [cv.mean_std(c[s] for c in seeds.values()) for s in steps]
            mean = [x[0] for x in stats]
            std = [x[1] or 0.0 for x in stats]
            x = [s + 1 for s in steps]
            ax.plot(x, mean, marker="o", label=f"{arm} (n={len(seeds)})")
            ax.fill_between(x, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_references(runs: list[dict], out_dir: Path, seed_key: str = "seed") -> list[Path]:
    """One reference file per arm, ``<model>_<method>.json`` (the runs' Hydra choices): the envelope over its seeds of
    every health quantity and validation metric, with the command that made it."""
    from omegaconf import OmegaConf

    written = []
    for arm, seeds in cv.by_arm(runs, varying_overrides(runs), seed_key).items():
        first = next(iter(seeds.values()))
        choices = OmegaConf.load(Path(first["run_dir"]) / ".hydra" / "hydra.yaml").hydra.runtime.choices
        about = {"model": choices.model, "method": choices.method, "arm": arm, "seeds": sorted(seeds),
                 "task_name": first.get("task_name"), "steps": first.get("steps"),
                 "overrides": [o for o in first.get("overrides", []) if o.partition("=")[0] != seed_key],
                 "made_by": "python -m osediff_lab.report <sweep dir> --write-reference <dir>"}
        ref = cv.reference([cv.run_curves(Path(r["run_dir"])) for r in seeds.values()], about)
        path = Path(out_dir) / f"{choices.model}_{choices.method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(ref, indent=1) + "\n")
        written.append(path)
    return written


def reference_text(run: dict, ref: dict, margin: float, persist: int) -> str:
    """Where a run leaves the reference envelope: per quantity the first step from which it stays outside ``persist``
    log steps, earliest first."""
    found = cv.exits(cv.run_curves(Path(run["run_dir"])), ref, margin, persist)
    head = f"{run['run_dir']} against the reference {ref.get('model')}_{ref.get('method')} (seeds {ref.get('seeds')})"
    if not found:
        return f"{head}: inside the envelope at every step ({len(ref['quantities'])} quantities)\n"
    lines = [f"{head}: leaves it at step {found[0]['step'] + 1} ({found[0]['quantity']})"]
    lines += [f"  {e['quantity']}: outside from step {e['step'] + 1}: {e['value']:.4g} not in "
              f"[{e['min']:.4g}, {e['max']:.4g}] (widened by {margin:g}x its width, {persist} steps running)" for e in found]
    return "\n".join(lines) + "\n"


def plot_reference(run: dict, ref: dict, path: Path, margin: float, persist: int) -> Path:
    """Every quantity of the reference: its envelope (min-max shaded, mean dashed) and the run's curve over it, the
    first step outside marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = cv.run_curves(Path(run["run_dir"]))
    names = [n for n in ref["quantities"] if n in curves]
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        env = ref["quantities"][name]
        x = [s + 1 for s in env["steps"]]
        ax.fill_between(x, env["min"], env["max"], alpha=0.3, color="grey", label="reference min-max")
        ax.plot(x, env["mean"], "--", color="grey", lw=1)
        steps = sorted(curves[name])
        ax.plot([s + 1 for s in steps], [curves[name][s] for s in steps], color="C0", lw=1.2, label="this run")
        hit = cv.first_exit(curves[name], env, margin, persist)
        if hit is not None:
            ax.plot(hit["step"] + 1, hit["value"], "o", color="red")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    parser.add_argument("--seeds", action="store_true",
                        help="aggregate seeds: mean +- std per arm (the varying overrides but --seed-key); --plot draws "
                             "each arm's validation curves")
    parser.add_argument("--seed-key", default="seed", help="the override that numbers seeds (default %(default)s)")
    parser.add_argument("--baseline", metavar="ARM",
                        help="with --seeds: paired differences against this arm at every validation step (objective=vsd)")
    parser.add_argument("--write-reference", type=Path, metavar="DIR",
                        help="write each arm's reference curves (<model>_<method>.json: per-step min/max/mean over seeds)")
    parser.add_argument("--reference", metavar="NAME|FILE",
                        help="check each run against reference curves (a file, or nano_osediff, ...); --plot overlays it")
    parser.add_argument("--margin", type=float, default=2.0,
                        help="with --reference: widen the envelope by this x its width on each side (default %(default)s: "
                             "3 seeds' min-max is narrow; experiments/objectives)")
    parser.add_argument("--persist", type=int, default=3,
                        help="with --reference: log steps running outside before a quantity counts (default %(default)s)")
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
    if args.reference:
        ref = cv.load_reference(args.reference)
        for run in runs:
            print(reference_text(run, ref, args.margin, args.persist))
        if args.plot and runs:
            print(f"plot written to {plot_reference(runs[0], ref, args.plot, args.margin, args.persist)}")
        return
    if args.write_reference:
        for path in write_references(runs, args.write_reference, args.seed_key):
            print(f"reference curves written to {path}")
        return
    table = results_table(runs) if runs else "(no finished run)\n"
    if args.seeds and runs:
        table = seeds_table(runs, args.baseline, args.seed_key) + "\nPer run:\n\n" + table
    if unfinished:
        table += f"\n{len(unfinished)} run(s) without a result:\n\n" + unfinished_table(unfinished)
    print(table)
    if args.out:
        atomic_write_text(args.out, f"<!-- generated by: python -m osediff_lab.report {args.source} -->\n\n" + table)
        print(f"table written to {args.out}")
    if args.plot and args.seeds:
        print(f"plot written to {plot_arms(runs, args.plot, seed_key=args.seed_key)}")
    elif args.plot:
        written = plot_tradeoff(runs, args.plot, args.x, args.y)
        print(f"plot written to {written}" if written else f"no plot: runs lack {args.x} and {args.y}")


if __name__ == "__main__":
    main()
