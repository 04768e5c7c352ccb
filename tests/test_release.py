"""The public release's recipe as switches, the score math on fixed inputs, the regularizer LoRA as a file,
and the release's Pillow upsampling at inference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, add_noise, compose_config, x0_from_eps
from osediff_lab.data.resize import upsample_input, upsample_to
from osediff_lab.errors import ConfigError
from osediff_lab.models.lora import lora_layers, merge_and_unload
from osediff_lab.models.lora_files import save_lora_tensors
from osediff_lab.models.vsd import classifier_free_guidance
from osediff_lab.pipeline.sizes import plan_sizes, to_network_input
from osediff_lab.train import build_module, run


def module_for(overrides: list[str], tmp_path):
    return build_module(compose_config([*TINY, *overrides], tmp_path))


def randomise_reg_lora(module) -> None:
    """Give the regularizer's LoRA non-zero lora_B, so the fake score differs from the frozen UNet."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in module.method.reg_unet.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("release_precision", [False, True])
def test_fake_score_uses_the_reg_lora_and_real_score_is_cfg_of_the_frozen_unet(tmp_path, release_precision):
    """Independent truth: a copy of the pretrained UNet taken before any LoRA (real score, CFG with the
    negative prompt) and a copy of the regularizer with its LoRA merged by PEFT (fake score)."""
    cfg = compose_config([*TINY, f"method.release_score_precision={str(release_precision).lower()}"], tmp_path)
    from osediff_lab.models.components import build_components

    torch.manual_seed(0)
    pretrained = copy.deepcopy(build_components(cfg.model).denoiser).eval()
    torch.manual_seed(0)  # the same random base weights again, now under the method's LoRA
    module = build_module(cfg).eval()
    randomise_reg_lora(module)
    merged = copy.deepcopy(module.method.reg_unet)
    merge_and_unload(merged)

    g = torch.Generator().manual_seed(1)
    z_h = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    embeds = module.encode_text(["a photo", "grass"])
    x0_real, x0_fake = module.method.vsd_targets(z_h, embeds, t=t, noise=noise)

    abar = module.method.schedule.alphas_cumprod
    z_t = add_noise(z_h, noise, t, abar)
    neg = module.method.fixed_prompt_embedding(cfg.method.negative_prompt).expand(2).hidden
    with torch.no_grad():
        eps_u = pretrained(z_t, t, encoder_hidden_states=neg).sample
        eps_c = pretrained(z_t, t, encoder_hidden_states=embeds.hidden).sample
        eps_fake = merged(z_t, t, encoder_hidden_states=embeds.hidden).sample
    expected_real = x0_from_eps(z_t, classifier_free_guidance(eps_u, eps_c, cfg.method.cfg_scale), t, abar)
    expected_fake = x0_from_eps(z_t, eps_fake, t, abar)
    tol = 3e-2 if release_precision else 1e-4  # release: the real score runs in pure fp16
    torch.testing.assert_close(x0_real, expected_real, atol=tol, rtol=tol)
    torch.testing.assert_close(x0_fake, expected_fake, atol=1e-4, rtol=1e-4)
    assert (x0_fake - x0_from_eps(z_t, eps_c, t, abar)).abs().max() > 1e-2, "the reg LoRA had no effect"

    loss = module.method.regularizer_loss(z_h, embeds, t=t, noise=noise)
    assert float(loss) == pytest.approx(float(torch.nn.functional.mse_loss(eps_fake, noise)), rel=1e-5)


def test_release_reg_layout_trains_only_the_mid_block_adapter(tmp_path):
    module = module_for(["generator.lora.reg_layout=release_only_others_trains"], tmp_path)
    layers = list(lora_layers(module.method.reg_unet))
    with_others = [layer for layer in layers if "default_others" in layer.lora_A]
    assert len(layers) == 73 and len(with_others) == 16  # the release, measured on this model
    assert all(layer.active_adapters == ["default_others"] for layer in layers)
    reg = [n for n in module.trained_names if n.startswith("method.reg_unet.")]
    assert reg and all(".default_others." in n and n.startswith("method.reg_unet.mid_block.") for n in reg)
    paper = module_for([], tmp_path)
    assert len([n for n in paper.trained_names if n.startswith("method.reg_unet.")]) == 2 * 73


def test_release_input_is_resized_with_a_random_mode_and_rounded_to_8_bits():
    lq = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(0)
    assert torch.equal(upsample_input(lq, (32, 32), ["bicubic"]), upsample_to(lq, (32, 32)))
    state = torch.get_rng_state()
    upsample_input(lq, (32, 32), ["bicubic"])
    assert torch.equal(torch.get_rng_state(), state), "one mode must draw nothing (default runs unchanged)"
    x = upsample_input(lq, (32, 32), ["area", "bilinear", "bicubic"], quantize_8bit=True)
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    seen = set()
    for _ in range(30):
        out = upsample_input(lq, (32, 32), ["area", "bilinear", "bicubic"])
        seen.add(next(m for m in ("area", "bilinear", "bicubic")
                      if torch.allclose(out, upsample_input(lq, (32, 32), [m]), atol=1e-6)))
    assert seen == {"area", "bilinear", "bicubic"}


