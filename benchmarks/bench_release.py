"""Issue 19's table, reproduced from a clean checkout: each row measured now on the project's tiny preset, beside
the project's own plain path measured in the same run, and the ratio to the authors' public release as it was
measured when the issue was filed (constants below: the release's code is not available here).

`python benchmarks/bench_release.py [--device cpu|cuda] [--repeats N] [--compile] [--rows train infer ...]`
One CPU thread by default (``--threads 0``: torch's default). ``--compile`` adds the training step with
generator.compile=true (inductor): its first step (the compile) and steady state against eager. Prints
numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bench_degradation import degradation_paths, paired, ratio, same_work, seconds
from bench_startup import TRAIN, bench_infer, bench_train, run_child
from common import compose_config

from osediff_lab.memory import training_step
from osediff_lab.train import build_module

# osediff-lab / release, fp32, one thread each, medians of 5 pairs, tiny model (issue 19 as filed, 2026-12-01).
RELEASE_DATE = "2026-12-01"
RELEASE = {
    "training iteration (256 px, batch 2), in process": "1.05 time (0.995 with the same regularizer work)",
    "training, whole process, 10 iterations": "1.37 time (peak RSS 1641 vs 1465 MiB)",
    "inference per image 128 -> 512, model loaded": "1.04 time",
    "inference, whole process, one image": "1.87 time (9.0 vs 4.9 CPU s)",
    "Real-ESRGAN degradation, batch 1 / batch 8": "0.85 / 0.49 throughput",
    "evaluation, 100 RealSR pairs, PSNR + SSIM": "0.96 throughput (pyiqa loop as baseline)",
}
RELEASE_INFER_CPU_S = 4.9  # the release's whole-process CPU seconds for one image (goal: ours within 1.2x)
# What any OSEDiff inference script imports (the plain floor of a whole-process run).
FLOOR = ("import torch, peft; from diffusers import AutoencoderKL, UNet2DConditionModel; "
         "from transformers import CLIPTextModel, CLIPTokenizer")


def row(name: str, ours: str, plain: str) -> None:
    print(f"| {name} | {ours} | {plain} | {RELEASE[name]} |")


def build_step(overrides: list[str], device: str) -> Callable[[], None]:
    """The project's training step (generator + regularizer) on a fixed batch, its first call done."""
    torch.manual_seed(0)
    module = build_module(compose_config([*TRAIN, *overrides])).to(device).train()
    step = training_step(module, torch.rand(2, 3, 256, 256, device=device) * 2 - 1)
    return step


def train_rows(device: str, repeats: int, compile_too: bool) -> None:
    fused, foreach = build_step([], device), build_step(["optim.fused=false"], device)
    first = seconds(fused, device)
    seconds(foreach, device)
    eager, plain, ratio = paired(fused, foreach, repeats, device)
    row("training iteration (256 px, batch 2), in process", f"{eager:.3f} s/step (first step {first:.2f} s)",
        f"foreach AdamW (optim.fused=false) {plain:.3f} s/step: fused = {1 / ratio:.2f}x its time (paired)")
    if compile_too:
        compiled = build_step(["generator.compile=true"], device)
        c_first = seconds(compiled, device)
        c_steady = statistics.median(seconds(compiled, device) for _ in range(repeats))
        print(f"|   generator.compile=true (inductor) | {c_steady:.3f} s/step, {eager / c_steady:.2f}x eager | "
              f"first step (compile) {c_first:.1f} s | - |")


def sync_count(device: str, steps: int, log_every: int, degradation: str) -> int:
    """Host syncs in one whole training run. On CUDA: operations that synchronise with the device (torch's sync
    debug mode warns on each). On CPU, an upper bound: every Python-level read of a tensor's value (``.item()``,
    ``float()``, ``bool()``, ``tolist()``...), CPU-side ones included (the data pipeline's sampling), which never
    stall a device. (Reads inside CPU kernels, such as fused AdamW's of its step count, are not counted: on a
    GPU those kernels run on the device.)"""
    import warnings

    from osediff_lab.train import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*TRAIN, "data.crop_size=64", f"trainer.max_steps={steps}", f"degradation={degradation}",
                              f"trainer.log_every_n_steps={log_every}", "callbacks.samples.every_n_steps=0",
                              "callbacks.checkpoint.every_n_train_steps=0",
                              f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}"], Path(tmp))
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(cfg)
            torch.cuda.set_sync_debug_mode("default")
            return sum("synchroniz" in str(w.message) for w in caught)
        reads = [0]
        originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")}

        def counted(original):
            def read(self, *args, **kwargs):
                reads[0] += 1
                return original(self, *args, **kwargs)
            return read

        try:
            for name, original in originals.items():
                setattr(torch.Tensor, name, counted(original))
            run(cfg)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
    return reads[0]


