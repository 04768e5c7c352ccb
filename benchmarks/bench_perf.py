"""Fast paths and memory options: inference latency/throughput per ``pipeline.fast`` case, training step
time and peak memory per memory option, each against the plain fp32 path measured in the same run.

`python benchmarks/bench_perf.py [--model tiny|sd21_shape] [--size 512] [--batches 1 8] [--train-batches 1 4]`
Inference times one generator pass (encode, UNet, decode) on x_L, without prompts or colour fix. Peak memory
is torch.cuda.max_memory_allocated on GPU; on CPU each training case runs in its own process and reports
its peak resident set size (weights included). Beside it: osediff_lab.memory's prediction of peak tensor
bytes (comparable to the CUDA figure; bench_memory.py prints it alone, at full size, on any machine);
* marks 8-bit AdamW predicted as AdamW.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys

import torch
from common import compose_config, timings  # noqa: E402
from omegaconf import DictConfig, OmegaConf

from osediff_lab.dtypes import resolve_device  # noqa: E402
from osediff_lab.memory import MemoryPrediction, predict_training_memory, training_step  # noqa: E402
from osediff_lab.models.components import build_components  # noqa: E402
from osediff_lab.models.osediff import build_generator  # noqa: E402
from osediff_lab.pipeline import SRPipeline  # noqa: E402
from osediff_lab.prompts import NullPrompt  # noqa: E402
from osediff_lab.train import build_module  # noqa: E402

PLAIN = {"merge_lora": False, "precision": "fp32", "fast": {"attention": "plain"}}
INFER_CASES = {
    "plain fp32": PLAIN,
    "merged LoRA": {"precision": "fp32", "fast": {"attention": "plain"}},
    "merged + SDPA": {"precision": "fp32"},
    "merged + SDPA + fused QKV": {"precision": "fp32", "fast": {"fuse_qkv": True}},
    "merged + SDPA + channels_last": {"precision": "fp32", "fast": {"channels_last": True}},
    "merged + SDPA + bf16": {"precision": "bf16"},
    "merged + SDPA + bf16 + compile": {"precision": "bf16", "fast": {"compile": True}},
}
TRAIN_CASES = {
    "plain fp32": [],
    "grad checkpointing": ["generator.gradient_checkpointing=true"],
    "frozen bf16 (bf16-mixed)": ["generator.frozen_dtype=bf16", "trainer.precision=bf16-mixed"],
    "LPIPS bf16": ["loss.lpips.dtype=bf16"],
    "8-bit AdamW": ["optim.use_8bit=true"],
    "all of the above": ["generator.gradient_checkpointing=true", "generator.frozen_dtype=bf16",
                         "trainer.precision=bf16-mixed", "loss.lpips.dtype=bf16", "optim.use_8bit=true"],
}
BASE = ["data=demo", "logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=vgg"]
DEVICE = resolve_device()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench_inference(model: str, size: int, batches: list[int], repeats: int, cases: list[str]) -> None:
    cfg = compose_config([f"model={model}", *BASE])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        components = build_components(cfg.model)
        generator, _ = build_generator(components, cfg.generator, share_unet=True)
    with torch.no_grad():
        for p in generator.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)  # trained-looking LoRA (B starts at 0)
    print(f"\ninference, model={model}, {DEVICE}, {size}x{size} x_L -> x_H, median of {repeats}")
    print(f"{'case':34s} {'batch':>5s} {'ms/batch':>10s} {'img/s':>8s} {'speed-up':>8s} {'max|diff|':>10s}")
    base: dict[int, tuple[float, torch.Tensor]] = {}
    for name in cases:
        opts = {"device": str(DEVICE), "color_fix": "none", **INFER_CASES[name]}
        pipe = SRPipeline(copy.deepcopy(generator), components.text, NullPrompt(), 4, opts)
        for b in batches:
            x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b)).to(DEVICE) * 2 - 1
            embeds = pipe.embed([""] * b)
            with torch.inference_mode():
                sec = statistics.median(timings(lambda p=pipe, x=x, e=embeds: p.generate(x, e), repeats, warmup=2))
                out = pipe.generate(x, embeds).float()
            base.setdefault(b, (sec, out))
            diff = (out - base[b][1]).abs().max().item()
            print(f"{name:34s} {b:5d} {sec * 1000:10.1f} {b / sec:8.2f} {base[b][0] / sec:7.2f}x {diff:10.2e}")
        del pipe


def case_config(model: str, size: int, batch: int, name: str, extra: tuple[str, ...] = ()) -> DictConfig:
    """The training config of one memory-option case."""
    overrides = [f"model={model}", *BASE, f"data.batch_size={batch}", f"data.crop_size={size}", *TRAIN_CASES[name], *extra]
    return compose_config(overrides)


def predict_case(model: str, size: int, batch: int, name: str) -> tuple[MemoryPrediction, bool]:
    """osediff_lab.memory's prediction for the case, and whether 8-bit AdamW was predicted as AdamW (its
    kernels need real tensors; 8-bit states are 6 bytes per trainable parameter smaller)."""
    eight_bit = "optim.use_8bit=true" in TRAIN_CASES[name]
    return predict_training_memory(case_config(model, size, batch, name, ("optim.use_8bit=false",))), eight_bit


def train_case(model: str, size: int, batch: int, name: str, repeats: int) -> dict:
    """Seconds per step (generator + regularizer, both optimisers stepping) and peak memory for one case."""
    cfg = case_config(model, size, batch, name)
    torch.manual_seed(0)
    module = build_module(cfg).to(DEVICE).train()
    hq = torch.rand(batch, 3, size, size, device=DEVICE) * 2 - 1
    step = training_step(module, hq)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = statistics.median(timings(step, repeats, warmup=2))
    peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": name, "batch": batch, "s_per_step": sec, "peak_gib": peak / 2**30}


def bench_training(model: str, size: int, batches: list[int], repeats: int, cases: list[str], predict: bool) -> None:
    kind = "peak allocated (CUDA)" if DEVICE.type == "cuda" else "peak RSS of a fresh process"
    print(f"\ntraining step, model={model}, {DEVICE}, {size}x{size}, LPIPS vgg (random weights), median of {repeats}")
    print(f"{'case':28s} {'batch':>5s} {'s/step':>8s} {'vs plain':>8s} {'GiB ' + kind:>30s} {'GiB predicted':>14s}")
    plain: dict[int, float] = {}
    for name in cases:
        for b in batches:
            if DEVICE.type == "cuda":
                r = train_case(model, size, b, name, repeats)
                torch.cuda.empty_cache()
            else:  # RSS only grows: a fresh process per case
                cmd = [sys.executable, __file__, "--child", json.dumps([model, size, b, name, repeats])]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            plain.setdefault(b, r["s_per_step"])
            pred_cell = "-"
            if predict:
                pred, as_adamw = predict_case(model, size, b, name)
                pred_cell = f"{pred.peak / 2**30:.2f}" + ("*" if as_adamw else "")
            print(f"{name:28s} {b:5d} {r['s_per_step']:8.3f} {plain[b] / r['s_per_step']:7.2f}x {r['peak_gib']:30.2f} {pred_cell:>14s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=512 if DEVICE.type == "cuda" else 128,
                        help="image side (default 512 on GPU, 128 on CPU; use 128 or 256 for sd21_shape on CPU)")
    parser.add_argument("--train-size", type=int, default=None, help="training crop side (default: --size)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--infer-cases", nargs="*", default=list(INFER_CASES))
    parser.add_argument("--train-cases", nargs="*", default=list(TRAIN_CASES))
    parser.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                        help="add osediff_lab.memory's predicted peak beside each measured one (seconds per case)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_case(*json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}")
    print(OmegaConf.to_yaml({"model": args.model, "size": args.size}).strip())
    if args.infer_cases:
        bench_inference(args.model, args.size, args.batches, args.repeats, args.infer_cases)
    if args.train_cases:
        bench_training(args.model, args.train_size or args.size, args.train_batches, args.repeats, args.train_cases, args.predict)


if __name__ == "__main__":
    main()
