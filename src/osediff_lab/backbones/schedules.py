"""Noise schedules as objects: forward noising, model output -> x0, and the model's training target.

OSEDiff's generator step and the VSD / CSD targets need only these, so they are written once on top of a
``NoiseSchedule`` and work for epsilon prediction (SD2.1-base), v-prediction (SD2.1-768, SD-Turbo) and
rectified flow (SD3, FLUX). Timesteps ``t`` are integer tensors, one per sample, in [0, num_train_timesteps);
larger t is noisier. Every ``x0`` / ``x_t`` here is a latent scaled by the VAE scaling factor; the math runs
in fp32 and returns the input's dtype.

A schedule is an ``nn.Module`` holding its table as a non-persistent buffer, so it follows the generator
across devices (and dtypes, as the bare ``alphas_cumprod`` buffer it replaces did) and adds nothing to
state dicts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)
from torch import nn

from osediff_lab.errors import ConfigError

ALPHA_BAR_SCHEDULERS = (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler)


def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] in fp32 on ``like``'s device, shaped (batch, 1, ..., 1) to broadcast against ``like``."""
    value = table.to(device=like.device)[t.to(like.device).long()].to(torch.float32)
    return value.reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule(nn.Module, ABC):
    """The forward process x_t = a_t x0 + s_t noise and the model parameterisation on top of it."""

    num_train_timesteps: int

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, the clean latent ``x0`` noised with ``noise`` (standard normal) to timesteps ``t``."""

    @abstractmethod
    def x0_from_output(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate implied by the model's ``output`` at ``x_t``, ``t``; with a one-step
        generator this is the step itself."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at add_noise(x0, noise, t) (the diffusion loss's target)."""

    def model_timestep(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep value the network is conditioned on for integer timesteps ``t`` on the latent ``like``:
        ``t`` itself."""
        return t


class AlphaBarSchedule(NoiseSchedule):
    """DDPM's variance-preserving process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, from the
    scheduler's ``alphas_cumprod`` (abar, one value per training timestep)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.num_train_timesteps = len(alphas_cumprod)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t in fp32, broadcast against ``like``."""
        return _per_sample(self.alphas_cumprod, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, x0)
        return (abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise.float()).to(x0.dtype)


class EpsilonSchedule(AlphaBarSchedule):
    """Epsilon prediction (SD2.1-base): the model outputs the noise; x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""

    def x0_from_output(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, x_t)
        x0 = (x_t.float() - (1.0 - abar).sqrt() * output.float()) / abar.sqrt()
        return x0.to(x_t.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise


class VPredictionSchedule(AlphaBarSchedule):
    """v-prediction (SD2.1-768, SD-Turbo; Salimans & Ho 2022): v = sqrt(abar) noise - sqrt(1 - abar) x0,
    hence x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""

    def x0_from_output(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, x_t)
        return (abar.sqrt() * x_t.float() - (1.0 - abar).sqrt() * output.float()).to(x_t.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, x0)
        return (abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * x0.float()).to(x0.dtype)


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow as SD3 trains it: x_t = (1 - sigma) x0 + sigma noise, the model outputs the velocity
    noise - x0, so x0 = x_t - sigma v.

    Integer t maps to diffusers' FlowMatchEulerDiscreteScheduler training sigmas read from the clean end:
    sigma(t) = shift s / (1 + (shift - 1) s) with s = (t + 1) / N, i.e. ``scheduler.sigmas[N - 1 - t]``
    (t = N - 1 is pure noise), and the network is conditioned on sigma(t) N, its ``scheduler.timesteps``.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        super().__init__()
        if num_train_timesteps < 1 or shift <= 0:
            raise ValueError(f"need num_train_timesteps >= 1 and shift > 0, got {num_train_timesteps} and {shift}")
        s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float32) / num_train_timesteps
        self.register_buffer("sigmas", shift * s / (1 + (shift - 1) * s), persistent=False)
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma(t) in fp32, broadcast against ``like``."""
        return _per_sample(self.sigmas, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0)
        return ((1.0 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def x0_from_output(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t.float() - self.sigma(t, x_t) * output.float()).to(x_t.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (noise.float() - x0.float()).to(x0.dtype)

    def model_timestep(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """sigma(t) N as float, the value diffusers' SD3 / FLUX pipelines pass the transformer."""
        return self.sigmas.to(t.device)[t.long()] * self.num_train_timesteps


