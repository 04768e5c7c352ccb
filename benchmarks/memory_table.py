"""Predicted peak training memory of the large bases per method and memory option, and with the frozen base sharded.

`python benchmarks/memory_table.py --models sd3_shape flux_shape --size 1024 --out results.jsonl`
Each case replays two training steps on fake tensors (osediff_lab.memory: peak bytes held by tensors, what
torch.cuda.max_memory_allocated reports; add about 0.5 GiB of CUDA context). The options are cumulative: plain bf16
(bf16-mixed, frozen weights bf16, the generator's own copy of the denoiser), + one shared base
(generator.share_base), + gradient checkpointing, + the frozen denoiser in fp8 (generator.frozen_dtype=fp8_e4m3).
PiSA-SR and HYPIR hold one denoiser already (their + shared base row equals plain). FSDP over N GPUs is arithmetic
on the last row: the frozen denoiser's bytes / N per GPU, plus two gathered blocks (the one running and the one
prefetched); text encoders are counted in every row and listed apart (a full prompt cache leaves them unloaded).
Results append to --out as JSON lines (a case already there is not run again); the markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from osediff_lab import resolvers  # noqa: F401  (registers the config resolvers)
from osediff_lab.memory import GIB, predict_training_memory
from osediff_lab.models.components import build_components
from osediff_lab.models.frozen import store_fp8
from osediff_lab.paths import CONF_DIR

METHODS = {"OSEDiff": ["method=osediff"], "PiSA-SR (pixel stage)": ["method=pisasr_pixel"],
           "OSEDiff+GAN": ["method=osediff_gan"], "HYPIR": ["method=hypir", "discriminator.backbone.source=random", "+discriminator.backbone.depths=[3,4,30,3]",
                     "+discriminator.backbone.dims=[384,768,1536,3072]", "+discriminator.backbone.num_classes=1024"]}
# HYPIR: a random tower at convnext_xxlarge's sizes (timm), the shapes of its pretrained CLIP discriminator
ONE_DENOISER = ("PiSA-SR (pixel stage)", "HYPIR")
OPTIONS = {
    "plain bf16": ["trainer.precision=bf16-mixed", "generator.frozen_dtype=bf16", "generator.share_base=false"],
    "+ shared base": ["generator.share_base=true"],
    "+ grad. checkpointing": ["generator.gradient_checkpointing=true"],
    "+ fp8 base": ["generator.frozen_dtype=fp8_e4m3"],
}
GPUS = (2, 4, 8)


def config(model: str, size: int, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="memory", overrides=[f"model={model}", f"data.crop_size={size}", "data.batch_size=1",
                                                      *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"  # nothing is written; the CLI's is Hydra's run directory
    return cfg


def frozen_base(model: str, fp8: bool) -> dict[str, int]:
    """Bytes of the frozen denoiser (bf16, or fp8 where stored so), of its largest block, and of the text encoders."""
    cfg = config(model, 64, [])
    with torch.device("meta"):
        components = build_components(cfg.model)
    net = components.denoiser.requires_grad_(False).to(torch.bfloat16)
    if fp8:
        store_fp8(net)

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    blocks = [b for m in net.children() if isinstance(m, torch.nn.ModuleList) for b in m]
    text = sum(p.numel() * 2 for m in components.text_modules() for p in m.parameters())
    return {"denoiser": nbytes(net), "block": max(nbytes(b) for b in blocks), "text": text}


def run(models: list[str], size: int, out: Path) -> list[dict]:
    done = {(r["model"], r["method"], r["option"]): r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    for model in models:
        for method, method_args in METHODS.items():
            overrides = list(method_args)
            for option, option_args in OPTIONS.items():
                overrides += option_args
                if (model, method, option) in done:
                    continue
                if method in ONE_DENOISER and option == "+ shared base":
                    row = dict(done[(model, method, "plain bf16")], option=option)
                else:
                    start = time.perf_counter()
                    p = predict_training_memory(config(model, size, overrides), steps=2)
                    row = {"model": model, "method": method, "option": option, "peak": p.peak, "static": p.static,
                           "seconds": round(time.perf_counter() - start)}
                done[(model, method, option)] = row
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{model} {method} {option}: {row['peak'] / GIB:.1f} GiB", flush=True)
    return [done[k] for k in done if k[0] in models]


def table(rows: list[dict], models: list[str]) -> str:
    lines = ["| model | method | " + " | ".join(OPTIONS) + " | " + " | ".join(f"+ FSDP {n} GPUs" for n in GPUS) + " |",
             "|---|---|" + "---:|" * (len(OPTIONS) + len(GPUS))]
    for model in models:
        base = frozen_base(model, fp8=True)
        for method in METHODS:
            got = {r["option"]: r for r in rows if r["model"] == model and r["method"] == method}
            if len(got) < len(OPTIONS):
                continue
            last = got[list(OPTIONS)[-1]]["peak"]
            sharded = [last - base["denoiser"] + base["denoiser"] / n + 2 * base["block"] for n in GPUS]
            cells = [f"{got[o]['peak'] / GIB:.1f}" for o in OPTIONS] + [f"{b / GIB:.1f}" for b in sharded]
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        lines.append(f"| {model} | text encoders in every row (bf16) | {base['text'] / GIB:.1f} GiB | fp8 denoiser "
                     f"{base['denoiser'] / GIB:.1f} GiB, largest block {base['block'] / GIB:.2f} GiB |" + " |" * (len(OPTIONS) + len(GPUS) - 2))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd3_shape", "flux_shape"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("outputs/memory_table.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(table(run(args.models, args.size, args.out), args.models))


if __name__ == "__main__":
    main()
