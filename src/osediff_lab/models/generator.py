"""The one-step generator G: encode the upsampled LQ, one UNet call at a fixed timestep, x0, decode."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from osediff_lab.models.schedules import NoiseSchedule


class OSEDiffGenerator(nn.Module):
    """x_L in [-1, 1] (LQ bicubic-upsampled to HQ size) -> (x_H in [-1, 1], z_H scaled latent).

    ``latent`` chooses how the encoder's posterior becomes z_L: ``mode`` (deterministic, inference)
    or ``sample`` (a draw from the diagonal Gaussian). ``schedule`` turns the UNet's output at ``timestep``
    into z_H (and serves the methods' score distillation).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        schedule: NoiseSchedule,
        timestep: int,
        latent: str = "mode",
    ) -> None:
        super().__init__()
        if latent not in ("mode", "sample"):
            raise ValueError(f"generator.latent must be 'mode' or 'sample', got '{latent}'")
        if not 0 <= timestep < schedule.num_train_timesteps:
            raise ValueError(f"generator.timestep {timestep} outside [0, {schedule.num_train_timesteps})")
        self.vae = vae
        self.unet = unet
        self.schedule = schedule
        self.timestep = timestep
        self.latent = latent
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, x_l: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_L = E(x_L) * scaling_factor; x_L in [-1, 1]."""
        dist = self.vae.encode(x_l).latent_dist
        z = dist.mode() if self.latent == "mode" else dist.sample(generator=generator)
        return z * self.scaling_factor

    def unet_at_timestep(self, z_l: torch.Tensor, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output on z_L (scaled latent) at t = timestep, and t, one per sample."""
        t = torch.full((z_l.shape[0],), self.timestep, device=z_l.device, dtype=torch.long)
        out = self.unet(z_l, self.schedule.model_timestep(t), encoder_hidden_states=prompt_embeds.to(z_l.dtype)).sample
        return out, t

    def denoise(self, z_l: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One step at t = timestep from z_L (scaled latent) to z_H, the schedule's x0 of the UNet output
        (epsilon: z_H = (z_L - sqrt(1 - abar_t) eps) / sqrt(abar_t))."""
        out, t = self.unet_at_timestep(z_l, prompt_embeds)
        return self.schedule.x0_from_output(z_l, out, t)

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """x_H = D(z_H / scaling_factor), clamped to [-1, 1]."""
        return self.vae.decode(z_h / self.scaling_factor).sample.clamp(-1, 1)

    def forward(
        self, x_l: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_h = self.denoise(self.encode(x_l, generator), prompt_embeds)
        return self.decode(z_h), z_h


def compile_generator(generator: OSEDiffGenerator, backend: str = "inductor", mode: str = "default") -> None:
    """``torch.compile`` the UNet, VAE encoder and VAE decoder in place (``nn.Module.compile``: parameter
    names, state dicts and LoRA layers unchanged); each compiles at its first call."""
    for module in (generator.unet, generator.vae.encoder, generator.vae.decoder):
        module.compile(backend=backend, mode=None if mode == "default" else mode)
