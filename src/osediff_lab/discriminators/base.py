"""What a method needs from a discriminator: logits of real and generated samples in its domain (images in [-1, 1]
or the denoiser's scaled latents), its own loss and the generator's, and the tensors its parameter group trains.

A discriminator is a component of the ``discriminator`` config group (``_target_``), built by a method with
``osediff_lab.build.build``, which offers it the base model's ``components`` and the method's ``denoisers`` (OSEDiff's
regularizer UNet, for a discriminator that reads its features). Its loss (``loss``, ``real_target``, ``r1_gamma``) is
its config's; its optimiser settings and updates per generator step are the method's ``method.optim.discriminator``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from osediff_lab.discriminators.losses import (
    accuracy,
    discriminator_loss,
    generator_loss,
    loss_problems,
    mean_logit,
    r1_penalty,
)
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.models.lora import adapters_disabled

DISCRIMINATOR = "discriminator"  # its parameter group in a method
IMAGE, LATENT = "image", "latent"


def dtype_problems(dtype: str, key: str) -> list[str]:
    """A frozen network's storage precision must be one of ``DTYPES``."""
    return [] if dtype in DTYPES else [f"{key}='{dtype}' must be one of {sorted(DTYPES)}"]


def frozen_autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to a frozen network's low-precision storage dtype, so it also runs under a fp32 trainer; for fp32
    storage nothing changes (the step's own autocast, if any, stays on)."""
    return torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


class Discriminator(nn.Module):
    """Logits per level of samples in ``domain``, and the GAN losses on them. Subclasses give ``features`` (the
    frozen or shared backbone, its own noise draws) and ``classify`` (the trained heads)."""

    domain = IMAGE

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        """Problems of the loss settings, each naming its ``discriminator.*`` key."""
        return loss_problems(args["loss"], float(args["real_target"]), float(args["r1_gamma"]))

    def __init__(self, loss: str, real_target: float, r1_gamma: float) -> None:
        super().__init__()
        problems = loss_problems(loss, real_target, r1_gamma)
        if problems:
            raise ConfigError("; ".join(problems))
        self.loss, self.real_target, self.r1_gamma = loss, float(real_target), float(r1_gamma)

    def features(self, x: torch.Tensor, embeds: TextEmbeds) -> list[torch.Tensor]:
        """The backbone's features of ``x`` (in ``domain``) that the heads read."""
        raise NotImplementedError

    def classify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits per level from ``features``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, embeds: TextEmbeds) -> list[torch.Tensor]:
        return self.classify(self.features(x, embeds))

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the discriminator group trains: its heads (a frozen backbone and a shared UNet are not in it)."""
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_eval(self) -> None:
        """Keep the frozen backbone in eval mode whatever ``train()`` set."""

    def generator_loss(self, fake: torch.Tensor, embeds: TextEmbeds) -> torch.Tensor:
        """The generator's GAN loss on its outputs ``fake`` (gradients flow through the backbone into ``fake``)."""
        return generator_loss(self.loss, self(fake, embeds), self.real_target)

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, embeds: TextEmbeds
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on ``real`` and (detached) ``fake`` samples, plus ``r1_gamma`` / 2 x R1 on the
        real ones, and diagnostics (mean logits, R1). Backbone features are taken without a graph unless R1 needs
        the gradient with respect to the real input."""
        with_r1 = self.r1_gamma > 0
        real = real.detach().requires_grad_(with_r1)
        with torch.set_grad_enabled(with_r1):
            real_features = self.features(real, embeds)
        with torch.no_grad():
            fake_features = self.features(fake.detach(), embeds)
        real_logits, fake_logits = self.classify(real_features), self.classify(fake_features)
        loss = discriminator_loss(self.loss, real_logits, fake_logits, self.real_target)
        metrics = {"d_logit_real": mean_logit(real_logits), "d_logit_fake": mean_logit(fake_logits),
                   "d_accuracy": accuracy(real_logits, fake_logits)}
        for side, logits in (("real", real_logits), ("fake", fake_logits)):  # every value: histograms at log steps
            flat = torch.cat([x.detach().float().flatten() for x in logits])
            metrics |= {f"d_logits_{side}": flat, f"d_probs_{side}": torch.sigmoid(flat)}
        if with_r1:
            r1 = r1_penalty(real_logits, real)
            loss = loss + self.r1_gamma / 2 * r1
            metrics["d_r1"] = r1.detach()
        return loss, metrics


def sample_for(discriminator: Discriminator, x_h: torch.Tensor, z_h: torch.Tensor) -> torch.Tensor:
    """A generator output in the discriminator's domain: x_H (in [-1, 1]) or z_H (scaled latent)."""
    return x_h if discriminator.domain == IMAGE else z_h


@torch.no_grad()
def real_sample(discriminator: Discriminator, generator: OneStepGenerator, hq: torch.Tensor) -> torch.Tensor:
    """An HQ batch (in [-1, 1]) in the discriminator's domain: itself, or the scaled latent of the pretrained VAE
    encoder (the generator's encoder LoRA disabled, the posterior's mode)."""
    if discriminator.domain == IMAGE:
        return hq
    vae = generator.vae
    with adapters_disabled(vae):
        return generator.scale_latent(vae.encode(hq.to(vae.dtype)).latent_dist.mode()).float()
