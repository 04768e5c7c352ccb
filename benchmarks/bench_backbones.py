"""The numbers a researcher chooses a backbone by, from the full-size ``*_shape`` twins on the meta device (no GPU,
no weights): parameters and GMACs per module at the native resolution, trainable LoRA parameters, and the
memory CLI's predicted peak for one training step at batch 1, fp32 and with every memory option.

`python benchmarks/bench_backbones.py [--models sd21_shape sdxl_shape ...] [--out docs/backbones.md]`
`python benchmarks/bench_backbones.py --measure [--size N]` (a GPU: benchmarks/gpu_check.sh) instead builds each
twin with random weights on the device and times one training step (after one warm-up step) with the best memory
options and one 4x inference (merged LoRA, bf16) at the native resolution, with ``max_memory_allocated``.
LoRA is the paper's (rank 4 on OSEDiff's suffixes, VAE-encoder rank 4, regularizer rank 4) on every backbone, so
the rows compare bases, not recipes. The best memory options: frozen weights in bf16 under bf16-mixed, gradient
checkpointing, LPIPS in bf16 (8-bit AdamW would save 6 bytes per trainable parameter more).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_perf import case_config, predict_case  # noqa: E402
from common import timings  # noqa: E402
from omegaconf import open_dict

from osediff_lab.dtypes import resolve_device  # noqa: E402
from osediff_lab.io import atomic_write_text  # noqa: E402
from osediff_lab.memory import GIB, training_step  # noqa: E402
from osediff_lab.models.components import build_components  # noqa: E402
from osediff_lab.models.osediff import build_generator  # noqa: E402
from osediff_lab.pipeline import SRPipeline  # noqa: E402
from osediff_lab.profile import profile_rows  # noqa: E402
from osediff_lab.prompts import NullPrompt  # noqa: E402
from osediff_lab.tables import markdown_table  # noqa: E402
from osediff_lab.train import build_module  # noqa: E402

# shape twin: (label, native side in px)
BACKBONES = {"sd21_shape": ("SD2.1-base", 512), "sd_turbo_shape": ("SD-Turbo", 512), "sdxl_shape": ("SDXL-base-1.0", 1024),
             "sd3_shape": ("SD3-medium", 1024)}


def profile_config(model: str, size: int):
    """The profile CLI's config for ``model`` at ``size`` px, latency off, without a prompt extractor."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from osediff_lab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("profile", [f"model={model}", "prompt=none", "loss.lpips.pretrained=false",
                                  f"profile.macs_size={size}", "profile.latency.enabled=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    return cfg


def row(model: str) -> list[str]:
    label, size = BACKBONES[model]
    start = time.perf_counter()
    rows = {r["module"]: r for r in profile_rows(profile_config(model, size))}
    plain, _ = predict_case(model, size, 1, "plain fp32")
    best, _ = predict_case(model, size, 1, "all of the above")
    trainable = rows["total"]["trainable"] + rows["regularizer (training only)"]["trainable"]
    m = lambda key: f"{rows[key]['params'] / 1e6:,.0f}"  # noqa: E731
    g = lambda key: f"{rows[key]['gmacs']:,.0f}"  # noqa: E731
    print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    return [label, f"{size}", m("text_encoder"), m("vae_encoder"), m("unet"), m("vae_decoder"), f"{trainable / 1e6:.2f}",
            g("text_encoder"), g("vae_encoder"), g("unet"), g("vae_decoder"), f"{plain.peak / GIB:.1f}", f"{best.peak / GIB:.1f}"]


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")


def measure(model: str, size: int, device: torch.device) -> list[str]:
    """One training step (best memory options, batch 1) and one 4x inference (bf16, merged LoRA) of the twin with
    random weights initialised on ``device``: seconds and peak allocated GiB of each."""
    label = BACKBONES[model][0] if model in BACKBONES else model
    cfg = case_config(model, size, 1, "all of the above", ("optim.use_8bit=false",))
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        module = build_module(cfg).train()
    step = training_step(module, torch.rand(1, 3, size, size, device=device) * 2 - 1)
    train_s = min(timings(step, repeats=2, warmup=1))
    train_peak = peak_gib(device)
    del module, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        components = build_components(cfg.model)
    generator, _ = build_generator(components, cfg.generator, share_unet=True)
    precision = "bf16" if device.type == "cuda" else "fp32"
    pipe = SRPipeline(generator, components.text, NullPrompt(), 4, {"device": str(device), "precision": precision,
                                                                        "color_fix": "none"})
    lq = torch.rand(1, 3, size // 4, size // 4, device=device)
    infer_s = min(timings(lambda: pipe.enhance(lq), repeats=2, warmup=1))
    return [label, f"{size}", f"{train_s:.2f}", f"{train_peak:.1f}", f"{infer_s:.2f}", f"{peak_gib(device):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BACKBONES), help="shape twins (or tiny twins with --measure)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--measure", action="store_true", help="time a training step and an inference on this device")
    parser.add_argument("--size", type=int, default=None, help="with --measure: side in px (default: native)")
    args = parser.parse_args()
    if args.measure:
        device = resolve_device()
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        header = ["backbone", "px", "train step s", "train peak GiB", "inference s", "inference peak GiB"]
        print(f"random weights on {name}; training: bf16 frozen + checkpointing + LPIPS bf16, batch 1")
        print("\n".join(markdown_table(header, [], right=range(1, len(header)))), flush=True)
        for m in args.models:  # a row as soon as it is measured: a timeout keeps the rows before it
            print(markdown_table(header, [measure(m, args.size or BACKBONES[m][1], device)])[2], flush=True)
        return
    header = ["backbone", "px", "text enc. M", "VAE enc. M", "denoiser M", "VAE dec. M", "trainable LoRA M",
              "text GMACs", "VAE enc. GMACs", "denoiser GMACs", "VAE dec. GMACs", "peak GiB fp32", "peak GiB best"]
    table = "\n".join(markdown_table(header, [row(m) for m in args.models], right=range(1, len(header)))) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
