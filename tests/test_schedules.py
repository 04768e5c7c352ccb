"""Noise schedules against diffusers' own schedulers, and the epsilon schedule against the release's formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import nn

from osediff_lab.backbones.schedules import (
    EpsilonSchedule,
    FlowMatchSchedule,
    VPredictionSchedule,
    schedule_from_scheduler,
)
from osediff_lab.errors import ConfigError
from osediff_lab.models.generator import OneStepGenerator

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
T = torch.tensor([0, 1, 20, 500, 980, 999])


def latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(T), 4, 8, 8, generator=g), torch.randn(len(T), 4, 8, 8, generator=g)


def release_x0_from_eps(z_t, eps, t, abar):
    """The formula as the public release's math computes it (fp32 abar lookup, fp32 arithmetic)."""
    a = abar[t.long()].to(torch.float32).reshape(-1, 1, 1, 1)
    return ((z_t.float() - (1.0 - a).sqrt() * eps.float()) / a.sqrt()).to(z_t.dtype)


def release_add_noise(z0, noise, t, abar):
    a = abar[t.long()].to(torch.float32).reshape(-1, 1, 1, 1)
    return (a.sqrt() * z0.float() + (1.0 - a).sqrt() * noise.float()).to(z0.dtype)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_alpha_bar_noising_equals_ddpm_add_noise(prediction):
    s = DDPMScheduler(**SD, prediction_type=prediction)
    schedule = schedule_from_scheduler(s)
    x0, noise = latents()
    torch.testing.assert_close(schedule.add_noise(x0, noise, T), s.add_noise(x0, noise, T), atol=1e-6, rtol=1e-5)


def test_v_prediction_target_is_ddpm_velocity():
    s = DDPMScheduler(**SD, prediction_type="v_prediction")
    x0, noise = latents()
    torch.testing.assert_close(VPredictionSchedule(s.alphas_cumprod).target(x0, noise, T), s.get_velocity(x0, noise, T),
                               atol=1e-6, rtol=1e-5)


