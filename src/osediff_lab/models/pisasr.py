"""PiSA-SR's generator (Sun et al., CVPR 2025, arXiv 2412.03017): one UNet call predicts the residual between
the LQ and HQ latents, through two LoRA sets on the SD UNet, a pixel-level and a semantic-level one, whose
outputs inference scales by lambda_pix and lambda_sem (1 and 1: as trained)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from osediff_lab.models.components import Components
from osediff_lab.models.generator import OSEDiffGenerator
from osediff_lab.models.lora import add_lora, lora_layers, select_targets
from osediff_lab.models.schedules import schedule_from_scheduler

PIXEL, SEMANTIC = "pixel", "semantic"


class PiSAGenerator(OSEDiffGenerator):
    """x_L in [-1, 1] -> (x_H in [-1, 1], z_H) with z_H = z_L - UNet(z_L, t, c): the UNet output is the residual.

    The VAE is frozen and has no adapters; the UNet carries the ``pixel`` and ``semantic`` adapters, both active.
    """

    def denoise(self, z_l: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """z_H = z_L - UNet(z_L, timestep, c) on scaled latents; the schedule serves only the CSD targets."""
        residual, _ = self.unet_at_timestep(z_l, prompt_embeds)
        return z_l - residual

    def set_lora_scales(self, pixel: float, semantic: float) -> None:
        """lambda_pix and lambda_sem: each adapter's output times its weight (PEFT's scale x alpha / rank).
        Call before merging the adapters into the weights."""
        for layer in lora_layers(self.unet):
            for adapter, weight in ((PIXEL, pixel), (SEMANTIC, semantic)):
                if adapter in layer.lora_A:
                    layer.set_scale(adapter, float(weight))


def build_pisa_generator(components: Components, lora: DictConfig, timestep: int) -> tuple[PiSAGenerator, dict[str, list[str]]]:
    """The generator over components' UNet with both adapters on ``lora.unet_targets`` (rank ``lora.rank``,
    alpha ``lora.alpha``), all frozen (the method chooses what trains). The pretrained UNet is that UNet with
    its adapters disabled (the score distillation's), so training holds one UNet."""
    unet = components.unet
    generator = PiSAGenerator(components.vae, unet, schedule_from_scheduler(components.scheduler), timestep, "mode")
    names = select_targets(unet, lora.unet_targets)
    for adapter in (PIXEL, SEMANTIC):
        add_lora(unet, names, lora.rank, lora.alpha, adapter, lora.init)
    generator.requires_grad_(False)
    return generator, {f"unet.{PIXEL}": names, f"unet.{SEMANTIC}": names}