def sync_row(device: str, short: int = 2, long: int = 6) -> None:
    """Host syncs per training step in the real loop (Lightning, both optimisers, clipping, the finiteness
    check, the degradation): the difference between a ``long`` and a ``short`` run over the extra steps, so
    set-up and export drop out; with logging at every step, and with no log step inside the runs. Real-ESRGAN
    draws its parameters on the CPU (its reads never wait for a GPU), so the loop alone runs with bicubic too."""
    what = "device syncs" if device.startswith("cuda") else "tensor reads (CPU run: upper bound of syncs)"
    for degradation in ("realesrgan",) if device.startswith("cuda") else ("realesrgan", "bicubic"):
        per_step = [(sync_count(device, long, every, degradation) - sync_count(device, short, every, degradation))
                    / (long - short) for every in (1, 10 * long)]
        print(f"|   {what} per training step, steps {short + 1}-{long}, degradation={degradation} | logging every "
              f"step {per_step[0]:.1f} | no log step {per_step[1]:.1f} | - |")


def whole_process_rows(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train = bench_train(Path(tmp), repeats, 10)
        infer = bench_infer(Path(tmp), repeats, 128)
    floor_cpu = statistics.median(run_child(["-c", FLOOR])[1] for _ in range(repeats))
    to_first_step = sum(train[k] for k in ("python start", "imports", "config", "data set-up", "model build",
                                           "callbacks, logger, trainer", "fit set-up to first step"))
    print()
    row("training, whole process, 10 iterations",
        f"{train['whole process wall']:.1f} s wall, {train['whole process CPU']:.1f} CPU s, RSS {train['peak RSS MiB']:.0f} MiB",
        f"imports {train['imports']:.1f} s, first step after {to_first_step:.1f} s")
    row("inference, whole process, one image", f"{infer['infer_cpu_s']:.1f} CPU s ({infer['infer_wall_s']:.1f} s wall)",
        f"library import floor {floor_cpu:.1f} CPU s: {infer['infer_cpu_s'] / floor_cpu:.2f}x; release's "
        f"{RELEASE_INFER_CPU_S} s: {infer['infer_cpu_s'] / RELEASE_INFER_CPU_S:.2f}x (other load)")


def infer_row(repeats: int) -> None:
    from bench_inference import tiny_pipeline_parts

    from osediff_lab.pipeline import SRPipeline
    from osediff_lab.prompts import NullPrompt

    components, generator = tiny_pipeline_parts()
    lq = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pipes = [SRPipeline(copy.deepcopy(generator), components.text, NullPrompt(), 4,
                             {"device": "cpu", "precision": "fp32", "color_fix": "none", **options})
             for options in ({}, {"merge_lora": False, "fast": {"attention": "plain"}})]
    fast, plain, ratio = paired(lambda: pipes[0](lq), lambda: pipes[1](lq), repeats, "cpu")
    row("inference per image 128 -> 512, model loaded", f"{fast:.3f} s/img (defaults)",
        f"plain (unmerged, plain attention) {plain:.3f} s: {ratio:.2f}x")


def degradation_row(device: str, repeats: int) -> None:
    hq = torch.rand(8, 3, 512, 512, device=device) * 2 - 1
    d, paths = degradation_paths(compose_config(["degradation=realesrgan"]).degradation)
    times = same_work(paths, d, hq, repeats, device)
    rate = {name: 8 / statistics.median(t) for name, t in times.items()}
    row("Real-ESRGAN degradation, batch 1 / batch 8", f"{rate['one at a time']:.2f} / {rate['batched']:.2f} pairs/s",
        f"batch 8 = {ratio(times, 'one at a time', 'batched'):.2f}x one at a time; plain one at a time (blur=plain, "
        f"the release's blur work) {rate['plain, one at a time']:.2f} pairs/s: batch 8 = "
        f"{ratio(times, 'plain, one at a time', 'batched'):.2f}x (same parameter draws)")


def evaluation_row() -> None:
    script = Path(__file__).with_name("bench_evaluate.py")
    proc = subprocess.run([sys.executable, str(script), "--limit", "100"], capture_output=True, text=True, check=False)
    tail = " / ".join(line.strip() for line in proc.stdout.strip().splitlines()[-2:]) if proc.returncode == 0 else (
        f"not run: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    row("evaluation, 100 RealSR pairs, PSNR + SSIM", "see bench_evaluate.py", tail)


ROWS = ("train", "syncs", "infer", "degradation", "whole", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also the training step with generator.compile=true")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.device}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; release ratios as measured {RELEASE_DATE}\n")
    print("| measurement | osediff-lab now | the project's plain path, same run | osediff-lab / release then |")
    print("|---|---|---|---|")
    if "train" in args.rows:
        train_rows(args.device, args.repeats, args.compile)
    if "syncs" in args.rows:
        sync_row(args.device)
    if "infer" in args.rows:
        infer_row(args.repeats)
    if "degradation" in args.rows:
        degradation_row(args.device, args.repeats)
    if "evaluate" in args.rows:
        evaluation_row()
    if "whole" in args.rows:
        whole_process_rows(min(args.repeats, 3))


if __name__ == "__main__":
    main()
