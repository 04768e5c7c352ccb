"""Real-ESRGAN degradation throughput: 512x512 pairs/s for batch 8, batched vs one sample at a time, and vs
the plain path (``degradation.blur=plain``, one sample at a time: the blur work of Real-ESRGAN's own code).

`python benchmarks/bench_degradation.py [--device cpu|cuda] [--repeats N] [--threads N] [--blur]`; prints
numbers, asserts nothing. Every path runs on the same parameter draws in turn, medians are reported; the
batch's agreement with its samples processed alone is printed too. ``--blur`` times the two correlation
methods (grouped convolution, FFT) per kernel support, which is how ``DIRECT_MAX`` was chosen.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import compose_config

from osediff_lab.data.degradation import build_degradation
from osediff_lab.data.realesrgan import DIRECT_MAX, correlate, select_samples


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(a: Callable[[], object], b: Callable[[], object], repeats: int, device: str) -> tuple[float, float, float]:
    """Median seconds of a and of b, timed alternately, and the median of the per-pair ratios b / a."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(seconds(a, device))
        tb.append(seconds(b, device))
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb, strict=True))


def blur_methods(device: str, size: int, batch: int, repeats: int) -> None:
    """Milliseconds per image of each correlation method by kernel size, for one image and for a batch."""
    print(f"\nblur of {size}x{size} RGB, ms per image (DIRECT_MAX = {DIRECT_MAX}):")
    for k in range(3, 22, 2):
        row = []
        for b in (1, batch):
            x, kernels = torch.rand(b, 3, size, size, device=device), torch.rand(b, k, k, device=device)
            for direct_max in (k, k - 1):  # k: grouped convolution; k - 1: FFT
                correlate(x, kernels, direct_max=direct_max)
                row.append(1e3 / b * statistics.median(
                    seconds(lambda d=direct_max, k=kernels, x=x: correlate(x, k, direct_max=d), device)
                    for _ in range(repeats)))
        print(f"  k={k:2d}: batch 1: direct {row[0]:6.1f}  fft {row[1]:6.1f}   "
              f"batch {batch}: direct {row[2]:6.1f}  fft {row[3]:6.1f}")


def same_work(paths: dict[str, Callable[[torch.Tensor, dict], object]], d, hq: torch.Tensor, repeats: int,
              device: str) -> dict[str, list[float]]:
    """Seconds of each path per repeat, all on the same freshly drawn parameters (their cost swings by tens of
    percent from draw to draw), the paths taking turns, after one draw left out (kernel caches, allocator)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(repeats + 1):
        params = d.sample(hq.shape[0], tuple(hq.shape[-2:]))
        for name, path in paths.items():
            t = seconds(lambda p=path, q=params: p(hq, q), device)
            if repeat:
                times[name].append(t)
    return times


def one_at_a_time(d) -> Callable[[torch.Tensor, dict], list[torch.Tensor]]:
    """Each sample through ``d.apply`` alone, with its own parameters."""
    return lambda hq, params: [d.apply(hq[i : i + 1], select_samples(params, [i])) for i in range(hq.shape[0])]


def degradation_paths(cfg) -> tuple[object, dict[str, Callable[[torch.Tensor, dict], object]]]:
    """The degradation and its three paths: batched, one at a time, and the plain path one at a time
    (``degradation.blur=plain``: every blur a full kernel_size^2 grouped convolution, Real-ESRGAN's filter2D)."""
    plain_cfg = cfg.copy()
    plain_cfg.blur = "plain"
    d, plain = build_degradation(cfg, 4), build_degradation(plain_cfg, 4)
    return d, {"batched": d.apply, "one at a time": one_at_a_time(d), "plain, one at a time": one_at_a_time(plain)}


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over draws of slow / fast time."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--blur", action="store_true", help="also time grouped convolution vs FFT per kernel size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(["degradation=realesrgan"]).degradation
    hq = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 2 - 1
    d, paths = degradation_paths(cfg)
    times = same_work(paths, d, hq, args.repeats, args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.batch} x {args.size}x{args.size}, "
          f"{args.repeats} parameter draws, every path on each draw")
    for name, t in times.items():
        print(f"  {name:22s} {args.batch / statistics.median(t):7.2f} pairs/s  ({statistics.median(t):.3f} s/batch)")
    print(f"batched / one-at-a-time throughput: {ratio(times, 'one at a time', 'batched'):.2f}x; batched / plain "
          f"one at a time: {ratio(times, 'plain, one at a time', 'batched'):.2f}x (medians over draws)")

    shared_cfg = cfg.copy()
    shared_cfg.resize_per_sample = False
    shared = build_degradation(shared_cfg, 4)
    shared_times = same_work({"shared": shared.apply, "alone": one_at_a_time(shared)}, shared, hq, args.repeats,
                             args.device)
    print(f"one resize per batch (resize_per_sample=false): batched {ratio(shared_times, 'alone', 'shared'):.2f}x "
          f"one at a time")

    params = d.sample(args.batch, (args.size, args.size))
    lq = d.apply(hq, params)
    gap = max((lq[i : i + 1] - d.apply(hq[i : i + 1], select_samples(params, [i]))).abs().max().item()
              for i in range(args.batch))
    print(f"batch vs each sample alone (same parameters): max |difference| {gap:.2e}")
    if args.blur:
        blur_methods(args.device, args.size, args.batch, args.repeats)


if __name__ == "__main__":
    main()
