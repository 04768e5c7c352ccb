"""LoRA placement, trainable sets, the one-step generator, and SD2.1-size counts (on the meta device)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from peft.tuners.lora import LoraLayer
from torch import nn

from helpers import TINY, compose_config
from osediff_lab.models.components import build_components
from osediff_lab.models.lora import adapters_disabled
from osediff_lab.models.osediff import UNET_ADAPTERS, build_osediff, trainable_parameters


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = compose_config(TINY)
    return build_osediff(build_components(cfg.model), cfg.generator), cfg


def test_tiny_tokenizer_is_a_real_clip_tokenizer(parts):
    tok = parts[0].components.tokenizer
    ids = tok("the cat").input_ids
    assert type(tok).__name__ == "CLIPTokenizer"
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 4
    assert tok.decode(ids, skip_special_tokens=True).strip() == "the cat"


def test_unet_adapters_split_by_block(parts):
    p, _ = parts
    unet = p.generator.unet
    seen = {a: [] for a in UNET_ADAPTERS.values()}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.lora_A.keys()
            seen[adapter].append(name)
    assert all(n.startswith("down_blocks") or n == "conv_in" for n in seen["default_encoder"])
    assert all(n.startswith("up_blocks") or n == "conv_out" for n in seen["default_decoder"])
    assert all(not n.startswith(("down_blocks", "up_blocks")) for n in seen["default_others"])
    assert "conv_in" in seen["default_encoder"] and "conv_out" in seen["default_decoder"]
    assert any("mid_block" in n for n in seen["default_others"])


def test_every_lora_layer_runs_its_own_adapter(parts):
    """PEFT activates only the newest adapter model-wide; each of the three UNet adapters must stay on."""
    p, _ = parts
    for model in (p.generator.unet, p.generator.vae, p.reg_unet):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert layers
        for name, layer in layers:
            assert set(layer.active_adapters) == set(layer.lora_A.keys()), name
            assert not layer.disable_adapters, name


def test_norms_and_biases_never_adapted(parts):
    p, _ = parts
    for model in (p.generator.unet, p.generator.vae, p.reg_unet):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                assert isinstance(module.get_base_layer(), nn.Linear | nn.Conv2d), name
                assert "norm" not in name, name
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("bias"):
                assert name.startswith("conv_in.base_layer"), name


def test_trainable_set_is_exactly_lora_plus_conv_in(parts):
    p, _ = parts
    gen = [n for n, _ in trainable_parameters(p.generator)]
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("unet.conv_in.base_layer") for n in gen)
    assert {"unet.conv_in.base_layer.weight", "unet.conv_in.base_layer.bias"} <= set(gen)
    vae = [n for n in gen if n.startswith("vae.")]
    assert vae and all(n.startswith(("vae.encoder.", "vae.quant_conv.")) for n in vae)
    assert any(n.startswith("vae.quant_conv.") for n in vae)
    reg = [n for n, _ in trainable_parameters(p.reg_unet)]
    assert reg and all(".lora_A.reg." in n or ".lora_B.reg." in n for n in reg)
    assert not any(prm.requires_grad for prm in p.components.text_encoder.parameters())


def test_lora_starts_as_identity_with_gaussian_A(parts):
    p, _ = parts
    for name, prm in p.generator.unet.named_parameters():
        if ".lora_B." in name:
            assert torch.count_nonzero(prm) == 0
        if ".lora_A." in name:
            assert prm.std() > 0


def test_generator_x0_matches_ddpm_step(parts):
    p, cfg = parts
    gen = p.generator
    gen.latent = "mode"
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    emb = torch.randn(1, 77, cfg.model.arch.text_encoder.hidden_size)
    with torch.no_grad():
        z_l = gen.encode(x)
        eps = gen.unet(z_l, torch.tensor([999]), encoder_hidden_states=emb).sample
        sched = DDPMScheduler.from_config(p.components.scheduler.config)
        sched.set_timesteps(timesteps=[999])
        ref = sched.step(eps, 999, z_l).prev_sample
        assert torch.allclose(gen.denoise(z_l, emb), ref, atol=1e-5)
        x_h, z_h = gen(x, emb)
    assert x_h.shape == x.shape and z_h.shape == (1, 4, 8, 8)
    assert x_h.min() >= -1 and x_h.max() <= 1


def test_latent_mode_is_deterministic_and_sample_is_not(parts):
    p, _ = parts
    gen = p.generator
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        gen.latent = "mode"
        assert torch.equal(gen.encode(x), gen.encode(x))
        gen.latent = "sample"
        a = gen.encode(x, torch.Generator().manual_seed(1))
        b = gen.encode(x, torch.Generator().manual_seed(1))
        c = gen.encode(x, torch.Generator().manual_seed(2))
    gen.latent = "mode"
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_adapters_disabled_gives_pretrained_unet(parts):
    p, cfg = parts
    unet = p.reg_unet
    with torch.no_grad():
        for name, prm in unet.named_parameters():
            if ".lora_B." in name:
                prm.normal_()
    z = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 77, cfg.model.arch.text_encoder.hidden_size)
    t = torch.tensor([500])
    with torch.no_grad():
        with_lora = unet(z, t, encoder_hidden_states=emb).sample
        with adapters_disabled(unet):
            base = unet(z, t, encoder_hidden_states=emb).sample
            base_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
            assert all(m.disable_adapters for m in base_layers)
        again = unet(z, t, encoder_hidden_states=emb).sample
        for name, prm in unet.named_parameters():
            if ".lora_B." in name:
                prm.zero_()
        plain = unet(z, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(with_lora, base)
    assert torch.allclose(again, with_lora)
    assert torch.allclose(base, plain, atol=1e-6)
    assert all(prm.requires_grad for n, prm in unet.named_parameters() if ".lora_" in n)


@pytest.mark.slow
def test_sd21_shape_sizes_and_checkpoint_megabytes():
    """Full SD2.1-base sizes, built on the meta device (no memory): counts and the checkpoint's tensor bytes."""
    cfg = compose_config(["model=sd21_shape"])
    with torch.device("meta"):
        comps = build_components(cfg.model)
        p = build_osediff(comps, cfg.generator)
    unet = sum(x.numel() for n, x in comps.denoiser.named_parameters() if ".lora_" not in n)
    vae = sum(x.numel() for n, x in p.generator.vae.named_parameters() if ".lora_" not in n)
    text = sum(x.numel() for x in comps.text_encoder.parameters())
    assert 860e6 < unet < 870e6 and 83e6 < vae < 85e6 and 335e6 < text < 345e6
    trained = [x for _, x in trainable_parameters(p.generator)] + [x for _, x in trainable_parameters(p.reg_unet)]
    n_trained = sum(x.numel() for x in trained)
    assert 8.0e6 < n_trained < 9.0e6  # the paper's "about 8.5M trainable parameters"
    # a checkpoint stores these in fp32 plus AdamW's two moments: megabytes, not gigabytes
    ckpt_bytes = 3 * 4 * n_trained
    assert ckpt_bytes < 120e6
