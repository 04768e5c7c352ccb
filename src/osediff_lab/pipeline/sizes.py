"""The paper's size rule: upsample by the scale, enlarge small inputs to the process size, pad to a
multiple of the VAE factor, and bring the result back to exactly scale x the input size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from osediff_lab.data.resize import resize


@dataclass(frozen=True)
class SizePlan:
    """(height, width) at each stage: ``work`` is what the network sees before padding to ``padded``."""

    work: tuple[int, int]
    padded: tuple[int, int]
    out: tuple[int, int]

    @property
    def enlarged(self) -> bool:
        return self.work != self.out


def plan_sizes(height: int, width: int, scale: int, process_size: int, multiple: int) -> SizePlan:
    """Sizes for an LQ image of ``height`` x ``width``: when its short side is below process_size/scale
    it is enlarged so the network's short side is process_size (the result is shrunk back afterwards)."""
    if height < 1 or width < 1:
        raise ValueError(f"image of size {height}x{width} has no pixels")
    out = (height * scale, width * scale)
    factor = max(1.0, process_size / (scale * min(height, width)))
    work = (max(1, round(out[0] * factor)), max(1, round(out[1] * factor)))
    padded = (math.ceil(work[0] / multiple) * multiple, math.ceil(work[1] / multiple) * multiple)
    return SizePlan(work, padded, out)


def to_network_input(lq: torch.Tensor, plan: SizePlan, upsampler: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """LQ batch in [0, 1] -> (x_L in [0, 1] at the work size, the same padded to the network size).

    Bicubic upsampling in one step to the work size, by torch (``upsampler="torch"``) or by Pillow on the
    8-bit image (``"pillow"``: what the public release feeds its network); padding mirrors the border
    (replicates it when the image is too thin to mirror), so no content is cropped or stretched.
    """
    x = pillow_bicubic(lq, plan.work) if upsampler == "pillow" else resize(lq, plan.work, "bicubic").clamp(0, 1)
    pad_h, pad_w = plan.padded[0] - plan.work[0], plan.padded[1] - plan.work[1]
    if pad_h == 0 and pad_w == 0:
        return x, x
    mode = "reflect" if pad_h < plan.work[0] and pad_w < plan.work[1] else "replicate"
    return x, F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pillow_bicubic(images01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Batch in [0, 1] -> rounded to 8 bits, resized to ``size`` (h, w) by Pillow's bicubic, back in [0, 1]
    (float32, same device): the release's ``Image.resize(..., Image.BICUBIC)`` on the loaded LQ image."""
    out = []
    for x in images01:
        array = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        resized = Image.fromarray(array, "RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    return (torch.stack(out).float() / 255).to(images01.device)


def unpad(x: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    """Drop the padding: a padded-size batch (any range) back to the work size."""
    return x[..., : plan.work[0], : plan.work[1]]


def to_output(sr: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    """Work-size result in [0, 1] -> exactly the planned output size (scale x input), in [0, 1]."""
    if plan.enlarged:
        sr = resize(sr, plan.out, "bicubic")
    return sr.clamp(0, 1)
