"""`python -m osediff_lab.export ckpt=<.ckpt | our .safetensors> out=<file.safetensors | folder> [format=...]`: a
trained generator in another format, with its model card; conf/export.yaml holds the keys and their defaults.

- ``format=lora`` (default): our LoRA-only safetensors + JSON sidecar (``osediff_lab.models.lora_files``); to a
  ``.safetensors`` file as before (from a training checkpoint, no card), or into a folder with the card;
- ``format=diffusers``: the base model's diffusers folder with the LoRA merged, and ``infer.py``, which needs no
  osediff_lab (``exports.diffusers_folder``);
- ``format=kohya`` / ``comfyui``: LoRA files in kohya's layout, which ComfyUI reads (``exports.kohya``).

Folders are written whole or not at all (``exports.staging``); ``push_to_hub=<repo>`` then uploads one
(``exports.hub``), or, offline or without a token, prints the command that does and exits with status 3.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.exports.card import RunRecord, build_card, card_problems, find_run_dir, write_card
from osediff_lab.exports.diffusers_folder import SCRIPT, write_diffusers
from osediff_lab.exports.hub import HubUnavailable, push_folder
from osediff_lab.exports.kohya import write_kohya
from osediff_lab.exports.loaded import load_export
from osediff_lab.exports.staging import staged_folder
from osediff_lab.models.lora_files import export_from_checkpoint
from osediff_lab.paths import CONF_DIR
from osediff_lab.pipeline.checkpoints import method_class, read_checkpoint

FORMATS = ("lora", "diffusers", "kohya", "comfyui")
HUB_UNAVAILABLE_EXIT = 3
USAGE = ("usage: python -m osediff_lab.export ckpt=<.ckpt | .safetensors> out=<file.safetensors | folder> "
         f"[format={'|'.join(FORMATS)}] [push_to_hub=<user/repo>] (conf/export.yaml)")


def defaults() -> DictConfig:
    """conf/export.yaml: every key of the command and its default."""
    return OmegaConf.load(CONF_DIR / "export.yaml")


def lora_usage(weights: str) -> str:
    """The card's usage section of a format=lora export."""
    return (f"With osediff-lab installed, from this folder:\n\n```bash\npython -m osediff_lab.infer input=lq.png output=sr/ "
            f"ckpt={weights}\n```\n\n```python\nfrom osediff_lab.pipeline import SRPipeline\n"
            f"pipe = SRPipeline.from_checkpoint(\"{weights}\")\nsr_images = pipe([pil_image])\n```")


def diffusers_usage(script: str) -> str:
    """The card's usage section of a format=diffusers export: the script, whole."""
    return ("The denoiser and VAE have the LoRA merged in and load with their own diffusers classes; the script below "
            f"(also `{SCRIPT}` here) needs torch, diffusers, transformers and Pillow, not osediff-lab, and reproduces "
            "the project's pipeline (size rule, colour fix) except its latent and VAE tiling, which large images use:\n\n"
            f"```bash\npython {SCRIPT} . lq.png sr.png\n```\n\n```python\n{script.rstrip()}\n```")


def export_folder(args: DictConfig, out: Path) -> Path:
    """Write the export of ``args.format`` and its card into folder ``out``, atomically; returns the card's path."""
    ckpt_path = Path(str(args.ckpt))
    run = RunRecord.from_dir(Path(str(args.run_dir)) if args.run_dir else find_run_dir(ckpt_path), int(args.card.max_images))
    with staged_folder(out) as tmp:
        if args.format == "lora":
            ckpt = read_checkpoint(ckpt_path)
            stem = method_class(ckpt).export_stem
            if ckpt_path.suffix == ".safetensors":
                shutil.copyfile(ckpt_path, tmp / f"{stem}.safetensors")
                shutil.copyfile(ckpt_path.with_suffix(".json"), tmp / f"{stem}.json")
            else:
                export_from_checkpoint(ckpt_path, tmp / f"{stem}.safetensors")
            meta, usage = ckpt.meta, lora_usage(f"{stem}.safetensors")
        else:
            loaded = load_export(ckpt_path, args.base, OmegaConf.to_container(args.pipeline))
            meta = loaded.ckpt.meta
            if args.format == "diffusers":
                write_diffusers(loaded, tmp)
                usage = diffusers_usage((tmp / SCRIPT).read_text())
            else:
                _, usage = write_kohya(loaded, tmp)
            (tmp / "osediff_sidecar.json").write_text(json.dumps(meta, indent=2))
        card = write_card(tmp, build_card(meta, run, str(args.format), usage, args.card), run)
        problems = card_problems(card)
        if problems:
            raise ConfigError("the model card does not validate: " + "; ".join(problems))
    return out / card.name


def write_run_card(run_dir: Path, sidecar: Path) -> Path:
    """The model card of a training run's LoRA export (``<run>/lora/README.md`` beside ``sidecar``, the run's sample
    grids under ``images/``), from the run directory; validated offline (a ConfigError lists what is wrong)."""
    card_cfg = defaults().card
    run = RunRecord.from_dir(run_dir, int(card_cfg.max_images))
    meta = json.loads(sidecar.read_text())
    card = write_card(sidecar.parent, build_card(meta, run, "lora", lora_usage(sidecar.with_suffix(".safetensors").name),
                                                 card_cfg), run)
    problems = card_problems(card)
    if problems:
        raise ConfigError("the model card does not validate: " + "; ".join(problems))
    return card


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    """CLI (keys: conf/export.yaml). Returns (weights, sidecar) for a LoRA file, else (folder, card)."""
    args = OmegaConf.merge(defaults(), OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    missing = [k for k in ("ckpt", "out") if args.get(k) is None]
    if missing:
        raise SystemExit(f"{USAGE} (missing {missing})")
    if args.format not in FORMATS:
        raise SystemExit(f"format={args.format} must be one of {list(FORMATS)}")
    out = Path(str(args.out))
    try:
        if args.format == "lora" and out.suffix == ".safetensors":
            if args.push_to_hub:
                raise ConfigError("push_to_hub uploads a folder: give out=<folder> (the weights, their sidecar and the card)")
            weights, sidecar = export_from_checkpoint(args.ckpt, out)
            print(f"LoRA weights {weights}\nsidecar      {sidecar}")
            return weights, sidecar
        card = export_folder(args, out)
        print(f"{args.format} export {out}\nmodel card    {card}")
        if args.push_to_hub:
            print(f"uploaded      {push_folder(out, str(args.push_to_hub), bool(args.private))}")
    except HubUnavailable as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(HUB_UNAVAILABLE_EXIT) from None
    except (ConfigError, MissingWeightsError) as exc:
        raise SystemExit(f"export failed: {exc}") from exc
    return out, card


if __name__ == "__main__":
    main()
