"""Real-ESRGAN degradation throughput: 512x512 pairs/s for batch 8, batched vs one sample at a time.

`python benchmarks/bench_degradation.py [--device cpu|cuda] [--repeats N]`; prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from osediff_lab.data.realesrgan import RealESRGANDegradation
from osediff_lab.paths import CONF_DIR


def degradation_config():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["degradation=realesrgan"]).degradation


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = degradation_config()
    hq = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 2 - 1
    batched, single = RealESRGANDegradation(cfg, 4), RealESRGANDegradation(cfg, 4)
    batched(hq)  # warm-up (kernel caches, allocator)
    single(hq[:1])

    t_batched = median_seconds(lambda: batched(hq), args.repeats, args.device)
    t_single = median_seconds(lambda: [single(hq[i : i + 1]) for i in range(args.batch)], args.repeats, args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.batch} x {args.size}x{args.size}, "
          f"median of {args.repeats}")
    print(f"batched (one call, batch {args.batch}):    {args.batch / t_batched:7.2f} pairs/s  ({t_batched:.3f} s/batch)")
    print(f"one sample at a time ({args.batch} calls):  {args.batch / t_single:7.2f} pairs/s  ({t_single:.3f} s/batch)")
    print(f"batched / one-at-a-time speed ratio: {t_single / t_batched:.2f}x")
    shared_cfg = cfg.copy()
    shared_cfg.resize_per_sample = False
    shared = RealESRGANDegradation(shared_cfg, 4)
    shared(hq)
    t_shared = median_seconds(lambda: shared(hq), args.repeats, args.device)
    print(f"batched, one resize per batch (resize_per_sample=false): {args.batch / t_shared:7.2f} pairs/s  "
          f"({t_single / t_shared:.2f}x one-at-a-time)")


if __name__ == "__main__":
    main()
