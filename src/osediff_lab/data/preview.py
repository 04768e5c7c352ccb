"""`python -m osediff_lab.data.preview degradation=realesrgan data=demo`: a PNG grid of HQ crops and their LQ.

One column per sample (a batch of ``data.batch_size``): HQ on top, LQ (nearest-upscaled to the HQ size)
below, then the sampled degradation parameters as text, so a person can look at what training sees.
Unreadable source images are skipped as in training, listed with the reason (printed, and in the JSON
written beside the grid); the exit status is 1 when any was skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from osediff_lab.data.datamodule import HQDataModule
from osediff_lab.data.degradation import build_degradation, degrade_pair
from osediff_lab.data.realesrgan import describe
from osediff_lab.errors import user_errors
from osediff_lab.io import atomic_write_text
from osediff_lab.paths import CONF_DIR
from osediff_lab.resolvers import refuse_renamed_choices  # also registers ${run_id:...} for train.yaml

LINE_HEIGHT = 12


def to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> 8-bit RGB PIL image."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def preview_grid(hq: torch.Tensor, lq: torch.Tensor, captions: list[list[str]]) -> Image.Image:
    """HQ (B, 3, H, W) and LQ (B, 3, h, w), both in [-1, 1], with text lines per sample, as one image."""
    b, _, h, w = hq.shape
    width = max(w, 230)
    text_h = LINE_HEIGHT * (max((len(c) for c in captions), default=0) + 1)
    grid = Image.new("RGB", (b * (width + 4), 2 * h + text_h + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        x0 = i * (width + 4)
        grid.paste(to_image(hq[i]), (x0, 0))
        grid.paste(to_image(lq[i]).resize((w, h), Image.NEAREST), (x0, h + 4))
        for j, line in enumerate(captions[i]):
            draw.text((x0 + 2, 2 * h + 8 + j * LINE_HEIGHT), line, fill="black")
    return grid


def write_preview(cfg: DictConfig) -> tuple[Path, list[dict[str, str]]]:
    """Degrade one batch of the configured data with the configured degradation; write the grid and its JSON.

    Returns the grid's path and the skipped images ({path, reason}), also those a data worker found."""
    torch.manual_seed(int(cfg.seed))
    dm = HQDataModule(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    hq = batch["hq"]
    degradation = build_degradation(cfg.degradation, cfg.scale)
    hq, lq = degrade_pair(degradation, hq)
    records = getattr(degradation, "last_params", None)
    captions = [describe(r) for r in records] if records else [[f"{cfg.degradation.name} x{cfg.scale}"]] * hq.shape[0]
    out = Path(cfg.paths.output_dir) / "preview" / f"degradation_{cfg.degradation.name}_seed{cfg.seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(hq, lq, captions).save(out)
    reasons = dict(dm.train_set.reasons)  # with worker processes, what they found travels in the batch
    for report in batch.get("unreadable", []):
        for line in report.splitlines():
            path, _, reason = line.partition("\t")
            reasons.setdefault(path, reason)
    skipped = [{"path": p, "reason": r} for p, r in reasons.items()]
    atomic_write_text(out.with_suffix(".json"), json.dumps({"grid": str(out), "skipped_images": skipped}, indent=2))
    return out, skipped


def run_preview(cfg: DictConfig) -> Path:
    """``write_preview``, returning the grid's path."""
    return write_preview(cfg)[0]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@user_errors
def main(cfg: DictConfig) -> None:
    out, skipped = write_preview(cfg)
    print(out)
    for item in skipped:
        print(f"  SKIPPED {item['path']}: {item['reason']}")
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    refuse_renamed_choices(sys.argv)  # `prompt=null` is `prompt=none` now: say so, as train does
    main()
