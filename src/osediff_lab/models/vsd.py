"""Pure functions for OSEDiff's diffusion math: x0 from eps, guidance, VSD and the regularizer loss.

Everything here works on latents (4-channel, scaled by the VAE scaling factor) and takes the
scheduler's ``alphas_cumprod`` explicitly, so each function is testable on hand-made tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t], broadcast to ``like``'s rank and cast to its dtype/device."""
    abar = alphas_cumprod.to(device=like.device)[t.to(like.device).long()].to(torch.float32)
    return abar.reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate of an epsilon-prediction model: (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = _abar(alphas_cumprod, t, z_t)
    x0 = (z_t.float() - (1.0 - abar).sqrt() * eps.float()) / abar.sqrt()
    return x0.to(z_t.dtype)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0): sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
    abar = _abar(alphas_cumprod, t, z0)
    return (abar.sqrt() * z0.float() + (1.0 - abar).sqrt() * noise.float()).to(z0.dtype)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond); scale 1 returns the conditional prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def vsd_weight(z_h: torch.Tensor, x0_real: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample normaliser w = mean over (c, h, w) of |z_H - x0_real|, shaped for broadcasting."""
    dims = tuple(range(1, z_h.dim()))
    return (z_h.detach().float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(eps)


def vsd_loss(z_h: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variational score distillation loss and its per-sample weight.

    grad = (x0_fake - x0_real) / w;  L = MSE(z_H, stopgrad(z_H - grad)). Its gradient w.r.t. z_H is
    2 * grad / numel, so descending it moves z_H towards x0_real and away from x0_fake.
    """
    w = vsd_weight(z_h, x0_real)
    grad = (x0_fake.float() - x0_real.float()) / w
    target = (z_h.detach().float() - grad).detach()
    loss = F.mse_loss(z_h.float(), target)
    return loss, w.flatten()


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The standard epsilon-prediction objective MSE(eps_pred, noise), computed in fp32."""
    return F.mse_loss(eps_pred.float(), noise.float())


def sample_timesteps(batch: int, t_min: int, t_max: int, device) -> torch.Tensor:
    """Integer timesteps uniform in [t_min, t_max), one per sample (global torch RNG, saved on resume)."""
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got [{t_min}, {t_max})")
    t = torch.randint(t_min, t_max, (batch,), device="cpu")
    return t.to(device)
