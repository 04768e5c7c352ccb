"""OSEDiff + GAN (ours): OSEDiff's generator, L2 + LPIPS + VSD and its regularizer, plus a GAN term against a
discriminator, by default DMD2's (github tianweiy/DMD2@8d8fa55): heads on the bottleneck features of the fake score
network (here OSEDiff's regularizer UNet with its LoRA) at a noised timestep, non-saturating losses
(main/sd_guidance.py:143-165, :323, :391), trained on the generator step's own latents (main/train_sd.py:385-393).

DMD2 trains its classifier head and fake score network with one optimiser on one sum of losses; here the heads are
their own parameter group (``method.optim.discriminator``) and the regularizer learns by its diffusion loss alone.
The weights are ours (conf/method/osediff_gan.yaml, docs/gan.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from osediff_lab.build import HYDRA_KEYS, LABELS, signature_problems
from osediff_lab.discriminators import DISCRIMINATOR, Discriminator, sample_for
from osediff_lab.discriminators.adversarial import (
    AdversarialState,
    build_discriminator,
    discriminator_problems,
    discriminator_step_loss,
    weight_problems,
)
from osediff_lab.methods.base import ParamGroup, weighted_total
from osediff_lab.methods.osediff import REGULARIZER, OSEDiff
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.components import Components

OWN = ("discriminator", "gan_weight")  # this method's arguments; the others are OSEDiff's


class OSEDiffGAN(OSEDiff):
    """OSEDiff with a GAN term weighted ``gan_weight`` against ``discriminator`` (offered the regularizer UNet)."""

    groups = (*OSEDiff.groups, DISCRIMINATOR)
    export_stem = "osediff_gan_lora"

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        osediff_args = {k: None for k in args if k not in (*OWN, *HYDRA_KEYS, *LABELS)}
        problems = super().argument_problems(args)
        problems += signature_problems(OSEDiff, osediff_args, "method", given=("components", "encode_text", "lpips"))
        problems += weight_problems(args, ("gan_weight",))
        return problems + discriminator_problems(args, (REGULARIZER,))

    def __init__(
        self,
        components: Components,
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None,
        discriminator: DictConfig,
        gan_weight: float,
        **osediff: Any,
    ) -> None:
        super().__init__(components, encode_text, lpips, **osediff)
        self.discriminator: Discriminator = build_discriminator(discriminator, components, {REGULARIZER: self.reg_unet})
        self.weights["gan"] = gan_weight

    def param_groups(self) -> dict[str, ParamGroup]:
        return super().param_groups() | {DISCRIMINATOR: self.group(DISCRIMINATOR, self.discriminator.trained_parameters())}

    def frozen_eval(self) -> None:
        super().frozen_eval()
        self.discriminator.frozen_eval()

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], Any]:
        """OSEDiff's weighted terms plus the GAN term (``batch``: ``hq``, ``lq_up`` in [-1, 1]); the state: z_H for
        the regularizer, and the step's samples for the discriminator."""
        self.metrics = {}
        x_h, z_h = self.generator(batch["lq_up"], embeds)
        self.outputs = {"z_h": z_h}
        terms = self.loss_terms(x_h, z_h, batch["hq"], embeds)
        fake = sample_for(self.discriminator, x_h, z_h)
        if self.weights["gan"] > 0:
            terms["gan"] = self.discriminator.generator_loss(fake, embeds)
        return weighted_total(terms, self.weights), (z_h, AdversarialState(batch["hq"], embeds, fake.detach()))

    def group_loss(self, name: str, state: Any, embeds: TextEmbeds) -> torch.Tensor:
        """The regularizer's diffusion loss on z_H, or the discriminator's loss on HQ against the step's output."""
        z_h, adversarial = state
        if name == REGULARIZER:
            return super().group_loss(name, z_h, embeds)
        loss, metrics = discriminator_step_loss(self.discriminator, self.generator, adversarial)
        self.metrics |= metrics
        return loss
