"""Assemble OSEDiff from components: the LoRA generator and the regularizer UNet, per config.

The regularizer shares the frozen pretrained UNet: the real score runs it with adapters disabled,
the fake score with its own LoRA ('reg') enabled. With ``generator.share_base`` the generator's UNet is a copy of
the module tree that holds the same frozen layers (``models.lora.shared_base_copy``) with its own adapters and its
own input layer (trained in full): one set of base weights in memory for the generator, the fake and the real score,
bit for bit what separate copies compute (no adapter is switched between them). Without it, a deep copy: two UNets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import input_layer, lora_groups
from osediff_lab.models.components import Components
from osediff_lab.models.generator import OneStepGenerator, compile_generator
from osediff_lab.models.lora import add_lora, lora_layers, select_targets, shared_base_copy

UNET_ADAPTERS = {"encoder": "default_encoder", "decoder": "default_decoder", "others": "default_others"}


@dataclass
class OSEDiffParts:
    components: Components
    generator: OneStepGenerator
    reg_unet: nn.Module
    targets: dict[str, list[str]]


def _lora_unet(unet: nn.Module, lora: DictConfig) -> dict[str, list[str]]:
    """Three denoiser adapters over the configured suffixes (grouped per family: ``backbone.lora_groups``); the
    input layer (the UNet's conv_in, SD3's patch embedding) additionally fully trainable."""
    groups = lora_groups(unet, select_targets(unet, lora.unet_targets))
    for group, names in groups.items():
        if names:
            add_lora(unet, names, lora.unet_rank, lora.unet_alpha, UNET_ADAPTERS[group], lora.init)
    first = unet.get_submodule(input_layer(unet))  # trained in full, whether or not it also carries LoRA
    (first.get_base_layer() if isinstance(first, BaseTunerLayer) else first).requires_grad_(True)
    return {f"unet.{UNET_ADAPTERS[g]}": names for g, names in groups.items()}


def _lora_vae(gen: OneStepGenerator, lora: DictConfig, train_encoder: bool, train_decoder: bool) -> dict[str, list[str]]:
    targets = {}
    vae = gen.vae
    if train_encoder:
        names = select_targets(vae, lora.vae_targets, prefix="encoder.") + (["quant_conv"] if vae.quant_conv is not None else [])
        add_lora(vae, names, lora.vae_rank, lora.vae_alpha, "default_encoder", lora.init)
        targets["vae.default_encoder"] = names
    if train_decoder:
        names = select_targets(vae, lora.vae_targets, prefix="decoder.") + (["post_quant_conv"] if vae.post_quant_conv is not None else [])
        add_lora(vae, names, lora.vae_rank, lora.vae_alpha, "default_decoder", lora.init)
        targets["vae.default_decoder"] = names
    return targets


def build_generator(
    components: Components, gen_cfg: DictConfig, share_unet: bool = False
) -> tuple[OneStepGenerator, dict[str, list[str]]]:
    """The LoRA generator and its adapter targets; ``share_unet`` wraps components.denoiser itself (inference, a
    method with one denoiser) instead of a copy (training beside the regularizer, whose pretrained UNet must stay
    clean): with ``generator.share_base`` one holding the same frozen layers, else a deep copy."""
    denoiser = components.denoiser
    if share_unet:
        gen_unet = denoiser
    elif gen_cfg.get("share_base", False):  # an export's sidecar (inference) has no such key and shares the UNet
        gen_unet = shared_base_copy(denoiser, own=[input_layer(denoiser)])
    else:
        gen_unet = copy.deepcopy(denoiser)
    schedule = components.backbone.schedule(components.scheduler)
    generator = OneStepGenerator(components.vae, gen_unet, schedule, gen_cfg.timestep, gen_cfg.latent)
    lora = gen_cfg.lora
    targets = _lora_unet(gen_unet, lora)
    targets |= _lora_vae(generator, lora, gen_cfg.train_vae_encoder, gen_cfg.train_vae_decoder)
    return generator, targets


def build_osediff(components: Components, gen_cfg: DictConfig) -> OSEDiffParts:
    """Generator (its own UNet copy + LoRA, VAE encoder LoRA) and the regularizer UNet's LoRA, laid out per
    ``generator.lora.reg_layout``:

    - ``single`` (the paper): one adapter 'reg' over every UNet target, all of it trained;
    - ``release_only_others_trains`` (the public release): the generator's three adapters, of which only
      the last one added, ``default_others`` (modules outside the down and up blocks), is active, because
      the release never calls ``set_adapter`` on this UNet; the other two keep lora_B = 0 for the whole run.
    """
    generator, targets = build_generator(components, gen_cfg)
    if gen_cfg.get("compile", False):  # training only: inference has pipeline.fast.compile
        compile_generator(generator, gen_cfg.get("compile_backend", "inductor"), gen_cfg.get("compile_mode", "default"))
    lora = gen_cfg.lora
    reg_unet = components.denoiser
    shared = trained_in_base(generator.unet, reg_unet)  # before the regularizer's adapters freeze all but theirs
    if shared:
        raise ConfigError(f"generator.share_base=true: the generator trains {len(shared)} tensors the pretrained "
                          f"denoiser holds ({', '.join(shared[:3])}), so the real and fake scores would move with it; "
                          "set generator.share_base=false")
    reg_names = select_targets(reg_unet, lora.unet_targets)
    layout = lora.get("reg_layout", "single")
    if layout == "single":
        add_lora(reg_unet, reg_names, lora.reg_rank, lora.reg_alpha, "reg", lora.init)
        targets["reg_unet.reg"] = reg_names
    elif layout == "release_only_others_trains":
        groups = lora_groups(reg_unet, reg_names)
        for group, names in groups.items():
            if names:
                add_lora(reg_unet, names, lora.reg_rank, lora.reg_alpha, UNET_ADAPTERS[group], lora.init)
                targets[f"reg_unet.{UNET_ADAPTERS[group]}"] = names
        for layer in lora_layers(reg_unet):  # what PEFT leaves active when nobody calls set_adapter
            layer.set_adapter([UNET_ADAPTERS["others"]])
    else:
        raise ConfigError(f"generator.lora.reg_layout='{layout}' must be 'single' or 'release_only_others_trains'")
    return OSEDiffParts(components, generator, reg_unet, targets)


def trained_in_base(gen_unet: nn.Module, base: nn.Module) -> list[str]:
    """Names of the generator denoiser's trained tensors that ``base`` (the regularizer's) holds as well."""
    held = {id(p) for p in base.parameters()}
    return [n for n, p in gen_unet.named_parameters() if p.requires_grad and id(p) in held]


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen floating-point parameter in ``dtype``; trainable tensors stay fp32."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
