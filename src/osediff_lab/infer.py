"""`python -m osediff_lab.infer input=<file or folder> output=<folder> ckpt=<file> [options]`.

Super-resolves every image under ``input`` (recursively; files read by the one loader,
``osediff_lab.data.images``), writing ``<name>.png`` and the prompt used as ``<name>.txt`` under ``output``
(sub-folders kept). Unreadable or failing images are reported and skipped; the summary (also
``output/summary.json``) lists what failed and why. Exit status 1 when any image failed; a folder without
any image file is an error naming the folder and the suffixes looked for.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from osediff_lab.data.images import UnreadableImage, image_extensions, list_images, load_rgb
from osediff_lab.errors import ConfigError, user_errors
from osediff_lab.io import atomic_write, atomic_write_text
from osediff_lab.paths import CONF_DIR
from osediff_lab.resolvers import refuse_renamed_choices

if TYPE_CHECKING:  # the pipeline (diffusers, transformers, peft) is imported when a run needs it
    from osediff_lab.pipeline import SRPipeline

log = logging.getLogger(__name__)


def collect_inputs(source: str | Path) -> list[tuple[Path, Path]]:
    """(input file, output path without suffix relative to the output folder), sorted.

    A single file is taken whatever its suffix; a folder contributes files with an image suffix, at least one.
    """
    source = Path(source).expanduser()
    if source.is_file():
        return [(source, Path(source.stem))]
    if not source.is_dir():
        raise ConfigError(f"input={source} is neither a file nor a folder")
    files = list_images(source)
    if not files:
        raise ConfigError(
            f"input={source}: no image files in this folder (or below); looked for the suffixes "
            + " ".join(sorted(image_extensions()))
        )
    return [(p, p.relative_to(source).with_suffix("")) for p in files]


def sibling(stem: Path, suffix: str) -> Path:
    """``stem`` + suffix without eating dots in the name (``a.v2`` -> ``a.v2.png``)."""
    return stem.parent / f"{stem.name}{suffix}"


def super_resolve_file(pipe: SRPipeline, src: Path, stem: Path) -> Path:
    """Super-resolve ``src`` into ``stem``.png, with its prompt in ``stem``.txt; both written atomically."""
    sr, prompt = pipe.enhance_image(load_rgb(src))
    dst = sibling(stem, ".png")
    atomic_write(dst, lambda tmp: sr.save(tmp, format="PNG"))
    atomic_write_text(sibling(stem, ".txt"), prompt + "\n")
    return dst


def try_super_resolve(pipe: SRPipeline, src: Path, stem: Path) -> str | None:
    """``super_resolve_file``, returning why it failed (None on success) for errors of one input only."""
    try:
        super_resolve_file(pipe, src, stem)
    except UnreadableImage as exc:
        return exc.reason
    except (ValueError, torch.OutOfMemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_inference(cfg: DictConfig) -> dict:
    """Process every input; returns the summary {output, succeeded, failed: [{input, reason}]}."""
    inputs = collect_inputs(cfg.input)
    out_root = Path(cfg.output)
    from osediff_lab.pipeline import SRPipeline

    pipe = SRPipeline.from_checkpoint(cfg.ckpt, base=cfg.get("base"), options=cfg.pipeline, prompt=cfg.get("prompt"))
    written: dict[Path, Path] = {}
    failed: list[dict[str, str]] = []
    for src, rel in tqdm(inputs, desc="super-resolving", unit="img", disable=not inputs):
        dst = sibling(out_root / rel, ".png")
        if dst in written:
            failed.append({"input": str(src), "reason": f"output {dst} already written for {written[dst]}"})
            continue
        reason = try_super_resolve(pipe, src, out_root / rel)
        if reason:
            failed.append({"input": str(src), "reason": reason})
            tqdm.write(f"skipped {src}: {reason}")
            continue
        written[dst] = src
    summary = {"output": str(out_root), "succeeded": len(written), "failed": failed}
    atomic_write_text(out_root / "summary.json", json.dumps(summary, indent=2))
    print(f"\nosediff-lab infer: {len(written)} of {len(inputs)} images written to {out_root}")
    for item in failed:
        print(f"  FAILED {item['input']}: {item['reason']}")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="infer")
@user_errors
def main(cfg: DictConfig) -> None:
    summary = run_inference(cfg)
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    refuse_renamed_choices(sys.argv)  # `prompt=null` is `prompt=none` now: say so, as train does
    main()
