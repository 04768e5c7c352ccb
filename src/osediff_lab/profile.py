"""`python -m osediff_lab.profile [model=sd21_shape] [profile.latency.size=128]`: the complexity table.

Per module (prompt extractor, text encoder, VAE encoder incl. quant_conv, UNet, VAE decoder incl.
post_quant_conv, total): parameters, trainable parameters (LoRA as configured), GMACs for a 512 x 512
input and latency on the current device. MACs are counted the paper's way, Conv2d and Linear only
(torch's FLOP counter: FLOPs / 2), with attention's matrix products (QK^T and AV) in their own column;
they are counted on the meta device, so the full-size model never needs memory. Parameters are those
that run at inference (LoRA merged); trainable ones are the generator's adapters and conv_in.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from osediff_lab import resolvers
from osediff_lab.build import target
from osediff_lab.dtypes import resolve_device, resolve_dtype
from osediff_lab.io import atomic_write_text
from osediff_lab.methods.base import GENERATOR, Method
from osediff_lab.models.backbone import denoiser_output, vae_factor
from osediff_lab.models.components import Components, build_components
from osediff_lab.models.lora import merge_and_unload
from osediff_lab.models.lora_files import lora_sidecar
from osediff_lab.paths import CONF_DIR
from osediff_lab.prompts.ram import RAMArch, RAMTagger
from osediff_lab.tables import markdown_table

log = logging.getLogger(__name__)

# aten ops FlopCounterMode counts, by column: dense layers (the paper's count) and attention's products.
DENSE_OPS = ("convolution", "_convolution", "mm", "addmm", "_scaled_mm")
ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product")
NO_LATENCY = {"--no-latency": "profile.latency.enabled=false"}  # a shorthand for the config switch
LABELS = {
    "prompt_extractor": "prompt extractor (DAPE)",
    "prompt_backbone": "- of which Swin-L image encoder",
    "text_encoder": "text encoder",
    "vae_encoder": "VAE encoder",
    "unet": "UNet",
    "vae_decoder": "VAE decoder",
    "total": "total",
}
# Why our count and the paper's differ, per module; printed beside any row further off than profile.note_above.
EXPLANATIONS = {
    "unet": "Conv2d + Linear with LoRA merged at a 64x64 latent; the paper does not name its counter, and none of "
    "the alternatives matches 355: LoRA unmerged gives 342.1, adding attention's products 402.1, norms (2 per "
    "element) and activations add 0.19. The VAE rows, counted the same way, agree within 0.2%, so input size "
    "and convolution counting are the same; the gap is within the 5% tolerance",
    "text_encoder": "SD2.1 runs 23 of OpenCLIP-H's 24 layers (penultimate-layer output) at 77 tokens: "
    "23 x 77 x 12 x 1024^2 = 22.3 GMACs; all 24 layers would be 23.2",
    "prompt_extractor": "the paper's 104 is RAM's Swin-L image encoder alone at 384 px, counted as Swin's authors "
    "count it (dense + attention products, see the next row); RAM's tagging head (4585 tag queries through "
    "cross-attention layers, plus the label-embedding projection) is not in it",
}
# Model presets at the paper's sizes; other presets get no paper column.
PAPER_MODELS = ("sd21_shape", "sd21_base")
# Rows whose paper figure includes attention's products (Swin's published count), compared on dense + attention.
PAPER_COUNTS_ATTENTION = ("prompt_backbone",)


@dataclass
class MacCount:
    """Multiply-accumulates of one forward pass: dense (Conv2d + Linear) and attention's matrix products."""

    dense: float
    attention: float


def op_column(op_name: str) -> str:
    """'dense' or 'attention' for an aten op name such as 'aten.addmm'; raises for an op we do not classify."""
    base = op_name.split(".")[-1]
    if base in DENSE_OPS:
        return "dense"
    if base in ("bmm", "baddbmm") or base.startswith(ATTENTION_OPS[-1]):
        return "attention"
    raise ValueError(f"the FLOP counter reported {op_name}, which this profiler does not classify")


