"""The training step and the Real-ESRGAN degradation at an earlier git revision and now, timed in paired turns
(is a change slower or faster?); by default against the code issue 19 was filed on, and so against the release.

`python benchmarks/compare_revisions.py [--then REV] [--rows train degradation] [--pairs N]`: checks REV out into a
temporary git worktree, starts one process per tree (one thread each, built with the tree's own config and
code) and times them in alternating pairs on the same inputs, so both see the same machine load:
- train: the in-process training step (``osediff_lab.memory.training_step``, tiny preset, 256 px, batch 2,
  L2 + VSD + regularizer), with ``degradation=bicubic`` (the training default) and ``degradation=realesrgan``;
- degradation: Real-ESRGAN, 8 x 512x512, one call and one sample at a time, fresh parameters per call.
The issue measured REV against the authors' release (its table, constants below); the release is estimated
through those ratios. REV's code imports kornia (``pip install kornia``) for both rows, which the project
no longer uses. Prints numbers, asserts nothing; not part of ``make bench`` (it needs the git history).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_startup import TRAIN

THEN = "d65741c"  # the code issue 19 was filed on (2026-11-26)
RELEASE_STEP_RATIO = 1.05  # then / release, training iteration in process (0.995 with the same regularizer work)
RELEASE_SINGLE_RATIO = 0.85  # then / release, degradation throughput one sample at a time


def child(tree: Path, row: str, degradation: str) -> None:
    """Child process: builds ``row`` from ``tree``, prints 'ready', then per stdin line ``variant`` runs it once
    and prints its seconds."""
    sys.path[:0] = [str(tree / "src"), str(tree / "tests")]
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # both trees on one core: the same core's speed
    import torch

    import osediff_lab
    from helpers import compose_config

    if not Path(osediff_lab.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"imported {osediff_lab.__file__}, not the tree {tree}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if row == "train":
        from osediff_lab.memory import training_step
        from osediff_lab.train import build_module

        overrides = [o for o in TRAIN if not o.startswith("degradation=")] + [f"degradation={degradation}"]
        module = build_module(compose_config(overrides)).train()
        step = training_step(module, torch.rand(2, 3, 256, 256, generator=g) * 2 - 1)
        variants = {"step": step}
    else:
        from osediff_lab.data.degradation import build_degradation

        d = build_degradation(compose_config(["degradation=realesrgan"]).degradation, 4)
        hq = torch.rand(8, 3, 512, 512, generator=g) * 2 - 1
        variants = {"batched": lambda: d(hq), "single": lambda: [d(hq[i : i + 1]) for i in range(8)]}
    for fn in variants.values():
        fn()
        fn()
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        variants[line.strip()]()
        print(time.perf_counter() - start, flush=True)


def paired(trees: dict[str, Path], row: str, degradation: str, variants: list[str], pairs: int) -> dict[str, list[float]]:
    """Seconds per (tree, variant), the trees' processes taking turns, ``pairs`` times each."""
    procs = {name: subprocess.Popen([sys.executable, __file__, "--child", str(tree), row, degradation],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for name, tree in trees.items()}
    for name, proc in procs.items():
        while (line := proc.stdout.readline()) != "ready\n":
            if not line:
                raise SystemExit(f"the {name} tree's {row} process ended before it was ready")
    times: dict[str, list[float]] = {}
    for i in range(pairs):
        for variant in variants:
            for name in list(procs)[:: 1 if i % 2 == 0 else -1]:
                procs[name].stdin.write(variant + "\n")
                procs[name].stdin.flush()
                times.setdefault(f"{name} {variant}", []).append(float(procs[name].stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over pairs of time a / time b."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--then", default=THEN)
    parser.add_argument("--rows", nargs="+", default=["train", "degradation"], choices=["train", "degradation"])
    parser.add_argument("--pairs", type=int, default=20)
    args = parser.parse_args()
    now = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        then = Path(tmp) / "then"
        subprocess.run(["git", "-C", str(now), "worktree", "add", "-q", "--detach", str(then), args.then], check=True)
        trees = {"then": then, "now": now}
        try:
            print(f"then = {args.then}, now = HEAD; one thread per process, {args.pairs} alternating pairs")
            if "train" in args.rows:
                for degradation in ("bicubic", "realesrgan"):
                    t = paired(trees, "train", degradation, ["step"], args.pairs)
                    r = ratio(t, "now step", "then step")
                    print(f"training step, degradation={degradation}: then {statistics.median(t['then step']):.3f} s, "
                          f"now {statistics.median(t['now step']):.3f} s; now / then {r:.2f}; release estimated "
                          f"as then / {RELEASE_STEP_RATIO}: now / release {r * RELEASE_STEP_RATIO:.2f}")
            if "degradation" in args.rows:
                t = paired(trees, "degradation", "realesrgan", ["batched", "single"], args.pairs)
                rate = {k: 8 / statistics.median(v) for k, v in t.items()}
                release = rate["then single"] / RELEASE_SINGLE_RATIO
                print(f"degradation 8 x 512x512, pairs/s: then batch 8 {rate['then batched']:.2f}, one at a time "
                      f"{rate['then single']:.2f}; now batch 8 {rate['now batched']:.2f}, one at a time "
                      f"{rate['now single']:.2f}; release one at a time estimated as then / {RELEASE_SINGLE_RATIO}: "
                      f"{release:.2f}, now batch 8 = {rate['now batched'] / release:.2f}x it")
        finally:
            subprocess.run(["git", "-C", str(now), "worktree", "remove", "--force", str(then)], check=False)


if __name__ == "__main__":
    main()
