"""Real-ESRGAN degradation throughput now against the code issue 19 was filed on, and so against the release.

`python benchmarks/degradation_then_and_now.py [--then REV] [--draws N] [--rounds N]`: checks REV out into a
temporary git worktree and times ``build_degradation(cfg, 4)`` of both trees, 8 x 512x512 in one call and one
sample at a time, over fresh parameter draws (one thread, each tree in its own process, the trees taking turns).
The issue measured that code against the release: one at a time 0.85x the release's throughput, so the release's
one-at-a-time rate is estimated as then / 0.85. REV's code needs kornia (``pip install kornia``), which the
project no longer uses. Prints numbers, asserts nothing; not part of ``make bench`` (it needs the git history).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THEN = "d65741c"  # the code issue 19 was filed on (2026-11-26; its degradation unchanged until f106bf3)
RELEASE_SINGLE_RATIO = 0.85  # then / release, one sample at a time (issue 19's table)


def measure(tree: Path, draws: int) -> None:
    """Child process: pairs/s of ``tree``'s degradation, batched and one at a time; prints one line."""
    sys.path[:0] = [str(tree / "src")]
    import torch
    from hydra import compose, initialize_config_dir

    import osediff_lab
    from osediff_lab.data.degradation import build_degradation
    from osediff_lab.paths import CONF_DIR

    if not Path(osediff_lab.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"imported {osediff_lab.__file__}, not the tree {tree}")
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["degradation=realesrgan"]).degradation
    d = build_degradation(cfg, 4)
    hq = torch.rand(8, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d(hq)
    batched, single = [], []
    for _ in range(draws):
        start = time.perf_counter()
        d(hq)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(8):
            d(hq[i : i + 1])
        single.append(time.perf_counter() - start)
    print(8 / statistics.mean(batched), 8 / statistics.mean(single))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--then", default=THEN)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.tree:
        measure(args.tree, args.draws)
        return
    now = Path(__file__).resolve().parents[1]
    rates: dict[str, list[tuple[float, float]]] = {"then": [], "now": []}
    with tempfile.TemporaryDirectory() as tmp:
        then = Path(tmp) / "then"
        subprocess.run(["git", "-C", str(now), "worktree", "add", "-q", "--detach", str(then), args.then], check=True)
        try:
            for _ in range(args.rounds):
                for name, tree in (("then", then), ("now", now)):
                    out = subprocess.run([sys.executable, __file__, "--tree", str(tree), "--draws", str(args.draws)],
                                         capture_output=True, text=True, check=True).stdout.split()
                    rates[name].append((float(out[-2]), float(out[-1])))
        finally:
            subprocess.run(["git", "-C", str(now), "worktree", "remove", "--force", str(then)], check=False)
    mean = {name: [statistics.mean(r[i] for r in rs) for i in (0, 1)] for name, rs in rates.items()}
    release = mean["then"][1] / RELEASE_SINGLE_RATIO
    print(f"8 x 512x512, one thread, {args.rounds} rounds of {args.draws} fresh draws per tree; pairs/s:")
    for name in ("then", "now"):
        print(f"  {name:4s} ({args.then if name == 'then' else 'HEAD'}): batch 8 {mean[name][0]:6.2f}, "
              f"one at a time {mean[name][1]:6.2f}")
    print(f"release one at a time, estimated as then / {RELEASE_SINGLE_RATIO}: {release:.2f}; now batch 8 = "
          f"{mean['now'][0] / release:.2f}x it, now one at a time = {mean['now'][1] / release:.2f}x it")


if __name__ == "__main__":
    main()