def test_regularizer_lora_saves_and_warm_starts(tmp_path):
    source = module_for([], tmp_path)
    randomise_reg_lora(source)
    path = save_lora_tensors(source.method.extra_exports()["regularizer_lora"], tmp_path / "reg.safetensors", "osediff-lab-regularizer_lora/1")
    warm = module_for([f"generator.lora.reg_init_from={path}"], tmp_path)
    a, b = (m.method.extra_exports()["regularizer_lora"] for m in (source, warm))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="generator.lora.reg_init_from.*other LoRA ranks"):
        module_for([f"generator.lora.reg_init_from={path}", "generator.lora.reg_rank=2"], tmp_path)


def test_release_switches_are_checked_before_building(tmp_path):
    from osediff_lab.checks import config_problems

    cfg = compose_config([*TINY, "generator.input_upsample_modes=[nearest]", "generator.lora.reg_layout=three",
                          f"generator.lora.reg_init_from={tmp_path / 'missing.safetensors'}"], tmp_path)
    text = " ".join(config_problems(cfg))
    assert "generator.input_upsample_modes" in text and "generator.lora.reg_layout" in text
    assert "generator.lora.reg_init_from" in text


TINY_RECIPE = ["model=tiny", "data=demo", "trainer=cpu", "val=none", "logger=csv", "data.crop_size=32",
               "data.batch_size=2", "trainer.max_steps=1", "trainer.log_every_n_steps=1",
               "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=0",
               "trainer.enable_progress_bar=false", "loss.lpips.pretrained=false", "loss.lpips.net=alex",
               "degradation=bicubic", "trainer.precision=16-mixed", "optim.grad_scaler.init_scale=256"]  # no overflow


@pytest.mark.slow
def test_one_iteration_release_vs_paper_on_the_tiny_model(tmp_path):
    """Both recipes from the same seed for one iteration: the release's differences show where expected."""
    runs = {}
    for name, prompt in (("osediff_paper", "dape_tiny"), ("osediff_release", "ram_tiny")):
        cfg = compose_config([f"+experiment={name}", *TINY_RECIPE, f"prompt={prompt}"], tmp_path / name)
        trainer, module, summary = run(cfg)
        assert summary["steps"] == 1
        runs[name] = (trainer, module)
    paper, release = runs["osediff_paper"][1], runs["osediff_release"][1]
    assert release.grad_scaler() is not None and paper.grad_scaler() is not None  # both fp16 (16-mixed)

    reg = {n: p for n, p in release.trained_state_dict().items() if n.startswith("method.reg_unet.")}
    assert reg and all(".default_others." in n for n in reg)
    untouched = [p for n, p in release.method.reg_unet.named_parameters() if ".lora_B.default_encoder." in n]
    assert untouched and all(p.abs().sum() == 0 for p in untouched), "inactive adapters must keep lora_B = 0"

    opt_g = runs["osediff_release"][0].optimizers[0]
    steps = {n: int(opt_g.state[p]["step"]) for n, p in release.generator.named_parameters() if p in opt_g.state}
    conv_in = {n: s for n, s in steps.items() if n.startswith("unet.conv_in.lora_")}
    stepped = [s for n, s in steps.items() if not n.startswith("unet.conv_in.lora_")]
    assert conv_in and set(conv_in.values()) == {2} and set(stepped) <= {0, 1}, (conv_in, set(stepped))
    paper_opt = runs["osediff_paper"][0].optimizers[0]
    assert {int(s["step"]) for s in paper_opt.state.values()} <= {0, 1}


def test_pillow_upsampler_equals_pillow_exactly_on_the_realsr_lr_images(realsr):
    """pipeline.upsampler=pillow feeds the network exactly what the release's Image.resize(BICUBIC) gives."""
    from osediff_lab.data.images import pil_to_tensor

    paths = sorted((realsr / "LR").glob("*.png"))
    assert len(paths) == 100
    psnrs = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        w, h = image.size
        expected = np.asarray(image.resize((4 * w, 4 * h), Image.Resampling.BICUBIC))
        lq = pil_to_tensor(image)[None]
        plan = plan_sizes(h, w, 4, 4 * min(h, w), 8)
        x_pillow, _ = to_network_input(lq, plan, "pillow")
        got = (x_pillow[0] * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), path.name
        x_torch, _ = to_network_input(lq, plan, "torch")
        mse = float(((x_torch - x_pillow) ** 2).mean())
        psnrs.append(10 * np.log10(1 / mse))
    assert 40 < float(np.mean(psnrs)) < 60, np.mean(psnrs)  # close, but not the same input (48.5 dB measured)

