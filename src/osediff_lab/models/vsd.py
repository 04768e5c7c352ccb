"""Pure functions for OSEDiff's diffusion math: guidance, VSD, the regularizer loss and timestep sampling.

Everything here works on latents of any channel count (4 for SD2.1 and SDXL, 16 for SD3), scaled by the VAE
scaling factor. The schedule-dependent parts (noising, x0 from the model output) live in
``osediff_lab.backbones.schedules``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from osediff_lab.dtypes import host_to_device


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond); scale 1 returns the conditional prediction. Any output
    x0 is affine in (eps, v, flow velocity) guides the same way, so x0 of the guided output is guided x0."""
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


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The denoising objective MSE(pred, target) in fp32; the target is the schedule's (eps: the noise)."""
    return F.mse_loss(pred.float(), target.float())


def sample_timesteps(batch: int, t_min: int, t_max: int, device) -> torch.Tensor:
    """Integer timesteps uniform in [t_min, t_max), one per sample (global torch RNG, saved on resume)."""
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got [{t_min}, {t_max})")
    return host_to_device(torch.randint(t_min, t_max, (batch,), device="cpu"), torch.device(device))
