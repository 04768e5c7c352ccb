"""`make bench`: run every benchmarks/bench_*.py in turn and print their numbers (no assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Extra runs beside each script's defaults (tiny preset): the fast paths and memory options at SD2.1 size,
# reduced to 64 px on CPU (`make bench` takes 18 to 21 minutes on 2 cores).
EXTRA_RUNS = {
    "bench_perf": [["--model", "sd21_shape", "--size", "64", "--batches", "1", "4", "--train-batches", "1",
                    "--repeats", "2", "--no-predict"]],
}

# Arguments replacing a script's defaults, and scripts another one already runs.
ARGS = {"bench_release": ["--rows", "train", "syncs", "infer", "degradation", "whole"]}  # evaluate: bench_evaluate
COVERED = {"bench_startup"}  # its infer and train start-up tables are bench_release's whole-process rows


def main() -> int:
    selected = sys.argv[1:]
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        if selected and script.stem.removeprefix("bench_") not in selected or not selected and script.stem in COVERED:
            continue
        for args in [ARGS.get(script.stem, []), *EXTRA_RUNS.get(script.stem, [])]:
            print(f"\n=== {' '.join([script.name, *args])} ===", flush=True)
            if subprocess.run([sys.executable, str(script), *args], check=False).returncode:
                failed.append(" ".join([script.name, *args]))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
