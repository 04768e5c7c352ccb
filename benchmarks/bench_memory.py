"""Predicted peak training memory per memory option at full size, on any machine (no GPU, no weights).

`python benchmarks/bench_memory.py [--model sd21_shape] [--size 512] [--batches 1 4]`
Each row replays two training steps on fake tensors (osediff_lab.memory): peak bytes held by tensors, which
is what torch.cuda.max_memory_allocated reports; add about 0.5 GiB of CUDA context for the card. The issue's
target: 512x512, batch 1, under 16 GiB. Cases with 8-bit AdamW are predicted with AdamW (marked *: its
kernels need real tensors); 8-bit states are 6 bytes per trainable parameter smaller (0.05 GiB at SD2.1 size).
"""

from __future__ import annotations

import argparse
import time

from bench_perf import TRAIN_CASES, predict_case  # noqa: E402

from osediff_lab.memory import GIB  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd21_shape")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"predicted peak tensor memory of a training step, model={args.model}, {args.size}x{args.size}")
    print(f"{'case':28s} {'batch':>5s} {'peak GiB':>9s} {'weights GiB':>12s} {'step GiB':>9s} {'vs plain':>9s} {'s':>5s}")
    plain: dict[int, float] = {}
    for name in TRAIN_CASES:
        for b in args.batches:
            start = time.perf_counter()
            p, as_adamw = predict_case(args.model, args.size, b, name)
            plain.setdefault(b, p.peak)
            label = name + (" *" if as_adamw else "")
            print(f"{label:28s} {b:5d} {p.peak / GIB:9.2f} {p.static / GIB:12.2f} {p.activations / GIB:9.2f} "
                  f"{p.peak / plain[b]:8.2f}x {time.perf_counter() - start:5.0f}")


if __name__ == "__main__":
    main()
