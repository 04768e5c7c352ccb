"""PiSA-SR (Sun et al., CVPR 2025, arXiv 2412.03017): SR as the residual between LQ and HQ latents, learnt by two
LoRA sets on the SD UNet in two stages. Stage ``pixel`` trains the pixel-level LoRA with the L2 loss; stage
``semantic`` freezes it (loaded from the pixel stage's export) and trains the semantic-level LoRA with LPIPS and
classifier score distillation (CSD: the pretrained UNet's classifier-free guidance direction, no fake score)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import Method, weighted_total
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.components import Components
from osediff_lab.models.lora_files import load_lora_tensors
from osediff_lab.models.pisasr import PIXEL, SEMANTIC, build_pisa_generator
from osediff_lab.models.vsd import sample_timesteps, vsd_loss

STAGES = (PIXEL, SEMANTIC)


def stage_problems(stage: str, pixel_lora_from: str | None) -> list[str]:
    """The stage must be known, and the semantic stage needs the pixel stage's export, which must exist."""
    if stage not in STAGES:
        return [f"method.stage='{stage}' must be one of {list(STAGES)}"]
    if stage == SEMANTIC and not pixel_lora_from:
        return ["method.stage=semantic trains on a frozen pixel-level LoRA: set method.pixel_lora_from="
                "<the pixel stage's lora/osediff_lora.safetensors>"]
    if pixel_lora_from and not Path(str(pixel_lora_from)).expanduser().is_file():
        return [f"method.pixel_lora_from={pixel_lora_from} does not exist (the pixel stage's lora/osediff_lora.safetensors)"]
    return []


class PiSASR(Method):
    """PiSA-SR's generator and one training stage's losses; no regularizer (CSD needs no fake score)."""

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = stage_problems(args.stage, args.get("pixel_lora_from"))
        for key in ("l2_weight", "lpips_weight", "csd_weight"):
            if args[key] < 0:
                problems.append(f"method.{key}={args[key]} is negative; loss weights must be >= 0")
        if args.l2_weight + args.lpips_weight + args.csd_weight <= 0:
            problems.append("method.l2_weight, method.lpips_weight and method.csd_weight are all 0: nothing to train")
        if not 0 <= args.csd_t_min < args.csd_t_max <= 1000:
            problems.append(f"method.csd_t_min={args.csd_t_min} / method.csd_t_max={args.csd_t_max}: need 0 <= min < max <= 1000")
        if args.lora.rank < 1:
            problems.append(f"method.lora.rank={args.lora.rank} must be >= 1")
        if not 0 <= args.timestep < 1000:
            problems.append(f"method.timestep={args.timestep} must be in [0, 1000)")
        return problems

    def __init__(
        self,
        components: Components,
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None,
        stage: str,
        lora: DictConfig,
        timestep: int,
        l2_weight: float,
        lpips_weight: float,
        csd_weight: float,
        cfg_scale: float,
        csd_t_min: int,
        csd_t_max: int,
        negative_prompt: str,
        pixel_lora_from: str | None = None,
        frozen_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        problems = stage_problems(stage, pixel_lora_from)
        if problems:
            raise ConfigError("; ".join(problems))
        if lpips_weight > 0 and lpips is None:
            raise ConfigError("method.lpips_weight > 0 needs an LPIPS network")
        generator, targets = build_pisa_generator(components, lora, timestep)
        super().__init__(generator, targets, encode_text, lpips)
        if pixel_lora_from:
            self.load_pixel_lora(pixel_lora_from)
        for name, p in generator.unet.named_parameters():
            p.requires_grad_(f".lora_A.{stage}." in name or f".lora_B.{stage}." in name)
        self.apply_memory_options(frozen_dtype, gradient_checkpointing)
        self.stage = stage
        self.weights = {"l2": l2_weight, "lpips": lpips_weight, "csd": csd_weight}
        self.cfg_scale, self.csd_t = cfg_scale, (csd_t_min, csd_t_max)
        self.negative_prompt = negative_prompt

    def load_pixel_lora(self, path: str) -> None:
        """The pixel-level LoRA tensors of the pixel stage's export (its semantic tensors are not used)."""
        n = load_lora_tensors(self.generator, path, "method.pixel_lora_from", only=f".{PIXEL}.")
        want = sum(1 for k, _ in self.generator.named_parameters() if f".{PIXEL}." in k)
        if n != want:
            raise ConfigError(f"method.pixel_lora_from={path} holds {n} of this generator's {want} pixel-level LoRA "
                              "tensors; train the pixel stage with the same method.lora and model")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Both LoRA sets (the frozen pixel-level one too): inference weighs them with lambda_pix / lambda_sem."""
        return {n: p for n, p in self.generator.named_parameters() if ".lora_A." in n or ".lora_B." in n}

    def csd_targets(self, z_h: torch.Tensor, embeds: TextEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 predictions of the pretrained UNet (the generator's adapters off) with CFG at ``cfg_scale`` and
        unconditional: their difference is the classifier score direction CSD follows."""
        schedule = self.generator.schedule
        b = z_h.shape[0]
        t = sample_timesteps(b, *self.csd_t, z_h.device)
        z_t = schedule.add_noise(z_h.detach(), torch.randn_like(z_h), t)
        pred_cfg, pred_uncond = self.guided_prediction(self.generator.unet, z_t, t, embeds, self.negative_prompt, self.cfg_scale)
        return schedule.x0_from_output(z_t, pred_cfg, t), schedule.x0_from_output(z_t, pred_uncond, t)

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], None]:
        """Weighted L2, LPIPS and CSD terms (each only when weighted) and ``total``."""
        x_h, z_h = self.generator(batch["lq_up"], embeds)
        hq = batch["hq"]
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(x_h.float(), hq.float())}
        if self.weights["lpips"] > 0:
            terms["lpips"] = self.lpips_loss(x_h, hq)
        if self.weights["csd"] > 0:
            x0_cfg, x0_uncond = self.csd_targets(z_h, embeds)
            terms["csd"], w = vsd_loss(z_h, x0_cfg, x0_uncond)
            self.metrics = {"csd_weight_factor": w.mean().detach()}
        return weighted_total(terms, self.weights), None
