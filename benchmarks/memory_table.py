"""Predicted peak training memory of the large bases per method and memory option, and with the frozen base sharded.

`python benchmarks/memory_table.py --models sd3_shape flux_shape --size 1024 --out results.jsonl`
Each case replays two training steps on fake tensors (osediff_lab.memory: peak bytes held by tensors, what
torch.cuda.max_memory_allocated reports; add about 0.5 GiB of CUDA context). The options are cumulative: plain bf16
(bf16-mixed, frozen weights bf16, the generator's own copy of the denoiser), + one shared base
(generator.share_base), + gradient checkpointing, + the frozen denoiser in fp8 (generator.frozen_dtype=fp8_e4m3).
PiSA-SR and HYPIR hold one denoiser already (their + shared base row equals plain). FSDP over N GPUs is arithmetic
on the checkpointed bf16 row without text encoders (models/sharding.py sharded_bytes): the frozen denoiser's bytes / N
per GPU plus two gathered layers. + text cache: the last row less the text encoders' weights, which
text_cache.keep_encoders=false lets go (static for the whole run: the prediction subtracts exactly them).
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
from osediff_lab.models.sharding import frozen_units, sharded_bytes
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


def frozen_base(model: str) -> dict[str, int]:
    """Bytes of the frozen denoiser in bf16 and in fp8 storage, of its largest layer (an FSDP unit) in bf16, and of
    the text encoders in bf16."""
    cfg = config(model, 64, [])
    with torch.device("meta"):
        components = build_components(cfg.model)
    net = components.denoiser.requires_grad_(False).to(torch.bfloat16)

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    bf16, largest = nbytes(net), max(nbytes(u) for u in frozen_units(net))
    store_fp8(net)
    text = sum(p.numel() * 2 for m in components.text_modules() for p in m.parameters())
    return {"denoiser": bf16, "fp8": nbytes(net), "unit": largest, "text": text}


def run(models: list[str], methods: list[str], size: int, out: Path) -> list[dict]:
    done = {(r["model"], r["method"], r["option"]): r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    for model in models:
        for method in methods:
            overrides = list(METHODS[method])
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
    """GiB per method and option; FSDP columns: the checkpointed bf16 row with the frozen denoiser sharded (fp8
    storage keeps its weights in buffers, which FSDP does not shard)."""
    sharded_from = "+ grad. checkpointing"
    lines = ["| model | method | " + " | ".join(OPTIONS) + " | + text cache | "
             + " | ".join(f"ckpt + text cache + FSDP {n} GPUs" for n in GPUS) + " |",
             "|---|---|" + "---:|" * (len(OPTIONS) + 1 + len(GPUS))]
    notes = []
    for model in models:
        base = frozen_base(model)
        for method in METHODS:
            got = {r["option"]: r for r in rows if r["model"] == model and r["method"] == method}
            if len(got) < len(OPTIONS):
                continue
            ckpt = got[sharded_from]["peak"] - base["text"]
            sharded = [ckpt - base["denoiser"] + sharded_bytes(base["denoiser"], base["unit"], n) for n in GPUS]
            no_text = got[list(OPTIONS)[-1]]["peak"] - base["text"]
            cells = [f"{got[o]['peak'] / GIB:.1f}" for o in OPTIONS] + [f"{b / GIB:.1f}" for b in (no_text, *sharded)]
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        notes.append(f"{model}: frozen denoiser {base['denoiser'] / GIB:.2f} GiB in bf16, {base['fp8'] / GIB:.2f} GiB in fp8; "
                     f"largest layer {base['unit'] / GIB:.3f} GiB; text encoders {base['text'] / GIB:.2f} GiB in bf16, "
                     "in every row (text_cache.keep_encoders=false: none)")
    return "\n".join([*lines, "", *notes])


CARDS_GB = (24, 48, 80, 141)  # GB as sold; a card fits a config whose peak plus CUDA context is at most 90 % of it
CONTEXT = 0.5 * GIB


def smallest_card(peak: float) -> str:
    """The smallest card of CARDS_GB that holds ``peak`` bytes of tensors with margin, or 'none'."""
    fits = [gb for gb in CARDS_GB if peak + CONTEXT <= 0.9 * gb * 1e9]
    return f"{fits[0]} GB" if fits else "none"


def cards(rows: list[dict], models: list[str]) -> str:
    """The smallest card per method: plain bf16; every single-GPU tool (shared base, checkpointing, fp8, text cache);
    and each GPU of 8 with the checkpointed bf16 base sharded and the text cache."""
    lines = ["| base | method | plain bf16 | all single-GPU tools | FSDP, 8 GPUs |", "|---|---|---|---|---|"]
    for model in models:
        base = frozen_base(model)
        for method in METHODS:
            got = {r["option"]: r["peak"] for r in rows if r["model"] == model and r["method"] == method}
            if len(got) < len(OPTIONS):
                continue
            ckpt = got["+ grad. checkpointing"] - base["text"]
            fsdp = ckpt - base["denoiser"] + sharded_bytes(base["denoiser"], base["unit"], GPUS[-1])
            best = got[list(OPTIONS)[-1]] - base["text"]
            lines.append(f"| {model} | {method} | {smallest_card(got['plain bf16'])} | {smallest_card(best)} | "
                         f"{smallest_card(fsdp)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd3_shape", "flux_shape"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("outputs/memory_table.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(args.models, args.methods, args.size, args.out)
    print(table(rows, args.models), cards(rows, args.models), sep="\n\n")


if __name__ == "__main__":
    main()
