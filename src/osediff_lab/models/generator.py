"""The one-step generator G: encode the upsampled LQ, one denoiser call at a fixed timestep, x0, decode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch import nn

from osediff_lab.backbones.schedules import NoiseSchedule
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import TextEmbeds, denoiser_output, latent_shift, vae_factor
from osediff_lab.models.lora import merge_and_unload


class OneStepGenerator(nn.Module):
    """x_L in [-1, 1] (LQ bicubic-upsampled to HQ size) -> (x_H in [-1, 1], z_H scaled latent).

    ``latent`` chooses how the encoder's posterior becomes z_L: ``mode`` (deterministic, inference)
    or ``sample`` (a draw from the diagonal Gaussian). ``schedule`` turns the denoiser's output at ``timestep``
    into z_H (and serves the methods' score distillation). ``unet`` is the denoiser of any family
    (``models.backbone``: a UNet2DConditionModel, or SD3's transformer); ``predict`` calls it, or another
    network of the same base (the regularizer), with the family's conditioning.
    """

    inference_latent = "mode"  # z_L at inference under pipeline.latent=auto (PiSA-SR's release samples it)
    two_sets = False  # whether it weighs two LoRA sets at inference (PiSA-SR's lambda_pix / lambda_sem)

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: nn.Module,
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
        self.shift_factor = latent_shift(vae)
        self.vae_factor = vae_factor(vae)

    def scale_latent(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE posterior latent -> the denoiser's latent: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor if self.shift_factor else z * self.scaling_factor

    def encode(self, x_l: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_L = (E(x_L) - shift_factor) * scaling_factor; x_L in [-1, 1]."""
        dist = self.vae.encode(x_l).latent_dist
        return self.scale_latent(dist.mode() if self.latent == "mode" else dist.sample(generator=generator))

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds, net: nn.Module | None = None) -> torch.Tensor:
        """``net``'s output (default: this generator's denoiser) on the scaled latent ``z_t`` at integer timesteps
        ``t``, in the schedule's parameterisation (eps, v or flow velocity)."""
        net = self.unet if net is None else net
        return denoiser_output(net, z_t, self.schedule.model_timestep(t, z_t), embeds, self.vae_factor)

    def unet_at_timestep(self, z_l: torch.Tensor, prompt_embeds: TextEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's output on z_L (scaled latent) at t = timestep, and t, one per sample."""
        t = torch.full((z_l.shape[0],), self.timestep, device=z_l.device, dtype=torch.long)
        return self.predict(z_l, t, prompt_embeds), t

    def denoise(self, z_l: torch.Tensor, prompt_embeds: TextEmbeds) -> torch.Tensor:
        """One step at t = timestep from z_L (scaled latent) to z_H, the schedule's x0 of the UNet output
        (epsilon: z_H = (z_L - sqrt(1 - abar_t) eps) / sqrt(abar_t))."""
        out, t = self.unet_at_timestep(z_l, prompt_embeds)
        return self.schedule.x0_from_output(z_l, out, t)

    def inference_denoiser(self, lambda_pix: float, lambda_sem: float) -> Callable[[torch.Tensor, TextEmbeds], torch.Tensor]:
        """The z_L -> z_H map inference runs at ``pipeline.lambda_pix`` / ``lambda_sem``, PiSA-SR's weights of its
        two LoRA sets (``models.pisasr``); one LoRA set has no such weights, so only (1, 1) is accepted."""
        if not self.two_sets and (lambda_pix, lambda_sem) != (1.0, 1.0):
            raise ConfigError(f"pipeline.lambda_pix={lambda_pix} / pipeline.lambda_sem={lambda_sem} weigh PiSA-SR's two "
                              "LoRA sets; this checkpoint is not a PiSA-SR one (leave both at 1)")
        return self.denoise

    def merge_adapters(self, lambda_pix: float, lambda_sem: float) -> bool:
        """Fold every adapter into its weight for inference (``pipeline.merge_lora``); True when merged."""
        merge_and_unload(self)
        return True

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """x_H = D(z_H / scaling_factor + shift_factor), clamped to [-1, 1]."""
        z = z_h / self.scaling_factor
        return self.vae.decode(z + self.shift_factor if self.shift_factor else z).sample.clamp(-1, 1)

    def forward(
        self, x_l: torch.Tensor, prompt_embeds: TextEmbeds, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_h = self.denoise(self.encode(x_l, generator), prompt_embeds)
        return self.decode(z_h), z_h


def compile_generator(generator: OneStepGenerator, backend: str = "inductor", mode: str = "default") -> None:
    """``torch.compile`` the UNet, VAE encoder and VAE decoder in place (``nn.Module.compile``: parameter
    names, state dicts and LoRA layers unchanged); each compiles at its first call."""
    for module in (generator.unet, generator.vae.encoder, generator.vae.decoder):
        module.compile(backend=backend, mode=None if mode == "default" else mode)
