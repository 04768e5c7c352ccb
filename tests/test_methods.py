"""Methods behind one interface: a toy method defined in this file alone trains; PiSA-SR's residual generator,
its two stages (pixel LoRA with L2, then the semantic LoRA with LPIPS + CSD on the frozen pixel LoRA) and its
inference weights lambda_pix / lambda_sem; every method composes with every experiment."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from helpers import TINY, add_noise, compose_config, x0_from_eps
from osediff_lab.checks import config_problems, validate_config
from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import Method, weighted_total
from osediff_lab.models.components import build_components
from osediff_lab.models.pisasr import build_pisa_generator
from osediff_lab.models.vsd import classifier_free_guidance, sample_timesteps
from osediff_lab.paths import CONF_DIR
from osediff_lab.pipeline import SRPipeline
from osediff_lab.train import build_module, run

pytestmark = pytest.mark.usefixtures("single_thread")
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
RUN = [*TINY, "trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
       "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false"]


class ToyGenerator(nn.Module):
    """x_L in [-1, 1] -> (x_H in [-1, 1], the same as its 'latent'): one 3x3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x_l: torch.Tensor, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_h = torch.tanh(self.conv(x_l))
        return x_h, x_h


class ToyMethod(Method):
    """A method the framework has never seen: L1 to the HQ crop, no regularizer."""

    def __init__(self, components, encode_text, lpips, l1_weight: float, optim: dict) -> None:
        super().__init__(ToyGenerator(), {}, encode_text, optim=optim)
        self.l1_weight = l1_weight

    def generator_losses(self, batch, embeds):
        x_h, _ = self.generator(batch["lq_up"], embeds)
        return weighted_total({"l1": (x_h - batch["hq"]).abs().mean()}, {"l1": self.l1_weight}), None


@pytest.mark.slow
def test_a_method_defined_in_a_test_file_trains_three_steps(tmp_path):
    cfg = compose_config([*RUN, "callbacks.samples.num_images=0"], tmp_path)  # grids need a latent generator
    with open_dict(cfg):
        cfg.method = {"_target_": f"{__name__}.ToyMethod", "l1_weight": 1.0, "optim": {"generator": {"lr": 1e-3}}}
    torch.manual_seed(0)
    before = copy.deepcopy(build_module(cfg).method.generator.state_dict())
    trainer, module, summary = run(cfg)
    assert trainer.global_step == 3 and summary["steps"] == 3
    assert module.trained_names == ["method.generator.conv.weight", "method.generator.conv.bias"]
    assert not torch.equal(module.method.generator.conv.weight, before["conv.weight"]), "nothing was trained"
    assert "train/loss_l1" in summary["last_metrics"] and "train/skipped_generator" in summary["last_metrics"]
    exported = load_file(summary["lora"])
    assert set(exported) == {"conv.weight", "conv.bias"}
    assert torch.equal(exported["conv.weight"], module.method.generator.conv.weight.detach())


