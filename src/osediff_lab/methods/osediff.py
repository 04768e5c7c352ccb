"""OSEDiff (Wu et al., NeurIPS 2024): a LoRA generator trained with L2 + LPIPS + variational score distillation
against a LoRA fake score (the regularizer), which itself learns the generator's latents by diffusion loss.

The math is in ``osediff_lab.models.vsd`` on top of the generator's noise schedule (``osediff_lab.backbones.schedules``);
the networks are assembled by ``osediff_lab.models.osediff``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from osediff_lab.backbones.schedules import NoiseSchedule
from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import GENERATOR, Method, ParamGroup, weighted_total
from osediff_lab.models.backbone import TextEmbeds, as_embeds
from osediff_lab.models.components import Components
from osediff_lab.models.lora import adapters_disabled, enable_checkpointing, frozen_base_copy
from osediff_lab.models.lora_files import load_lora_tensors
from osediff_lab.models.osediff import build_osediff, trainable_parameters
from osediff_lab.models.vsd import classifier_free_guidance, diffusion_loss, sample_timesteps, vsd_loss

log = logging.getLogger(__name__)
REGULARIZER = "regularizer"  # the fake score's LoRA, stepped after the generator
LOSS_WEIGHTS = ("l2_weight", "lpips_weight", "vsd_weight")
VSD_SPACES = ("latent", "image")  # VSD on z_H (the paper) or on E(x_H), the re-encoded output image
# the real score's weight dtype under method.release_score_precision, by trainer.precision (the release: the run's weight_dtype)
RUN_WEIGHT_DTYPES = {"16-mixed": torch.float16, "16": torch.float16, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}


class OSEDiff(Method):
    """OSEDiff's generator, regularizer UNet (real score: adapters off; fake score: its 'reg' LoRA) and losses."""

    groups = (GENERATOR, REGULARIZER)

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        """The optimiser settings (``Method``), the loss weights, ``vsd_space`` and the timestep ranges."""
        problems = super().argument_problems(args)
        if "l2_weight" not in args:  # a subclass with other losses (its own checks)
            return problems
        problems += [f"method.{k}={args[k]} is negative; loss weights must be >= 0" for k in LOSS_WEIGHTS
                     if float(args[k]) < 0]
        if float(args.l2_weight) + float(args.lpips_weight) + (float(args.vsd_weight) if args.get("vsd", True) else 0) <= 0:
            problems.append("method.l2_weight, method.lpips_weight and method.vsd_weight (or method.vsd=false) are all 0: "
                            "nothing to train")
        if args.get("vsd_space", "latent") not in VSD_SPACES:
            problems.append(f"method.vsd_space='{args.vsd_space}' must be one of {list(VSD_SPACES)}")
        for lo, hi in (("vsd_t_min", "vsd_t_max"), ("reg_t_min", "reg_t_max")):
            if not 0 <= args[lo] < args[hi] <= 1000:
                problems.append(f"method.{lo}={args[lo]} / method.{hi}={args[hi]}: need 0 <= min < max <= 1000")
        return problems

    def __init__(
        self,
        components: Components,
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None,
        generator: DictConfig,
        l2_weight: float,
        lpips_weight: float,
        vsd_weight: float,
        vsd_space: str,
        cfg_scale: float,
        vsd_t_min: int,
        vsd_t_max: int,
        reg_t_min: int,
        reg_t_max: int,
        negative_prompt: str,
        optim: Mapping[str, Mapping[str, Any]],
        release_score_precision: bool = False,
        run_precision: str = "32-true",
        conv_in_lora_twice: bool = False,
        vsd: bool = True,
    ) -> None:
        if vsd_space not in VSD_SPACES:
            raise ConfigError(f"method.vsd_space='{vsd_space}' must be one of {list(VSD_SPACES)}")
        if lpips_weight > 0 and lpips is None:
            raise ConfigError("method.lpips_weight > 0 needs an LPIPS network")
        if release_score_precision and components.backbone.guidance_distilled(components.denoiser):
            raise ConfigError("method.release_score_precision=true runs the SD2.1 release's two-pass CFG real score on a "
                              "copy of its own; this base is guidance-distilled (one call at guidance = cfg_scale): set it false")
        parts = build_osediff(components, generator)
        super().__init__(parts.generator, {k: v for k, v in parts.targets.items() if not k.startswith("reg_unet")},
                         encode_text, lpips, optim)
        self.reg_unet = parts.reg_unet
        self.reg_sample: tuple | None = None  # the regularizer's last noised sample and loss (health_metrics)
        self.weights = {"l2": l2_weight, "lpips": lpips_weight, "vsd": vsd_weight if vsd else 0.0}
        self.vsd_space, self.cfg_scale = vsd_space, cfg_scale
        self.vsd_t, self.reg_t = (vsd_t_min, vsd_t_max), (reg_t_min, reg_t_max)
        self.negative_prompt = negative_prompt
        self.release_score_precision = release_score_precision
        self.conv_in_lora_twice = conv_in_lora_twice
        self.apply_memory_options(generator.frozen_dtype, generator.gradient_checkpointing, self.reg_unet)
        if generator.gradient_checkpointing:  # the fake score's backward in the regularizer's step (FLUX: 65 -> 40 GiB)
            enable_checkpointing(self.reg_unet)
        # The release: a separate frozen copy of the pretrained UNet for the real score, stored and run in the
        # run's weight dtype (train_osediff.py's weight_dtype: fp16 under fp16 mixed precision, else fp32).
        self.real_dtype = RUN_WEIGHT_DTYPES.get(str(run_precision), torch.float32)
        self.real_unet = frozen_base_copy(self.reg_unet, self.real_dtype) if release_score_precision else None
        if generator.lora.get("reg_init_from"):
            n = load_lora_tensors(self.reg_unet, generator.lora.reg_init_from, "generator.lora.reg_init_from")
            log.info("regularizer LoRA warm-started from %s (%d tensors)", generator.lora.reg_init_from, n)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule, the generator's (one copy)."""
        return self.generator.schedule

    def param_groups(self) -> dict[str, ParamGroup]:
        gen = [p for _, p in trainable_parameters(self.generator)]
        if self.conv_in_lora_twice:  # the release lists conv_in's LoRA tensors twice
            gen += [p for n, p in trainable_parameters(self.generator) if n.startswith("unet.conv_in.lora_")]
        return {GENERATOR: self.group(GENERATOR, gen),
                REGULARIZER: self.group(REGULARIZER, [p for _, p in trainable_parameters(self.reg_unet)])}

    def unet_pred(self, z_t: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds, unet: nn.Module | None = None) -> torch.Tensor:
        """The output of ``unet`` (default: the regularizer UNet with its active adapters) on the scaled latent
        ``z_t`` at integer timesteps ``t``, in the schedule's parameterisation (eps, v or flow velocity)."""
        return self.generator.predict(z_t, t, embeds, self.reg_unet if unet is None else unet)

    def fake_pred(self, z_t: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds) -> torch.Tensor:
        """The fake score's output (regularizer UNet with its LoRA). With ``method.release_score_precision`` it
        runs outside autocast in fp32, as the release calls the fake score and the regularizer loss."""
        if not self.release_score_precision:
            return self.unet_pred(z_t, t, embeds)
        with torch.autocast(z_t.device.type, enabled=False):
            return self.unet_pred(z_t.float(), t, embeds)

    @torch.no_grad()
    def vsd_targets(
        self, z_h: torch.Tensor, embeds: TextEmbeds, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 predictions of the real score (frozen UNet, CFG with the negative prompt; ``real_prediction``) and the fake score
        (the regularizer UNet with its LoRA) at timesteps ``t`` with ``noise`` (drawn when not given)."""
        b = z_h.shape[0]
        t = sample_timesteps(b, *self.vsd_t, z_h.device) if t is None else t.to(z_h.device)
        noise = torch.randn_like(z_h) if noise is None else noise
        z_t = self.schedule.add_noise(z_h.detach(), noise, t)
        pred_fake = self.fake_pred(z_t, t, embeds).to(z_t.dtype)
        if self.real_unet is None:
            pred_real = self.real_prediction(self.reg_unet, z_t, t, embeds, self.negative_prompt, self.cfg_scale)
        else:  # the release: a separate frozen UNet, run outside autocast in the run's weight dtype
            neg = self.fixed_prompt_embedding(self.negative_prompt).expand(b)
            z_both, t_both, c_both = torch.cat([z_t, z_t]), torch.cat([t, t]), TextEmbeds.cat([neg, as_embeds(embeds)])
            with torch.autocast(z_t.device.type, enabled=False):
                pred_both = self.unet_pred(z_both.to(self.real_dtype), t_both, c_both, unet=self.real_unet).to(z_t.dtype)
            pred_uncond, pred_cond = pred_both.chunk(2)
            pred_real = classifier_free_guidance(pred_uncond, pred_cond, self.cfg_scale)
        return self.schedule.x0_from_output(z_t, pred_real, t), self.schedule.x0_from_output(z_t, pred_fake, t)

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Weighted L2, LPIPS and VSD terms (and ``total``); the state for the regularizer is z_H."""
        x_h, z_h = self.generator(batch["lq_up"], embeds)
        self.outputs = {"z_h": z_h}
        return weighted_total(self.loss_terms(x_h, z_h, batch["hq"], embeds), self.weights), z_h

    def loss_terms(self, x_h: torch.Tensor, z_h: torch.Tensor, hq: torch.Tensor, embeds: TextEmbeds) -> dict[str, torch.Tensor]:
        """The unweighted L2, LPIPS and VSD terms (each only when weighted) of x_H against HQ (both in [-1, 1])
        and of z_H (a subclass adds its own terms to them)."""
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(x_h.float(), hq.float())}
        if self.weights["lpips"] > 0:
            terms["lpips"] = self.lpips_loss(x_h, hq)
        if self.weights["vsd"] > 0:
            z_vsd = z_h if self.vsd_space == "latent" else self.reencode(x_h)
            x0_real, x0_fake = self.vsd_targets(z_vsd, embeds)
            terms["vsd"], w = vsd_loss(z_vsd, x0_real, x0_fake)
            self.metrics = {"vsd_weight_factor": w.mean().detach()}
        return terms

    def reencode(self, x_h: torch.Tensor) -> torch.Tensor:
        """Image-space VSD: the pretrained VAE encoder's latent of x_H in [-1, 1] (the generator's
        encoder LoRA disabled), with gradients flowing back through the decoder to the generator."""
        vae = self.generator.vae
        with adapters_disabled(vae):
            return self.generator.scale_latent(vae.encode(x_h.to(vae.dtype)).latent_dist.mode())

    def regularizer_loss(
        self, z_h: torch.Tensor, embeds: TextEmbeds, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Diffusion loss of the fake-score UNet on detached generator latents at timesteps ``t`` with
        ``noise`` (drawn when not given), against the schedule's target (eps: the noise)."""
        z0 = z_h.detach()
        t = sample_timesteps(z0.shape[0], *self.reg_t, z0.device) if t is None else t.to(z0.device)
        noise = torch.randn_like(z0) if noise is None else noise
        z_t, cond, target = self.schedule.add_noise(z0, noise, t), as_embeds(embeds).detach(), self.schedule.target(z0, noise, t)
        loss = diffusion_loss(self.fake_pred(z_t, t, cond), target)
        self.reg_sample = (z_t, t, cond, target, loss.detach())
        return loss

    @torch.no_grad()
    def health_metrics(self) -> dict[str, torch.Tensor]:
        """At log steps: the regularizer's fit, its diffusion loss on its last update's noised sample over a fresh LoRA's
        (its adapter disabled) on the same sample (``fit_regularizer``: below 1 it has learnt the generator's latents)."""
        if self.reg_sample is None:
            return {}
        z_t, t, cond, target, loss = self.reg_sample
        with adapters_disabled(self.reg_unet):
            fresh = diffusion_loss(self.fake_pred(z_t, t, cond), target)
        return {"loss_regularizer_fresh": fresh, "fit_regularizer": loss / fresh}

    def group_loss(self, name: str, state: torch.Tensor, embeds: TextEmbeds) -> torch.Tensor:
        """The regularizer's diffusion loss on the generator's latents z_H (``state``)."""
        return self.regularizer_loss(state, embeds)

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained fake-score LoRA, keyed relative to its UNet (study, ``generator.lora.reg_init_from``)."""
        return {"regularizer_lora": {n: p for n, p in trainable_parameters(self.reg_unet)}}
