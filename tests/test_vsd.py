"""VSD and diffusion math (and the tests' hand-written epsilon schedule) against hand-worked values and diffusers' DDPMScheduler."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from helpers import add_noise, x0_from_eps
from osediff_lab.models.vsd import classifier_free_guidance, diffusion_loss, vsd_loss, vsd_weight


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def test_alphas_match_sd21_by_hand():
    s = sd_scheduler()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.alphas_cumprod.double(), abar, atol=1e-6)


def test_x0_equals_ddpm_step_with_one_inference_step():
    z = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    for step_t in (999, 500):
        s = sd_scheduler()
        s.set_timesteps(timesteps=[step_t])
        out = s.step(eps, step_t, z, generator=torch.Generator().manual_seed(0))
        ours = x0_from_eps(z, eps, torch.tensor([step_t, step_t]), s.alphas_cumprod)
        assert torch.allclose(ours, out.pred_original_sample, atol=1e-5), step_t
        # one step to t = -1: no noise is added, so the step's output is the x0 estimate itself
        assert torch.allclose(ours, out.prev_sample, atol=1e-5), step_t


def test_x0_by_hand_single_value():
    abar = torch.tensor([0.25])
    z, eps = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    # (1 - sqrt(0.75) * 0.5) / 0.5
    expected = (1 - math.sqrt(0.75) * 0.5) / 0.5
    assert math.isclose(x0_from_eps(z, eps, torch.tensor([0]), abar).item(), expected, rel_tol=1e-6)


def test_add_noise_matches_scheduler_and_inverts_x0():
    s = sd_scheduler()
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    ours = add_noise(z0, noise, t, s.alphas_cumprod)
    assert torch.allclose(ours, s.add_noise(z0, noise, t), atol=1e-5)
    assert torch.allclose(x0_from_eps(ours, noise, t, s.alphas_cumprod), z0, atol=1e-3)


def test_cfg_by_hand():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert classifier_free_guidance(u, c, 7.5).item() == 1.0 + 7.5 * 2.0
    assert classifier_free_guidance(u, c, 1.0).item() == 3.0


def test_vsd_loss_value_by_hand():
    z_h = torch.tensor([[[[1.0, 2.0]]]])
    x0_real = torch.tensor([[[[0.0, 0.0]]]])
    x0_fake = torch.tensor([[[[2.0, 4.0]]]])
    # w = mean(|z - real|) = 1.5; grad = (fake - real) / w = [4/3, 8/3]; loss = mean(grad^2) = (16/9 + 64/9) / 2
    loss, w = vsd_loss(z_h, x0_real, x0_fake)
    assert math.isclose(w.item(), 1.5, rel_tol=1e-6)
    assert math.isclose(loss.item(), (16 / 9 + 64 / 9) / 2, rel_tol=1e-6)


def test_vsd_gradient_points_from_fake_to_real():
    z_h = torch.randn(2, 4, 8, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss, _ = vsd_loss(z_h, x0_real, x0_fake)
    loss.backward()
    w = vsd_weight(z_h, x0_real)
    expected = 2 * (x0_fake - x0_real) / w / z_h.numel()
    assert torch.allclose(z_h.grad, expected, atol=1e-6)
    # a small descent step moves z_H closer to x0_real relative to x0_fake: -grad is parallel to (real - fake)
    step = -z_h.grad
    assert (step * (x0_real - x0_fake)).sum() > 0


def test_vsd_weight_is_per_sample():
    z = torch.stack([torch.ones(4, 2, 2), 3 * torch.ones(4, 2, 2)])
    w = vsd_weight(z, torch.zeros_like(z))
    assert torch.allclose(w.flatten(), torch.tensor([1.0, 3.0]))


def test_diffusion_loss_is_mse():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    assert diffusion_loss(a, b).item() == (1 + 4) / 2