def test_pisa_generator_predicts_the_residual_of_the_lq_latent():
    """z_H = z_L - UNet(z_L, t, c), checked against the pretrained UNet (fresh LoRA: lora_B = 0)."""
    cfg = compose_config([*TINY, "method=pisasr_pixel"])
    torch.manual_seed(0)
    components = build_components(cfg.model)
    pretrained = copy.deepcopy(components.denoiser).eval()
    generator, targets = build_pisa_generator(components, cfg.method.lora, cfg.method.timestep)
    assert set(targets) == {"unet.pixel", "unet.semantic"} and not any(p.requires_grad for p in generator.parameters())
    z_l = torch.randn(2, 4, 8, 8)
    embeds = torch.randn(2, 77, pretrained.config.cross_attention_dim)
    t = torch.full((2,), cfg.method.timestep)
    with torch.no_grad():
        expected = z_l - pretrained(z_l, t, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(generator.denoise(z_l, embeds), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory) -> dict:
    """The summary of one PiSA-SR pixel-stage run (3 steps), shared by the tests that start from its export."""
    return run(compose_config([*RUN, "method=pisasr_pixel"], tmp_path_factory.mktemp("pixel")))[2]


@pytest.mark.slow
def test_csd_targets_are_cfg_and_unconditional_x0_of_the_pretrained_unet(tmp_path, pixel):
    cfg = compose_config([*TINY, "method=pisasr_semantic", f"method.pixel_lora_from={pixel['lora']}"], tmp_path / "sem")
    torch.manual_seed(0)
    pretrained = copy.deepcopy(build_components(cfg.model).denoiser).eval()
    torch.manual_seed(0)
    method = build_module(cfg).method.eval()
    z_h = torch.randn(2, 4, 8, 8)
    embeds = method.encode_text(["a photo", "grass"])
    torch.manual_seed(3)
    x0_cfg, x0_uncond = method.csd_targets(z_h, embeds)
    torch.manual_seed(3)
    t = sample_timesteps(2, cfg.method.csd_t_min, cfg.method.csd_t_max, "cpu")
    z_t = add_noise(z_h, torch.randn_like(z_h), t, method.generator.schedule.alphas_cumprod)
    neg = method.encode_text([cfg.method.negative_prompt]).expand(2).hidden
    with torch.no_grad():
        eps_u = pretrained(z_t, t, encoder_hidden_states=neg).sample
        eps_c = pretrained(z_t, t, encoder_hidden_states=embeds.hidden).sample
    abar = method.generator.schedule.alphas_cumprod
    torch.testing.assert_close(x0_cfg, x0_from_eps(z_t, classifier_free_guidance(eps_u, eps_c, 7.5), t, abar), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_uncond, x0_from_eps(z_t, eps_u, t, abar), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pisa_two_stages_then_inference_weights(tmp_path, pixel):
    stage1 = load_file(pixel["lora"])
    assert any(".pixel." in k and ".lora_B." in k and v.abs().sum() > 0 for k, v in stage1.items()), "pixel LoRA untrained"
    assert all(v.abs().sum() == 0 for k, v in stage1.items() if ".lora_B.semantic." in k), "stage 1 moved the semantic LoRA"

    sem_cfg = compose_config([*RUN, "method=pisasr_semantic", f"method.pixel_lora_from={pixel['lora']}"], tmp_path / "sem")
    _, module, semantic = run(sem_cfg)
    assert {"train/loss_lpips", "train/loss_csd"} <= set(semantic["last_metrics"])
    assert all(".semantic." in n for n in module.trained_names)
    stage2 = load_file(semantic["lora"])
    assert set(stage2) == set(stage1)
    assert all(torch.equal(stage2[k], v) for k, v in stage1.items() if ".pixel." in k), "the frozen pixel LoRA changed"
    assert any(v.abs().sum() > 0 for k, v in stage2.items() if ".lora_B.semantic." in k), "semantic LoRA untrained"

    lq = torch.rand(1, 3, 16, 16)

    def sr(path, **weights):
        return SRPipeline.from_checkpoint(path, device="cpu", **weights).enhance(lq)[0]

    both, pixel_only = sr(semantic["lora"]), sr(semantic["lora"], lambda_sem=0.0)
    torch.testing.assert_close(pixel_only, sr(pixel["lora"]), atol=1e-5, rtol=0)  # lambda_sem=0: the pixel stage
    assert (both - pixel_only).abs().max() > 1e-4, "the semantic LoRA had no effect"
    osediff = run(compose_config(RUN, tmp_path / "osediff"))[2]
    with pytest.raises(ConfigError, match="pipeline.lambda_pix"):  # an OSEDiff checkpoint has no such knob
        sr(osediff["lora"], lambda_pix=0.5)

    Image.fromarray((lq[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "lq.png")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "osediff_lab.infer", f"input={tmp_path / 'lq.png'}", f"output={out}",
                           f"ckpt={semantic['lora']}", "pipeline.lambda_sem=0", "pipeline.device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "lq.png").is_file()


def test_semantic_stage_without_its_pixel_lora_is_rejected_before_building(tmp_path):
    cfg = compose_config([*TINY, "method=pisasr_semantic"], tmp_path)
    with pytest.raises(ConfigError, match="method.pixel_lora_from"):
        validate_config(cfg)
    cfg = compose_config([*TINY, "method=pisasr_pixel", "method.csd_t_min=990", "method.lora.rank=0"], tmp_path)
    text = " ".join(config_problems(cfg))
    assert "method.csd_t_min" in text and "method.lora.rank" in text


# PiSA-SR's experiments (pisasr_paper, pisasr_release) set PiSA-SR's own method keys: they compose with its methods.
# OMGSR's recipe weighs its own losses (L2 and LPIPS at 0): it composes with HYPIR's GAN method, which it names.
PAIRS = [(m, e) for e in EXPERIMENTS for m in METHODS if (m.startswith("pisasr") or not e.startswith("pisasr"))
         and (m == "hypir" or e != "omgsr_flux_release")]


@pytest.mark.slow
@pytest.mark.parametrize("method, experiment", PAIRS)
def test_every_method_composes_with_every_experiment(method, experiment, tmp_path):
    """An experiment's own method keys (OSEDiff's loss weights in demo, osediff_release, ...) are refused by name for a
    method that has no such argument; nothing else of the method is."""
    cfg = compose_config([f"+experiment={experiment}", f"method={method}"], tmp_path)
    assert cfg.method._target_.startswith("osediff_lab.methods.")
    problems = [p for p in config_problems(cfg) if p.startswith("method.")]
    own = {k for k in (OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").get("method") or {}) if k != "optim"}
    foreign = [p for p in problems if any(p.startswith(f"method.{k} is not an argument of") for k in own)]
    problems = [p for p in problems if p not in foreign]
    if method == "pisasr_semantic":
        assert len(problems) == 1 and "method.pixel_lora_from" in problems[0]
    else:
        assert problems == []
