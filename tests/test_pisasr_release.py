"""PiSA-SR as its public release runs it (github csslc/PiSA-SR@9c76e12), each fact against a hand computation: the CSD
with the release's negative prompt against a copy of the pretrained UNet, stage 2's total L2 + 2 LPIPS + CSD, LoRA
alpha 8 at rank 4 (scale 2), the null-text coin, the two-call lambda mixing against two separately merged UNets
(tiles included), the release-format checkpoint (pisa_sr.pkl) through the API and `infer`, the zero-CSD
configuration refused, and the release's optimiser quirks (one AdamW over both sets; unsynced semantic gradients)."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import save_file

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.methods.pisasr import StepDraws
from osediff_lab.models.components import build_components, save_pretrained
from osediff_lab.models.lora import lora_layers, merge_and_unload
from osediff_lab.models.perceptual import build_lpips
from osediff_lab.models.pisasr import build_pisa_generator
from osediff_lab.models.text import PromptEmbedder
from osediff_lab.pipeline import SRPipeline
from osediff_lab.pipeline.tiling import tiled_apply
from osediff_lab.prompts import NullPrompt

pytestmark = pytest.mark.usefixtures("single_thread")

# training_utils.py:24 --neg_prompt_csd, character for character ("oil painting" twice)
RELEASE_NEGATIVE = ("painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
                    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
                    "jpeg artifacts, deformed, lowres, over-smooth")
CAPTIONS = ["grass, tree, sky, ", "cat, "]  # RAM tags as the release formats them: "{tags}, " (train_pisasr.py:155)


def perturb_lora(generator: torch.nn.Module, seed: int, only: str = "") -> None:
    """Give the LoRA tensors (those named with ``only``) a random offset, as training would (lora_B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(generator.named_parameters()):
            if (".lora_A." in name or ".lora_B." in name) and only in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_method(overrides: list[str], seed: int = 0) -> SimpleNamespace:
    """A PiSA-SR method built as train.py builds it, with copies of the pretrained UNet and VAE taken first."""
    cfg = compose_config([*TINY, *overrides])
    torch.manual_seed(seed)
    components = build_components(cfg.model)
    pretrained_unet, pretrained_vae = copy.deepcopy(components.denoiser).eval(), copy.deepcopy(components.vae).eval()
    lpips = build_lpips(cfg.loss.lpips, cfg.paths.weights_dir) if cfg.method.lpips_weight > 0 else None
    try:
        method = instantiate(cfg.method, components=components, encode_text=PromptEmbedder(components.text, max_cached=64),
                             lpips=lpips, _recursive_=False)
    except InstantiationException as exc:  # the method's own error, as train.build_module raises it
        raise exc.__cause__ from None
    return SimpleNamespace(cfg=cfg, method=method, unet=pretrained_unet, vae=pretrained_vae,
                           abar=components.scheduler.alphas_cumprod.float())


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    """A pixel-stage export (trained-looking pixel LoRA) for the semantic stage's method.pixel_lora_from."""
    built = build_method(["method=pisasr_pixel"], seed=5)
    perturb_lora(built.method.generator, seed=7, only=".pixel.")
    path = tmp_path_factory.mktemp("pixel") / "pixel.safetensors"
    save_file({k: v.detach().contiguous() for k, v in built.method.export_state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def semantic(pixel_export):
    """The semantic stage as the release recipe's defaults configure it (release negative prompt, null ratio 0.5)."""
    built = build_method(["method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}"])
    perturb_lora(built.method.generator, seed=11, only=".semantic.")
    return built


def batch_and_draws(built: SimpleNamespace, seed: int = 3, null_text: bool = False) -> tuple[dict, StepDraws]:
    """A batch in [-1, 1] and every draw of the step given explicitly."""
    g = torch.Generator().manual_seed(seed)
    batch = {"hq": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "lq_up": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1}
    with torch.no_grad():
        shape = built.vae.encode(batch["lq_up"]).latent_dist.mean.shape
    draws = StepDraws(csd_t=torch.tensor([37, 412]), csd_noise=torch.randn(shape, generator=g), null_text=null_text,
                      posterior_noise=torch.randn(shape, generator=g))
    return batch, draws


def hand_step(built: SimpleNamespace, batch: dict, draws: StepDraws) -> dict[str, torch.Tensor]:
    """The release's stage-2 step written out (pisasr.py:275-293, 139-171; train_pisasr.py:170-176): z_L a posterior
    draw, z_H = z_L - UNet_LoRA(z_L, 1, c), CSD with the pretrained UNet's CFG 7.5 (negative prompt vs caption)."""
    method, sf = built.method, built.vae.config.scaling_factor
    caption = method.encode_text(CAPTIONS).hidden
    negative = method.encode_text([RELEASE_NEGATIVE]).hidden.expand(2, -1, -1)
    null = method.encode_text([""]).hidden.expand(2, -1, -1)
    with torch.no_grad():
        dist = built.vae.encode(batch["lq_up"]).latent_dist
        z_l = (dist.mean + dist.std * draws.posterior_noise) * sf
        one = torch.ones(2, dtype=torch.long)
        z_h = z_l - method.generator.unet(z_l, one, encoder_hidden_states=null if draws.null_text else caption).sample
        x_h = built.vae.decode(z_h / sf).sample.clamp(-1, 1)
        t, abar = draws.csd_t, built.abar[draws.csd_t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z_h + (1 - abar).sqrt() * draws.csd_noise
        eps_neg = built.unet(z_t, t, encoder_hidden_states=negative).sample
        eps_cap = built.unet(z_t, t, encoder_hidden_states=caption).sample
        eps_real = eps_neg + 7.5 * (eps_cap - eps_neg)
        x0_real = (z_t - (1 - abar).sqrt() * eps_real) / abar.sqrt()
        x0_fake = (z_t - (1 - abar).sqrt() * eps_neg) / abar.sqrt()
        weighting = (z_h - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        csd = (((x0_fake - x0_real) / weighting) ** 2).mean()  # MSE(z_H, stopgrad(z_H - grad)) = mean(grad^2)
        l2 = F.mse_loss(x_h, batch["hq"])
        lpips = method.lpips(x_h, batch["hq"]).mean()
    return {"l2": l2, "lpips": lpips, "csd": csd, "total": l2 + 2 * lpips + csd}


# ---- the recipe ----------------------------------------------------------------------------------
def test_csd_with_the_release_negative_prompt_and_stage_two_total(semantic):
    """CSD against CFG / x0 of a copy of the pretrained UNet by hand, the generator on the null prompt while the CSD
    keeps the caption; stage 2's total is L2 + 2 LPIPS + CSD; only the semantic LoRA gets gradients."""
    method = semantic.method
    assert method.negative_prompt == RELEASE_NEGATIVE
    assert (method.weights, method.csd_t, method.cfg_scale) == ({"l2": 1.0, "lpips": 2.0, "csd": 1.0}, (20, 500), 7.5)
    for null_text in (True, False):
        batch, draws = batch_and_draws(semantic, null_text=null_text)
        terms, _ = method.generator_losses(batch, method.encode_text(CAPTIONS), draws)
        expected = hand_step(semantic, batch, draws)
        for key in ("l2", "lpips", "csd", "total"):
            torch.testing.assert_close(terms[key], expected[key], rtol=2e-4, atol=1e-6, msg=f"{key}, null_text={null_text}")
        assert expected["csd"] > 0
    method.generator.zero_grad(set_to_none=True)
    terms["total"].backward()
    grads = {n: p.grad for n, p in method.generator.named_parameters() if ".lora_" in n}
    assert all(g is None for n, g in grads.items() if ".pixel." in n)
    assert sum(float(g.abs().sum()) for n, g in grads.items() if ".lora_B.semantic." in n) > 0


def test_lora_alpha_8_at_rank_4_is_scale_2():
    """The release's LoraConfig has no lora_alpha (pisasr.py:66-71): PEFT's 8 over rank 4, delta = 2 B A against W0."""
    cfg = compose_config([*TINY, "method=pisasr_pixel"])
    assert (cfg.method.lora.rank, cfg.method.lora.alpha) == (4, 8)
    torch.manual_seed(0)
    components = build_components(cfg.model)
    w0 = {n: p.detach().clone() for n, p in components.denoiser.named_parameters()}
    generator, targets = build_pisa_generator(components, cfg.method.lora, cfg.method.timestep)
    perturb_lora(generator, seed=1, only=".pixel.")
    name = next(n for n in targets["unet.pixel"] if n.endswith("to_q"))
    layer = generator.unet.get_submodule(name)
    a, b = layer.lora_A["pixel"].weight.detach().clone(), layer.lora_B["pixel"].weight.detach().clone()
    x = torch.randn(3, a.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * x @ a.T @ b.T, rtol=1e-5, atol=1e-6)
        merge_and_unload(generator)  # the semantic set's lora_B is 0: W = W0 + 2 B_pix A_pix
    torch.testing.assert_close(generator.unet.get_submodule(name).weight, w0[f"{name}.weight"] + 2 * b @ a, rtol=1e-5, atol=1e-6)


def test_null_text_coin_at_0_and_1_one_python_draw_per_batch(semantic):
    method = semantic.method
    captions = method.encode_text(CAPTIONS)
    null = method.encode_text([""]).expand(2)
    saved = method.null_text_ratio
    try:
        for ratio, want in ((0.0, False), (1.0, True)):
            method.null_text_ratio = ratio
            for _ in range(20):
                embeds, coin = method.generator_prompt(captions)
                assert coin is want
                assert torch.equal(embeds.hidden, (null if want else captions).hidden)
        method.null_text_ratio = 0.5
        random.seed(5)
        coins = [method.generator_prompt(captions)[1] for _ in range(3)]
        random.seed(5)
        assert coins == [random.random() < 0.5 for _ in range(3)]  # one random() per batch, as pisasr.py:284
        assert method.generator_prompt(captions, null_text=True)[1] is True  # a given coin is not drawn
    finally:
        method.null_text_ratio = saved


def test_the_draws_of_a_step_can_be_given(semantic):
    method = semantic.method
    batch, draws = batch_and_draws(semantic)
    embeds = method.encode_text(CAPTIONS)
    first, _ = method.generator_losses(batch, embeds, draws)
    torch.manual_seed(123)
    again, _ = method.generator_losses(batch, embeds, draws)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, _ = method.generator_losses(batch, embeds, StepDraws(null_text=False))
    assert not torch.equal(first["csd"], other["csd"])


# ---- the configuration check -------------------------------------------------------------------
@pytest.mark.parametrize("overrides, keys", [
    (["prompt=none", "method.negative_prompt=''"], ["method.csd_weight", "prompt=none", "method.negative_prompt"]),
    (["prompt=fixed", "prompt.text=lowres", "method.negative_prompt=lowres"], ["prompt=fixed", "method.negative_prompt"]),
    (["method.cfg_scale=0"], ["method.cfg_scale"]),
])
def test_a_csd_that_trains_nothing_is_refused_before_anything_is_built(overrides, keys, pixel_export):
    cfg = compose_config([*TINY, "method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}", *overrides])
    problems = [p for p in config_problems(cfg) if "CSD" in p]
    assert len(problems) == 1 and all(k in problems[0] for k in keys), problems
    with pytest.raises(ConfigError, match="CSD"):
        build_method(["method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}", *overrides])
    fine = compose_config([*TINY, "method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}", "prompt=none"])
    assert not [p for p in config_problems(fine) if "CSD" in p]  # the null prompt against the release's list is fine


def test_the_experiments_carry_the_release_values():
    release = compose_config(["+experiment=pisasr_release", "method=pisasr_semantic"])
    m = release.method
    assert (m.lora.rank, m.lora.alpha, m.timestep, m.latent, m.cfg_scale, m.csd_t_min, m.csd_t_max) == (4, 8, 1, "sample", 7.5, 20, 500)
    assert (m.l2_weight, m.lpips_weight, m.csd_weight, m.null_text_ratio, m.negative_prompt) == (1.0, 2.0, 1.0, 0.5, RELEASE_NEGATIVE)
    assert dict(m.optim.generator) == {"lr": 5e-05, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-08}
    assert m.release_one_optimizer and m.release_unsynced_semantic_grads
    assert (release.seed, release.trainer.precision, release.trainer.devices, release.data.batch_size, release.data.crop_size) == (
        123, "16-mixed", 4, 4, 512)
    assert (release.prompt.name, release.prompt.source, release.prompt.template) == ("ram", "hq", "{tags}, ")
    assert release.degradation.name == "realesrgan_pisasr_release" and release.optim.grad_clip == 1.0
    paper = compose_config(["+experiment=pisasr_paper"])
    assert not paper.method.release_one_optimizer and not paper.method.release_unsynced_semantic_grads
    assert paper.method.stage == "pixel" and paper.trainer.max_steps == 4000


@pytest.mark.parametrize("experiment", ["pisasr_paper", "pisasr_release"])
def test_the_experiments_pass_the_checks_and_build_on_the_tiny_model(experiment, tmp_path):
    cfg = compose_config([f"+experiment={experiment}", *TINY, "val=none", "prompt=ram_tiny", "degradation=bicubic",
                          "trainer=cpu", "trainer.precision=32"], tmp_path)
    assert config_problems(cfg) == []
    from osediff_lab.train import build_module

    module = build_module(cfg)
    assert module.method.release_one_optimizer is (experiment == "pisasr_release")
    assert module.prompts(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))[0].endswith(", ")  # "{tags}, "


# ---- the release's optimiser quirks ------------------------------------------------------------
@pytest.mark.slow
def test_unsynced_semantic_gradients_and_one_optimizer_groups(pixel_export):
    sem = ["method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}"]
    for overrides, stage_sync in ((["method=pisasr_pixel"], True), (sem, False)):
        built = build_method([*overrides, "method.release_one_optimizer=true", "method.release_unsynced_semantic_grads=true"])
        group = built.method.param_groups()["generator"]
        assert group.settings.sync_grads is stage_sync
        assert len(group.params) == len(built.method.lora_tensors())  # both sets, as train_pisasr.py:84-91
    plain = build_method(sem).method.param_groups()["generator"]
    assert plain.settings.sync_grads and all(p.requires_grad for p in plain.params)


@pytest.mark.slow
def test_release_adamw_keeps_moving_the_frozen_pixel_lora_in_stage_two(pixel_export):
    """The frozen pixel LoRA keeps a zero gradient (set_grads_to_none unset), so AdamW moves it by weight decay and
    its stage-1 moments: p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) with m, v decayed by beta1, beta2."""
    built = build_method(["method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}", "method.release_one_optimizer=true"])
    method = built.method
    group = method.param_groups()["generator"]
    s = group.settings
    optimizer = torch.optim.AdamW(group.params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, eps=s.eps)
    name, pix = next((n, p) for n, p in method.generator.named_parameters() if ".lora_B.pixel." in n)
    m0, v0, step0 = torch.randn_like(pix) * 1e-3, torch.rand_like(pix) * 1e-6, 4000
    optimizer.state[pix] = {"step": torch.tensor(float(step0)), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    before = pix.detach().clone()
    batch, draws = batch_and_draws(built)
    terms, _ = method.generator_losses(batch, method.encode_text(CAPTIONS), draws)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    assert torch.equal(pix.grad, torch.zeros_like(pix)), name
    optimizer.step()
    (b1, b2), t = s.betas, step0 + 1
    m, v = b1 * m0, b2 * v0
    expected = before * (1 - s.lr * s.weight_decay) - s.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + s.eps)
    torch.testing.assert_close(pix.detach(), expected, rtol=1e-6, atol=1e-12)
    plain = build_method(["method=pisasr_semantic", f"method.pixel_lora_from={pixel_export}"]).method
    terms, _ = plain.generator_losses(batch, plain.encode_text(CAPTIONS), draws)
    terms["total"].backward()
    assert all(p.grad is None for n, p in plain.generator.named_parameters() if ".pixel." in n)


@pytest.mark.slow
def test_release_stage_two_continues_stage_one_through_the_loop(tmp_path):
    """pisasr_release's two commands on the tiny model: stage 2 resumes stage 1's checkpoint (its AdamW moments) and
    the training loop keeps stepping the frozen pixel LoRA; without the switch (pisasr_paper's fresh stage 2) it
    stays as stage 1 left it."""
    from safetensors.torch import load_file

    from osediff_lab.train import run

    steps = ["trainer.log_every_n_steps=1", "callbacks.samples.num_images=0", "callbacks.checkpoint.every_n_train_steps=3",
             "trainer.enable_progress_bar=false"]
    quirks = ["method.release_one_optimizer=true", "method.release_unsynced_semantic_grads=true"]
    first = run(compose_config([*TINY, *steps, *quirks, "method=pisasr_pixel", "trainer.max_steps=3"], tmp_path / "pixel"))[2]
    stage1 = load_file(first["lora"])
    resume = [f"ckpt_path={tmp_path / 'pixel' / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=5"]
    for switch, moves in (([*quirks, *resume], True), (["trainer.max_steps=2"], False)):
        second = run(compose_config([*TINY, *steps, *switch, "method=pisasr_semantic", f"method.pixel_lora_from={first['lora']}"],
                                    tmp_path / f"semantic{len(switch)}"))[2]
        assert second["steps"] == (5 if moves else 2)
        stage2 = load_file(second["lora"])
        drift = max(float((stage2[k] - v).abs().max()) for k, v in stage1.items() if ".pixel." in k)
        assert (drift > 1e-6) is moves, drift
        assert any(v.abs().sum() > 0 for k, v in stage2.items() if ".lora_B.semantic." in k)


# ---- inference: the release's two-call mixing --------------------------------------------------
PAIRS = [(1.0, 1.0), (1.0, 0.0), (1.0, 0.5), (0.0, 1.0), (0.7, 1.3)]


@pytest.fixture(scope="module")
def two_sets():
    """A tiny PiSA-SR generator with both LoRA sets trained-looking, and the two UNets merged separately from it:
    W0 + dW_pix and W0 + dW_pix + dW_sem."""
    cfg = compose_config([*TINY, "method=pisasr_semantic"])
    torch.manual_seed(42)
    components = build_components(cfg.model)
    generator, _ = build_pisa_generator(components, cfg.method.lora, cfg.method.timestep, "mode")
    perturb_lora(generator, seed=2)
    merged = {}
    for key, adapters in (("pix", ["pixel"]), ("full", ["pixel", "semantic"])):
        unet = copy.deepcopy(generator.unet)
        for layer in lora_layers(unet):
            layer.set_adapter(adapters)
        merge_and_unload(unet)
        merged[key] = unet.eval()
    embeds = torch.randn(2, 77, components.denoiser.config.cross_attention_dim)
    return SimpleNamespace(components=components, generator=generator.eval(), merged=merged, embeds=embeds, cfg=cfg)


def release_mix(sets: SimpleNamespace, z_l: torch.Tensor, lambda_pix: float, lambda_sem: float) -> torch.Tensor:
    """z_L - (l_pix eps_pix + l_sem (eps_full - eps_pix)), eps from the two merged UNets (pisasr.py:512-518)."""
    one = torch.ones(z_l.shape[0], dtype=torch.long)
    eps_pix = sets.merged["pix"](z_l, one, encoder_hidden_states=sets.embeds[: z_l.shape[0]]).sample
    eps_full = sets.merged["full"](z_l, one, encoder_hidden_states=sets.embeds[: z_l.shape[0]]).sample
    return z_l - (lambda_pix * eps_pix + lambda_sem * (eps_full - eps_pix))


@pytest.mark.parametrize("lambda_pix, lambda_sem", PAIRS)
def test_two_call_mixing_against_two_merged_unets(two_sets, lambda_pix, lambda_sem):
    z_l = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = release_mix(two_sets, z_l, lambda_pix, lambda_sem)
        got = two_sets.generator.inference_denoiser(lambda_pix, lambda_sem)(z_l, two_sets.embeds)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        merged = copy.deepcopy(two_sets.generator)  # pipeline.merge_lora: merged when one call suffices
        one_call = merged.merge_adapters(lambda_pix, lambda_sem)
        assert one_call == (lambda_sem == 0 or lambda_pix == lambda_sem)
        torch.testing.assert_close(merged.inference_denoiser(lambda_pix, lambda_sem)(z_l, two_sets.embeds), expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_pipeline_mixes_tile_by_tile(two_sets, merge_lora):
    """The pipeline's latent tiles each get the two-call mixing (pisasr.py:569-574), merged or not."""
    lambda_pix, lambda_sem = 0.7, 1.3
    opts = {"merge_lora": merge_lora, "latent": "mode", "lambda_pix": lambda_pix, "lambda_sem": lambda_sem, "device": "cpu",
            "latent_tiling": {"tile": 4, "overlap": 2, "sigma": 0.1}}
    pipe = SRPipeline(copy.deepcopy(two_sets.generator), copy.deepcopy(two_sets.components.text), NullPrompt(), 4, opts)
    x_l = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    embeds = pipe.embed([""])
    vae, sf = two_sets.components.vae, two_sets.components.vae.config.scaling_factor
    with torch.no_grad():
        z_l = vae.encode(x_l).latent_dist.mode() * sf
        assert max(z_l.shape[-2:]) > 4  # several tiles
        saved, two_sets.embeds = two_sets.embeds, embeds.hidden
        try:
            z_h = tiled_apply(lambda z: release_mix(two_sets, z, lambda_pix, lambda_sem), z_l, 4, 2, 0.1)
        finally:
            two_sets.embeds = saved
        expected = vae.decode(z_h / sf).sample.clamp(-1, 1)
        torch.testing.assert_close(pipe.generate(x_l, embeds), expected, rtol=1e-4, atol=1e-4)


def test_fused_qkv_with_two_calls_is_refused(two_sets):
    opts = {"merge_lora": True, "lambda_pix": 1.0, "lambda_sem": 0.5, "device": "cpu", "fast": {"fuse_qkv": True}}
    with pytest.raises(ConfigError, match="pipeline.fast.fuse_qkv.*two UNet calls"):
        SRPipeline(copy.deepcopy(two_sets.generator), copy.deepcopy(two_sets.components.text), NullPrompt(), 4, opts)


# ---- the release's checkpoint: pisa_sr.pkl ---------------------------------------------------------
L_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out", "proj_out",
          "proj_in", "ff.net.2", "ff.net.0.proj"]  # pisasr.py:47


def release_groups(unet: torch.nn.Module) -> dict[str, list[str]]:
    """The release's module lists (pisasr.py:45-64): substring matches over weight names, bias and norm skipped."""
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in L_GREP:
            if pattern in name:
                group = "encoder" if ("down_blocks" in name or "conv_in" in name) else (
                    "decoder" if ("up_blocks" in name or "conv_out" in name) else "others")
                groups[group].append(name.replace(".weight", ""))
                break
    return groups


def release_pkl(generator: torch.nn.Module, groups: dict[str, list[str]]) -> dict:
    """What the release's save_model writes (pisasr.py:296-305) for this generator's LoRA."""
    group_of = {module: group for group, names in groups.items() for module in names}
    state = {}
    for key, value in generator.unet.state_dict().items():
        for ours, tag in (("pixel", "pix"), ("semantic", "sem")):
            marker = f".lora_A.{ours}." if f".lora_A.{ours}." in key else f".lora_B.{ours}."
            if marker in key:
                module = key.split(marker)[0]
                state[key.replace(f".{ours}.", f".default_{group_of[module]}_{tag}.")] = value.clone()
    sd = {f"unet_lora_{g}_modules_{tag}": list(names) for tag in ("pix", "sem") for g, names in groups.items()}
    return sd | {"lora_rank_unet_pix": 4, "lora_rank_unet_sem": 4, "state_dict_unet": state}


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A tiny generator (seed 42, as the base dir), its pisa_sr.pkl and the base as a diffusers directory."""
    cfg = compose_config([*TINY, "method=pisasr_semantic"])
    torch.manual_seed(cfg.seed)
    plain = build_components(cfg.model)
    groups = release_groups(plain.denoiser)
    tmp = tmp_path_factory.mktemp("pisa")
    base = save_pretrained(plain, tmp / "base")
    torch.manual_seed(cfg.seed)
    components = build_components(cfg.model)
    generator, targets = build_pisa_generator(components, cfg.method.lora, cfg.method.timestep)
    assert sorted(n for names in groups.values() for n in names) == sorted(targets["unet.pixel"])  # the release's placement
    perturb_lora(generator, seed=3)
    sd = release_pkl(generator, groups)
    assert "conv_in.lora_A.default_encoder_pix.weight" in sd["state_dict_unet"]
    torch.save(sd, tmp / "pisa_sr.pkl")
    return SimpleNamespace(path=tmp / "pisa_sr.pkl", base=base, components=components, generator=generator, tmp=tmp)


@pytest.mark.parametrize("lambda_pix, lambda_sem", [(1.0, 1.0), (1.0, 0.5)])
def test_release_checkpoint_round_trips(release_checkpoint, lambda_pix, lambda_sem):
    rc = release_checkpoint
    opts = {"process_size": 32, "color_fix": "none", "merge_lora": False, "device": "cpu",
            "lambda_pix": lambda_pix, "lambda_sem": lambda_sem}
    pipe = SRPipeline.from_checkpoint(rc.path, base=rc.base, options=opts)
    assert pipe.upsampler == "pillow" and pipe.scale == 4 and isinstance(pipe.prompts, NullPrompt)  # test_pisasr.py's
    assert pipe.generator.timestep == 1 and pipe.generator.latent == "sample"
    loaded = dict(pipe.generator.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in rc.generator.named_parameters() if ".lora_" in n)
    pipe.upsampler = "torch"  # the same input as the reference pipeline's, to compare the networks
    reference = SRPipeline(copy.deepcopy(rc.generator), copy.deepcopy(rc.components.text), NullPrompt(), 4, opts)
    lq = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    # float noise only: the base read back from disk runs a few matmuls along other paths (6e-8 at the time embedding)
    torch.testing.assert_close(pipe(lq), reference(lq), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_release_checkpoint_runs_through_infer(release_checkpoint):
    rc = release_checkpoint
    Image.fromarray((torch.rand(8, 8, 3).numpy() * 255).astype("uint8")).save(rc.tmp / "lq.png")
    out = rc.tmp / "out"
    done = subprocess.run([sys.executable, "-m", "osediff_lab.infer", f"input={rc.tmp / 'lq.png'}", f"output={out}",
                           f"ckpt={rc.path}", f"base={rc.base}", "pipeline.device=cpu", "pipeline.lambda_sem=0.5",
                           "pipeline.process_size=32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out / "lq.png").size == (32, 32)
