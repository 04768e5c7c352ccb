"""One training step of the adversarial methods at full size: seconds per step (the generator, then every further group:
the discriminator, and osediff_gan's regularizer) and peak memory, beside osediff_lab.memory's predicted peak.

`python benchmarks/bench_gan.py [--model sd21_shape] [--size 512] [--batch 1] [--repeats 3] [--methods hypir osediff_gan]`
bf16-mixed with the frozen weights in bf16 (HYPIR's release precision). HYPIR's discriminator is a random ConvNeXt of
the CLIP tower's shape (timm's convnext_xxlarge: depths 3-4-30-3, widths 384-3072, a 1024-d embedding, bf16; its
weights are not offline); osediff_gan's heads read the regularizer UNet. On CPU: --model tiny --size 64 --fp32.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import compose_config, timings  # noqa: E402

from osediff_lab.dtypes import resolve_device  # noqa: E402
from osediff_lab.memory import predict_training_memory, training_step  # noqa: E402
from osediff_lab.train import build_module  # noqa: E402

XXLARGE = ["discriminator=convnext_clip", "discriminator.backbone.source=random", "+discriminator.backbone.depths=[3,4,30,3]",
           "+discriminator.backbone.dims=[384,768,1536,3072]", "+discriminator.backbone.num_classes=1024"]
TINY_D = ["discriminator=convnext_tiny"]
METHODS = {"hypir": ["method=hypir"], "osediff_gan": ["method=osediff_gan"]}
BASE = ["data=demo", "logger=csv", "prompt=none", "loss.lpips.pretrained=false", "loss.lpips.net=vgg"]
BF16 = ["generator.frozen_dtype=bf16", "trainer.precision=bf16-mixed"]
DEVICE = resolve_device()


def case_overrides(method: str, model: str, size: int, batch: int, fp32: bool) -> list[str]:
    """The training config's overrides of one method at one size."""
    disc = (XXLARGE if model != "tiny" else TINY_D) if method == "hypir" else []
    return [f"model={model}", *BASE, f"data.crop_size={size}", f"data.batch_size={batch}", *METHODS[method], *disc,
            *([] if fp32 else BF16)]


def bench(method: str, model: str, size: int, batch: int, repeats: int, fp32: bool) -> dict:
    """Seconds per training step (median of ``repeats`` after two warm-up steps), peak memory and the prediction."""
    cfg = compose_config(case_overrides(method, model, size, batch, fp32))
    predicted = predict_training_memory(cfg, steps=1)
    torch.manual_seed(0)
    module = build_module(cfg).to(DEVICE).train()
    step = training_step(module, torch.rand(batch, 3, size, size, device=DEVICE) * 2 - 1)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = statistics.median(timings(step, repeats, warmup=2))
    peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else float("nan")
    del module, step
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method, "s_per_step": sec, "peak_gib": peak / 2**30, "predicted_gib": predicted.peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd21_shape")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16-mixed with bf16 frozen weights")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"adversarial training step, model={args.model}, {args.size}x{args.size}, batch {args.batch}, "
          f"{'fp32' if args.fp32 else 'bf16-mixed, frozen bf16'}, {name}, median of {args.repeats}")
    print(f"{'method':12s} {'s/step':>8s} {'GiB peak (CUDA)':>16s} {'GiB predicted':>14s}")
    for method in args.methods:
        r = bench(method, args.model, args.size, args.batch, args.repeats, args.fp32)
        print(f"{r['method']:12s} {r['s_per_step']:8.3f} {r['peak_gib']:16.2f} {r['predicted_gib']:14.2f}", flush=True)


if __name__ == "__main__":
    main()