def count_macs(fn: Callable[[], Any]) -> MacCount:
    """MACs of ``fn()`` (FLOPs / 2 from torch's FLOP counter); run it on meta tensors to need no memory."""
    with FlopCounterMode(display=False) as counter:
        fn()
    totals = {"dense": 0.0, "attention": 0.0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        totals[op_column(str(op))] += flops / 2
    return MacCount(**totals)


@dataclass
class Latency:
    """Wall time of repeated calls after warm-up, in milliseconds."""

    median_ms: float
    iqr_ms: float
    min_ms: float


def timings(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (CUDA-synchronised)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure_latency(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Latency:
    """Median, inter-quartile range and minimum of ``fn()`` over ``repeats`` runs, in inference mode."""
    if repeats < 1:
        raise ValueError(f"profile.latency.repeats must be >= 1, got {repeats}")
    with torch.inference_mode():
        times = [t * 1000 for t in timings(fn, device, warmup, repeats)]
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Latency(statistics.median(times), q[2] - q[0], min(times))


@dataclass
class Modules:
    """The inference modules in profiling order; ``tagger`` is None without a DAPE prompt."""

    tagger: RAMTagger | None
    components: Components

    def parts(self) -> dict[str, list[nn.Module]]:
        vae = self.components.vae
        parts = {
            "text_encoder": self.components.text_modules(),
            "vae_encoder": [m for m in (vae.encoder, vae.quant_conv) if m is not None],
            "unet": [self.components.denoiser],
            "vae_decoder": [m for m in (vae.decoder, vae.post_quant_conv) if m is not None],
        }
        return ({"prompt_extractor": [self.tagger]} if self.tagger is not None else {}) | parts

    def runs(self, size: int, timestep: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
        """One forward per module at batch 1 for an image of ``size`` px (the tagger at its own input size; the
        text encoders at their tokenizers' lengths; the denoiser at the generator's ``timestep``)."""
        c = self.components
        factor = vae_factor(c.vae)
        x = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
        z = torch.zeros(1, c.vae.config.latent_channels, size // factor, size // factor, device=device, dtype=dtype)
        embeds = c.text([""]).to(dtype)
        t = c.backbone.schedule(c.scheduler).model_timestep(torch.full((1,), timestep, dtype=torch.long, device=device), z)
        runs: dict[str, Callable[[], Any]] = {}
        if self.tagger is not None:
            side = self.tagger.arch.image_size
            img = torch.zeros(1, 3, side, side, device=device, dtype=dtype)
            runs["prompt_extractor"] = lambda: self.tagger(img)
        runs["text_encoder"] = lambda: c.text([""])
        runs["vae_encoder"] = lambda: c.vae.encode(x)
        runs["unet"] = lambda: denoiser_output(c.denoiser, z, t, embeds, factor)
        runs["vae_decoder"] = lambda: c.vae.decode(z)
        return runs


def build_method(cfg: DictConfig, components: Components) -> Method:
    """The configured method (``cfg.method``) over ``components``, as training builds it but without LPIPS: a
    frozen network outside the generator that the profile does not count."""
    no_lpips = {"lpips_weight": 0.0} if "lpips_weight" in cfg.method else {}
    return instantiate(cfg.method, components=components, encode_text=components.text, lpips=None,
                       _recursive_=False, **no_lpips)


def build_modules(cfg: DictConfig, training: bool = False) -> tuple[Modules, dict[str, int]]:
    """The configured method's inference generator with its LoRA merged. With ``training`` the whole method is
    built (every trained group: use on the meta device) and trainable parameters are counted per row, plus each
    further group's (the regularizer, a discriminator)."""
    prompt = cfg.get("prompt")
    tagger = RAMTagger(RAMArch.from_config(prompt.arch)) if prompt is not None and prompt.name in ("dape", "ram") else None
    components = build_components(cfg.model)
    trainable: dict[str, int] = {}
    if training:
        method = build_method(cfg, components)
        generator = method.generator
        named = Modules(None, components.replace(vae=generator.vae, denoiser=generator.unet)).parts()
        trainable = {k: sum(p.numel() for m in ms for p in m.parameters() if p.requires_grad) for k, ms in named.items()}
        trainable |= {name: sum(p.numel() for p in group.params) for name, group in method.param_groups().items()
                      if name != GENERATOR}
    else:
        generator, _ = target(cfg.method, "method").inference_generator(components, lora_sidecar(cfg, {}))
    merge_and_unload(generator)
    return Modules(tagger, components.replace(vae=generator.vae, denoiser=generator.unet)), trainable


def profile_rows(cfg: DictConfig) -> list[dict[str, Any]]:
    """One dict per module and the total: params, trainable, GMACs (dense, attention), paper, rel. diff, latency."""
    pc = cfg.profile
    with torch.device("meta"):
        modules, trainable = build_modules(cfg, training=True)
        macs = {k: count_macs(fn) for k, fn in modules.runs(pc.macs_size, cfg.generator.timestep, torch.device("meta"), torch.float32).items()}
    params = {k: sum(p.numel() for m in ms for p in m.parameters()) for k, ms in modules.parts().items()}
    if modules.tagger is not None:
        swin, side = modules.tagger.visual_encoder, modules.tagger.arch.image_size
        with torch.device("meta"):
            img = torch.zeros(1, 3, side, side)
            macs["prompt_backbone"] = count_macs(lambda: swin(img))
        params["prompt_backbone"] = sum(p.numel() for p in swin.parameters())
    del modules
    latency = measure_all(cfg) if pc.latency.enabled else {}
    paper_gmacs = pc.paper_gmacs if cfg.model.name in PAPER_MODELS else {}
    rows = []
    for key in sorted(macs, key=list(LABELS).index):
        paper = paper_gmacs.get(key if key != "prompt_extractor" else "prompt_backbone")
        gmacs = macs[key].dense / 1e9
        compared = gmacs + (macs[key].attention / 1e9 if key in PAPER_COUNTS_ATTENTION else 0)
        rows.append({
            "module": key, "params": params[key], "trainable": trainable.get(key, 0),
            "gmacs": gmacs, "attention_gmacs": macs[key].attention / 1e9,
            "paper_gmacs": paper, "rel_diff": (compared - paper) / paper if paper and key != "prompt_extractor" else None,
            "latency": asdict(latency[key]) if key in latency else None,
        })
    summed = [r for r in rows if r["module"] != "prompt_backbone"]
    total_paper = sum(paper_gmacs.values()) if paper_gmacs and len(summed) == len(paper_gmacs) else None
    total = {
        "module": "total", "params": sum(r["params"] for r in summed), "trainable": sum(r["trainable"] for r in summed),
        "gmacs": sum(r["gmacs"] for r in summed), "attention_gmacs": sum(r["attention_gmacs"] for r in summed),
        "paper_gmacs": total_paper, "latency": None,
    }
    total["rel_diff"] = (total["gmacs"] - total_paper) / total_paper if total_paper else None
    if latency:
        total["latency"] = {"median_ms": sum(v.median_ms for v in latency.values()), "iqr_ms": None, "min_ms": None}
    further = [{"module": f"{name} (training only)", "trainable": count} for name, count in trainable.items() if name not in params]
    return [*rows, total, *further]


def measure_all(cfg: DictConfig) -> dict[str, Latency]:
    """Latency per module with real (random) weights at ``profile.latency.size`` on the current device."""
    lc = cfg.profile.latency
    if lc.threads:
        torch.set_num_threads(int(lc.threads))
    device = resolve_device()
    dtype = resolve_dtype(lc.precision, device, torch.bfloat16, key="profile.latency.precision")
    torch.manual_seed(cfg.seed)
    modules, _ = build_modules(cfg)
    for ms in modules.parts().values():
        for m in ms:
            m.to(device, dtype).eval()
    runs = modules.runs(lc.size, cfg.generator.timestep, device, dtype)
    out = {}
    for key, fn in runs.items():
        out[key] = measure_latency(fn, device, lc.warmup, lc.repeats)
        log.info("%s: %.1f ms", key, out[key].median_ms)
    return out


def profile_report(rows: list[dict[str, Any]], cfg: DictConfig) -> str:
    """The rows as a markdown table, with the device, sizes and any explanation of a paper mismatch."""
    pc, lc = cfg.profile, cfg.profile.latency
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lat = f"latency at {lc.size}x{lc.size}, batch 1, {lc.precision}, on {device}" if lc.enabled else "latency skipped"
    header = ["module", "params (M)", "trainable (M)", "GMACs", "attention GMACs", "paper GMACs", "diff", "latency ms (IQR)"]
    cells, notes = [], []
    for r in rows:
        if r["module"] not in LABELS:
            cells.append([r["module"], "", f"{r['trainable'] / 1e6:.2f}", "", "", "", "", ""])
            continue
        paper = f"{r['paper_gmacs']:g}" if r["paper_gmacs"] else "-"
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:+.1%}" + (" (outside)" if abs(r["rel_diff"]) > pc.tolerance else "")
        la = r["latency"]
        lat_cell = "-" if la is None else f"{la['median_ms']:.1f}" + (f" ({la['iqr_ms']:.1f})" if la["iqr_ms"] is not None else "")
        cells.append([LABELS[r["module"]], f"{r['params'] / 1e6:.1f}", f"{r['trainable'] / 1e6:.2f}", f"{r['gmacs']:.1f}",
                      f"{r['attention_gmacs']:.1f}", paper, diff, lat_cell])
        off = r["rel_diff"] is None or abs(r["rel_diff"]) > pc.note_above
        if r["paper_gmacs"] and off and r["module"] in EXPLANATIONS:
            notes.append(f"- {LABELS[r['module']]}: {r['gmacs']:.1f} GMACs vs the paper's {paper}: {EXPLANATIONS[r['module']]}")
    lines = [
        f"model={cfg.model.name}: GMACs (Conv2d + Linear) for a {pc.macs_size}x{pc.macs_size} input, text at "
        f"the tokenizers' lengths (CLIP 77); {lat} (median over {lc.repeats} after {lc.warmup} warm-up; total = sum of medians)",
        "",
        *markdown_table(header, cells, right=range(1, len(header))),
    ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def run_profile(cfg: DictConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """Profile, print the table, write profile.md and profile.json to ``out_dir``; returns the rows."""
    rows = profile_rows(cfg)
    table = profile_report(rows, cfg)
    print(table)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "profile.md", table)
    atomic_write_text(out_dir / "profile.json", json.dumps({"model": cfg.model.name, "rows": rows}, indent=2))
    print(f"written: {out_dir / 'profile.md'}, {out_dir / 'profile.json'}")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="profile")
def main(cfg: DictConfig) -> None:
    run_profile(cfg, cfg.paths.output_dir)


if __name__ == "__main__":
    resolvers.refuse_renamed_choices(sys.argv)
    sys.argv = [NO_LATENCY.get(a, a) for a in sys.argv]
    main()
