"""Inference throughput, tiny preset on CPU, 128 -> 512: merged vs unmerged LoRA, tiled vs untiled,
and the cost of the colour fixes (timed alone, on 512 px).

`python benchmarks/bench_inference.py [--repeats N] [--threads T]`
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import timings
from omegaconf import OmegaConf

from osediff_lab.models.components import build_components
from osediff_lab.models.osediff import build_generator
from osediff_lab.paths import CONF_DIR
from osediff_lab.pipeline import SRPipeline, color_fix
from osediff_lab.prompts import NullPrompt

# Forces tiling of the 64 x 64 latent of a 512 px output: 3 x 3 UNet tiles, 2 x 2 VAE tiles.
TILED = {"latent_tiling": {"tile": 32, "overlap": 16}, "vae_tiling": {"encoder_tile": 32, "decoder_tile": 32}}
CASES = {
    "unmerged, untiled": {"merge_lora": False},
    "merged, untiled": {},
    "unmerged, tiled": {"merge_lora": False, **TILED},
    "merged, tiled": TILED,
}


def tiny_pipeline_parts(seed: int = 42):
    """Tiny base + generator whose LoRA B matrices are non-zero (as after training)."""
    model_cfg = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    gen_cfg = OmegaConf.load(CONF_DIR / "generator" / "osediff.yaml")
    torch.manual_seed(seed)
    components = build_components(model_cfg)
    generator, _ = build_generator(components, gen_cfg, share_unet=True)
    with torch.no_grad():
        for _, p in generator.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return components, generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: stable numbers on a shared machine; more for raw speed)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    components, generator = tiny_pipeline_parts()
    lq = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pipes = {
        name: SRPipeline(
            copy.deepcopy(generator), components.text, NullPrompt(), 4,
            {"device": "cpu", "precision": "fp32", "color_fix": "none", **options},
        )
        for name, options in CASES.items()
    }
    seconds = {name: statistics.median(timings(lambda p=pipe: p(lq), args.repeats)) for name, pipe in pipes.items()}
    print(f"inference, tiny preset, CPU ({args.threads} threads), 128x128 -> 512x512, median of {args.repeats}")
    print(f"{'case':20s} {'s/img':>8s} {'img/s':>8s}")
    for name, sec in seconds.items():
        print(f"{name:20s} {sec:8.3f} {1 / sec:8.2f}")

    sr, src = torch.rand(2, 1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    base = seconds["merged, untiled"]
    for fix in ("adain", "wavelet"):
        sec = statistics.median(timings(lambda f=fix: color_fix(f, sr, src, 5), args.repeats * 4))
        print(f"colour fix {fix:8s} {sec * 1000:7.1f} ms/img = {sec / base:6.1%} of the merged untiled pipeline")

    merged, unmerged, tiled = (pipes[n](lq) for n in ("merged, untiled", "unmerged, untiled", "merged, tiled"))
    print(f"max |merged - unmerged| = {(merged - unmerged).abs().max():.2e}")
    print(f"mean |tiled - untiled| = {(tiled - merged).abs().mean():.4f} (random tiny model, 3x3 latent tiles)")


if __name__ == "__main__":
    main()