def test_v_prediction_x0_equals_ddpm_step_pred_original_sample():
    s = DDPMScheduler(**SD, prediction_type="v_prediction", clip_sample=False)
    x_t, v = latents()
    schedule = VPredictionSchedule(s.alphas_cumprod)
    for step_t in (999, 500, 20):
        s.set_timesteps(timesteps=[step_t])
        t = torch.full((len(T),), step_t)
        expected = s.step(v, step_t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(schedule.x0_from_output(x_t, v, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_noising_equals_flow_match_scale_noise(shift):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = schedule_from_scheduler(s)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.shift == shift
    x0, noise = latents()
    # integer t is diffusers' training index N - 1 - t: its sigma and the timestep value the model sees
    index = 1000 - 1 - T
    assert torch.equal(schedule.sigmas[T], s.sigmas[index])
    assert torch.equal(schedule.model_timestep(T), s.timesteps[index])
    expected = s.scale_noise(x0, s.timesteps[index], noise)
    torch.testing.assert_close(schedule.add_noise(x0, noise, T), expected, atol=1e-6, rtol=1e-5)


def test_flow_sigmas_by_hand():
    schedule = FlowMatchSchedule(1000, shift=3.0)
    assert schedule.sigmas[999].item() == 1.0  # t = N - 1: pure noise
    s = 500 / 1000  # t = 499
    assert schedule.sigmas[499].item() == pytest.approx(3 * s / (1 + 2 * s), rel=1e-6)
    assert schedule.sigmas[499].item() > s  # the shift pushes training towards noisier latents


def test_flow_target_is_noise_minus_x0():
    x0, noise = latents()
    torch.testing.assert_close(FlowMatchSchedule(1000, 3.0).target(x0, noise, T), noise - x0)


@pytest.mark.parametrize(
    "schedule",
    [EpsilonSchedule(DDPMScheduler(**SD).alphas_cumprod), VPredictionSchedule(DDPMScheduler(**SD).alphas_cumprod),
     FlowMatchSchedule(1000, 1.0), FlowMatchSchedule(1000, 3.0)],
    ids=["epsilon", "v_prediction", "flow_shift1", "flow_shift3"],
)
def test_x0_from_output_inverts_add_noise_given_the_true_target(schedule):
    t = torch.tensor([0, 1, 20, 500, 980, 990])  # t = 999 of flow matching is pure noise: x0 is not recoverable
    x0, noise = latents(1)
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(schedule.x0_from_output(x_t, schedule.target(x0, noise, t), t), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epsilon_schedule_is_bit_identical_to_the_release_formulas(dtype):
    abar = DDPMScheduler(**SD).alphas_cumprod
    schedule = EpsilonSchedule(abar)
    x, y = (v.to(dtype) for v in latents(3))
    assert torch.equal(schedule.add_noise(x, y, T), release_add_noise(x, y, T, abar))
    assert torch.equal(schedule.x0_from_output(x, y, T), release_x0_from_eps(x, y, T, abar))
    assert schedule.target(x, y, T) is y
    assert schedule.model_timestep(T) is T


@pytest.mark.parametrize(
    ("scheduler", "kind"),
    [
        (DDPMScheduler(**SD), EpsilonSchedule),
        (DDPMScheduler(**SD, prediction_type="v_prediction"), VPredictionSchedule),
        (DDIMScheduler(**SD), EpsilonSchedule),
        (DDIMScheduler(**SD, prediction_type="v_prediction"), VPredictionSchedule),
        (EulerDiscreteScheduler(**SD), EpsilonSchedule),
        (EulerDiscreteScheduler(**SD, prediction_type="v_prediction"), VPredictionSchedule),
        (FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchSchedule),
    ],
)
def test_schedule_from_scheduler_picks_the_class(scheduler, kind):
    schedule = schedule_from_scheduler(scheduler)
    assert type(schedule) is kind
    assert schedule.num_train_timesteps == 1000
    if kind is not FlowMatchSchedule:
        assert torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod.float())


def test_schedule_from_scheduler_names_what_it_cannot_handle():
    with pytest.raises(ConfigError, match="DDPMScheduler with prediction_type='sample'"):
        schedule_from_scheduler(DDPMScheduler(**SD, prediction_type="sample"))
    with pytest.raises(ConfigError, match="no noise schedule for EulerAncestralDiscreteScheduler"):
        schedule_from_scheduler(EulerAncestralDiscreteScheduler(**SD))
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_schedule_follows_the_module_and_stays_out_of_state_dicts():
    schedule = EpsilonSchedule(DDPMScheduler(**SD).alphas_cumprod)
    assert schedule.state_dict() == {}
    assert schedule.double().alphas_cumprod.dtype == torch.float64


class RecordingUNet(nn.Module):
    """Stands in for the UNet: a fixed output, and the timestep values it was called with."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output, self.seen = output, []
        self.config = SimpleNamespace()  # no added conditions: the SD2.1 family

    def forward(self, z, timestep, encoder_hidden_states):
        self.seen.append(timestep)
        return SimpleNamespace(sample=self.output)


@pytest.mark.parametrize("scheduler", [DDPMScheduler(**SD), DDPMScheduler(**SD, prediction_type="v_prediction"),
                                       FlowMatchEulerDiscreteScheduler(shift=3.0)], ids=["epsilon", "v", "flow"])
def test_generator_step_is_the_schedules_x0_at_its_timestep(scheduler):
    z_l, out = latents(4)
    schedule = schedule_from_scheduler(scheduler)
    vae = nn.Module()
    vae.config = SimpleNamespace(scaling_factor=0.18215, block_out_channels=(8, 8, 8, 8))
    unet = RecordingUNet(out)
    gen = OneStepGenerator(vae, unet, schedule, timestep=999)
    z_h = gen.denoise(z_l, torch.zeros(len(T), 2, 8))
    t = torch.full((len(T),), 999)
    assert torch.equal(z_h, schedule.x0_from_output(z_l, out, t))
    assert torch.equal(unet.seen[0], schedule.model_timestep(t))