def calculate_shift(image_seq_len: float, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """mu for ``image_seq_len`` image tokens: the line through (base_seq_len, base_shift) and (max_seq_len,
    max_shift), as diffusers' FluxPipeline computes it from its scheduler config (extrapolated beyond both)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, s: torch.Tensor) -> torch.Tensor:
    """FLUX's exponential time shift of the unshifted sigma ``s``: exp(mu) / (exp(mu) + (1 / s - 1)), i.e. the
    fixed shift exp(mu) of ``FlowMatchSchedule``."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


class DynamicShiftFlowSchedule(FlowMatchSchedule):
    """Rectified flow whose shift depends on the image size (FLUX.1-dev's ``use_dynamic_shifting``): sigma(t) =
    time_shift(mu, (t + 1) / N), mu = calculate_shift(tokens) with tokens = (h / patch)(w / patch) of the latent it
    is applied to (a tile under latent tiling), or ``fixed_seq_len`` tokens whatever the size. ``sigmas`` holds the
    unshifted grid (t + 1) / N."""

    def __init__(self, num_train_timesteps: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                 max_shift: float, patch: int, fixed_seq_len: int | None = None) -> None:
        super().__init__(num_train_timesteps, 1.0)
        if max_seq_len == base_seq_len or patch < 1:
            raise ValueError(f"need max_seq_len != base_seq_len and patch >= 1, got {max_seq_len}, {base_seq_len}, {patch}")
        self.base_seq_len, self.max_seq_len = base_seq_len, max_seq_len
        self.base_shift, self.max_shift = base_shift, max_shift
        self.patch, self.fixed_seq_len = patch, fixed_seq_len

    def image_seq_len(self, like: torch.Tensor) -> int:
        """The token count mu is computed from: ``fixed_seq_len``, else the latent's packed grid."""
        if self.fixed_seq_len is not None:
            return self.fixed_seq_len
        return (like.shape[-2] // self.patch) * (like.shape[-1] // self.patch)

    def mu(self, like: torch.Tensor) -> float:
        """mu of the latent ``like`` (B, C, h, w)."""
        return calculate_shift(self.image_seq_len(like), self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return time_shift(self.mu(like), super().sigma(t, like))

    def model_timestep(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """sigma(t) N on the latent ``like`` (its size sets the shift)."""
        if like is None:
            raise ValueError("a resolution-dependent shift needs the latent: model_timestep(t, like)")
        return time_shift(self.mu(like), self.sigmas.to(t.device)[t.long()]) * self.num_train_timesteps


def schedule_from_scheduler(scheduler: SchedulerMixin) -> NoiseSchedule:
    """The schedule of a loaded diffusers scheduler: DDPM / DDIM / Euler (epsilon or v_prediction, from its
    ``alphas_cumprod``) or FlowMatchEuler (its ``num_train_timesteps`` and fixed ``shift``)."""
    name, config = type(scheduler).__name__, scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if config.use_dynamic_shifting:
            raise ConfigError(f"{name} with use_dynamic_shifting=True (a resolution-dependent shift) has no fixed "
                              "schedule; set a fixed shift, or give the backbone its own (Backbone.schedule)")
        return FlowMatchSchedule(int(config.num_train_timesteps), float(config.shift))
    if not isinstance(scheduler, ALPHA_BAR_SCHEDULERS):
        raise ConfigError(f"no noise schedule for {name}; supported: DDPMScheduler, DDIMScheduler, "
                          "EulerDiscreteScheduler (epsilon or v_prediction) and FlowMatchEulerDiscreteScheduler")
    prediction = config.prediction_type
    if prediction == "epsilon":
        return EpsilonSchedule(scheduler.alphas_cumprod)
    if prediction == "v_prediction":
        return VPredictionSchedule(scheduler.alphas_cumprod)
    raise ConfigError(f"{name} with prediction_type='{prediction}' is not supported; "
                      "use 'epsilon' or 'v_prediction'")
