"""HYPIR (Lin et al. 2025, "Harnessing Diffusion-Yielded Score Priors for Image Restoration"; release github
XPixelGroup/HYPIR@b61d107): the base UNet with LoRA, run once at a fixed timestep on the LQ's VAE latent, trained with
L2 + LPIPS + a GAN loss against a discriminator; no score distillation.

The generator (trainer/sd2.py:83-92) is an ``OneStepGenerator`` without VAE LoRA: z_L a draw from the VAE posterior
(trainer/base.py:263), eps = UNet(z_L, t, c), z_H = the scheduler's x0 at t (``DDPMScheduler.step(...)
.pred_original_sample``: (z_L - sqrt(1 - abar_t) eps) / sqrt(abar_t)), x_H = D(z_H), not clamped in training
(sd2.py:91). Only the LoRA is trained (sd2.py:40, :54-58), so the UNet's input layer stays frozen
(``train_input_layer``). G and D alternate (trainer/base.py:277-316): a generator update on L2 + LPIPS + GAN, then
``method.optim.discriminator.updates`` discriminator updates on HQ against the output of the updated generator on the
same z_L (``fake_from: updated``, base.py:297-298), or on the generator step's own output (``step``, cheaper). The
release alternates whole batches (G on one batch, D on the next, base.py:327-331); here both see the same batch.
The values are in conf/method/hypir.yaml and conf/experiment/hypir_release.yaml, docs/gan.md sets them out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from osediff_lab.discriminators import DISCRIMINATOR, LATENT, Discriminator, sample_for
from osediff_lab.discriminators.adversarial import (
    AdversarialState,
    build_discriminator,
    discriminator_problems,
    discriminator_step_loss,
    weight_problems,
)
from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import GENERATOR, Method, ParamGroup, weighted_total
from osediff_lab.models.backbone import TextEmbeds, input_layer
from osediff_lab.models.components import Components
from osediff_lab.models.generator import OneStepGenerator, compile_generator
from osediff_lab.models.osediff import build_generator, trainable_parameters

FAKE_FROM = ("updated", "step")
WEIGHTS = ("l2_weight", "lpips_weight", "gan_weight")


def decode_unclamped(generator: OneStepGenerator, z_h: torch.Tensor) -> torch.Tensor:
    """x_H = D(z_H / scaling_factor + shift_factor), in about [-1, 1] but not clamped (HYPIR trainer/sd2.py:91)."""
    z = z_h / generator.scaling_factor
    return generator.vae.decode(z + generator.shift_factor if generator.shift_factor else z).sample


class HYPIR(Method):
    """HYPIR's LoRA generator at a fixed timestep, L2 + LPIPS + GAN against ``discriminator``."""

    groups = (GENERATOR, DISCRIMINATOR)
    export_stem = "hypir_lora"

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = super().argument_problems(args) + weight_problems(args, WEIGHTS)
        if args["fake_from"] not in FAKE_FROM:
            problems.append(f"method.fake_from='{args['fake_from']}' must be one of {list(FAKE_FROM)}")
        return problems + discriminator_problems(args, ())

    def __init__(
        self,
        components: Components,
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None,
        generator: DictConfig,
        discriminator: DictConfig,
        l2_weight: float,
        lpips_weight: float,
        gan_weight: float,
        fake_from: str,
        clamp_output: bool,
        train_input_layer: bool,
        optim: Mapping[str, Mapping[str, Any]],
    ) -> None:
        if lpips_weight > 0 and lpips is None:
            raise ConfigError("method.lpips_weight > 0 needs an LPIPS network")
        if fake_from not in FAKE_FROM:
            raise ConfigError(f"method.fake_from='{fake_from}' must be one of {list(FAKE_FROM)}")
        gen, targets = build_generator(components, generator, share_unet=True)  # one UNet: HYPIR has no regularizer
        if not train_input_layer:
            first = gen.unet.get_submodule(input_layer(gen.unet))
            (first.get_base_layer() if isinstance(first, BaseTunerLayer) else first).requires_grad_(False)
        super().__init__(gen, targets, encode_text, lpips, optim)
        self.discriminator: Discriminator = build_discriminator(discriminator, components, {})
        self.weights = {"l2": l2_weight, "lpips": lpips_weight, "gan": gan_weight}
        self.fake_from, self.clamp_output = fake_from, clamp_output
        self.apply_memory_options(generator.frozen_dtype, False)
        if generator.gradient_checkpointing:  # the UNet only (trainer/base.py:42-43); the VAE is frozen
            gen.unet.enable_gradient_checkpointing()
        if generator.get("compile", False):
            compile_generator(gen, generator.get("compile_backend", "inductor"), generator.get("compile_mode", "default"))

    def param_groups(self) -> dict[str, ParamGroup]:
        return {GENERATOR: self.group(GENERATOR, [p for _, p in trainable_parameters(self.generator)]),
                DISCRIMINATOR: self.group(DISCRIMINATOR, self.discriminator.trained_parameters())}

    def frozen_eval(self) -> None:
        super().frozen_eval()
        self.discriminator.frozen_eval()

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """x_H (in [-1, 1]) from z_H, clamped or not per ``clamp_output``."""
        return self.generator.decode(z_h) if self.clamp_output else decode_unclamped(self.generator, z_h)

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], Any]:
        """Weighted L2, LPIPS and GAN terms (and ``total``) of x_H against HQ (``batch``: ``hq``, ``lq_up`` in
        [-1, 1]); the state: z_L and what the discriminator's updates need."""
        z_l = self.generator.encode(batch["lq_up"])
        z_h = self.generator.denoise(z_l, embeds)
        self.outputs = {"z_h": z_h}
        x_h = self.decode(z_h)
        hq = batch["hq"]
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(x_h.float(), hq.float())}
        if self.weights["lpips"] > 0:
            terms["lpips"] = self.lpips_loss(x_h, hq)
        fake = sample_for(self.discriminator, x_h, z_h)
        if self.weights["gan"] > 0:
            terms["gan"] = self.discriminator.generator_loss(fake, embeds)
        self.metrics = {}
        state = AdversarialState(hq, embeds, fake.detach() if self.fake_from == "step" else None)
        return weighted_total(terms, self.weights), (z_l.detach(), state)

    def group_loss(self, name: str, state: Any, embeds: TextEmbeds) -> torch.Tensor:
        """The discriminator's loss on HQ against the generator's output: with ``fake_from: updated``, that of the
        updated generator on the same z_L, made at the step's first discriminator update."""
        z_l, adversarial = state
        if adversarial.fake is None:
            with torch.no_grad():
                z_h = self.generator.denoise(z_l, adversarial.embeds)
                adversarial.fake = z_h if self.discriminator.domain == LATENT else self.decode(z_h)
        loss, metrics = discriminator_step_loss(self.discriminator, self.generator, adversarial)
        self.metrics |= metrics
        return loss
