"""PiSA-SR's generator (Sun et al., CVPR 2025, arXiv 2412.03017; release github csslc/PiSA-SR@9c76e12): one UNet
call predicts the residual between the LQ and HQ latents, through two LoRA sets on the SD UNet, a pixel-level
and a semantic-level one.

Inference weighs the two sets as the release does (``pisasr.py:507-518``, tile by tile at ``:569-574``), with the
outputs of two UNet calls: eps = lambda_pix * eps_pix + lambda_sem * (eps_full - eps_pix), where eps_pix runs
W0 + dW_pix and eps_full W0 + dW_pix + dW_sem; z_H = z_L - eps (``:487``). At (1, 1) that is one call with both
sets, as trained and as the release's ``--default`` path runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn

from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.components import Components
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.models.lora import add_lora, lora_layers, merge_and_unload, select_targets

log = logging.getLogger(__name__)

PIXEL, SEMANTIC = "pixel", "semantic"
UnetCall = tuple[tuple[str, ...], float]  # (adapters active in the call, the coefficient of its output)


def lambda_calls(lambda_pix: float, lambda_sem: float) -> list[UnetCall]:
    """The release's mixing as UNet calls: eps = (l_pix - l_sem) eps_pix + l_sem eps_full, which is
    l_pix eps_pix + l_sem (eps_full - eps_pix) regrouped; one call when l_sem = 0 (eps = l_pix eps_pix) or
    l_pix = l_sem (eps = l_sem eps_full)."""
    if lambda_sem == 0:
        return [((PIXEL,), float(lambda_pix))]
    if lambda_pix == lambda_sem:
        return [((PIXEL, SEMANTIC), float(lambda_sem))]
    return [((PIXEL,), float(lambda_pix - lambda_sem)), ((PIXEL, SEMANTIC), float(lambda_sem))]


@contextmanager
def only_adapters(model: nn.Module, adapters: tuple[str, ...]) -> Iterator[None]:
    """Run ``model`` with exactly ``adapters`` active on each of its LoRA layers; restores the active adapters and
    every LoRA tensor's requires_grad (PEFT's ``set_adapter`` changes both). No-op once merged and unloaded."""
    layers = [layer for layer in lora_layers(model) if set(layer.active_adapters) != set(adapters)]
    saved = [(layer, list(layer.active_adapters)) for layer in layers]
    grads = {id(p): p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.set_adapter([a for a in adapters if a in layer.lora_A])
    try:
        yield
    finally:
        for layer, active in saved:
            layer.set_adapter(active)
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(grads[id(p)])


class PiSAGenerator(OneStepGenerator):
    """x_L in [-1, 1] -> (x_H in [-1, 1], z_H) with z_H = z_L - UNet(z_L, t, c): the UNet output is the residual.

    The VAE is frozen and has no adapters; the UNet carries the ``pixel`` and ``semantic`` adapters, both active in
    training (the semantic set's lora_B is 0 until stage 2 trains it, so stage 1 runs the pixel set alone, as the
    release's ``set_adapter`` does at ``train_pisasr.py:80``).
    """

    inference_latent = "sample"  # the release encodes with latent_dist.sample() at inference too (pisasr.py:481)
    two_sets = True

    def denoise(self, z_l: torch.Tensor, prompt_embeds: TextEmbeds) -> torch.Tensor:
        """z_H = z_L - UNet(z_L, timestep, c) on scaled latents, the active adapters as they are."""
        residual, _ = self.unet_at_timestep(z_l, prompt_embeds)
        return z_l - residual

    def encode(self, x_l: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_L of x_L in [-1, 1]: the posterior's mode, or (``latent='sample'``) mean + std * ``noise``, the standard
        normal draw (drawn from ``generator`` when not given; diffusers' ``DiagonalGaussianDistribution.sample``)."""
        if noise is None:
            return super().encode(x_l, generator)
        if self.latent != "sample":
            raise ValueError("posterior noise given, but generator.latent='mode' draws none")
        dist = self.vae.encode(x_l).latent_dist
        return self.scale_latent(dist.mean + dist.std * noise.to(dist.mean.dtype))

    def mixed_residual(self, z_l: torch.Tensor, prompt_embeds: TextEmbeds, calls: list[UnetCall]) -> torch.Tensor:
        """sum over ``calls`` of coefficient x UNet(z_L) with that call's adapters active."""
        total = None
        for adapters, coefficient in calls:
            with only_adapters(self.unet, adapters):
                eps, _ = self.unet_at_timestep(z_l, prompt_embeds)
            term = coefficient * eps
            total = term if total is None else total + term
        return total

    def inference_denoiser(self, lambda_pix: float, lambda_sem: float) -> Callable[[torch.Tensor, TextEmbeds], torch.Tensor]:
        """z_L -> z_H = z_L - eps with the release's two-call mixing at ``lambda_pix`` / ``lambda_sem``."""
        calls = lambda_calls(lambda_pix, lambda_sem)

        def denoise(z_l: torch.Tensor, prompt_embeds: TextEmbeds) -> torch.Tensor:
            return z_l - self.mixed_residual(z_l, prompt_embeds, calls)

        return denoise

    def merge_adapters(self, lambda_pix: float, lambda_sem: float) -> bool:
        """Fold the adapters of the one UNet call these weights need into the UNet (the others are dropped);
        weights needing two calls (eps_pix and eps_full) keep the adapters unmerged. True when merged."""
        calls = lambda_calls(lambda_pix, lambda_sem)
        if len(calls) > 1:
            log.info("lambda_pix=%s / lambda_sem=%s need two UNet calls per step: LoRA stays unmerged", lambda_pix, lambda_sem)
            return False
        adapters = calls[0][0]
        for layer in lora_layers(self.unet):
            layer.set_adapter([a for a in adapters if a in layer.lora_A])
        merge_and_unload(self)
        return True


def add_pisa_adapters(unet: nn.Module, names: dict[str, list[str]], ranks: dict[str, int], alpha: float, init: str) -> None:
    """The ``pixel`` and ``semantic`` adapters on the named UNet modules, each at its rank, PEFT scale alpha / rank."""
    for adapter in (PIXEL, SEMANTIC):
        add_lora(unet, names[adapter], ranks[adapter], alpha, adapter, init)


def build_pisa_generator(
    components: Components, lora: DictConfig, timestep: int, latent: str = "sample"
) -> tuple[PiSAGenerator, dict[str, list[str]]]:
    """The generator over components' UNet with both adapters on ``lora.unet_targets`` (rank ``lora.rank``,
    alpha ``lora.alpha``), all frozen (the method chooses what trains); ``latent``: how z_L is taken from the
    VAE posterior. The pretrained UNet is that UNet with its adapters disabled (the score distillation's)."""
    unet = components.denoiser
    generator = PiSAGenerator(components.vae, unet, components.backbone.schedule(components.scheduler), timestep, latent)
    names = select_targets(unet, lora.unet_targets)
    add_pisa_adapters(unet, {PIXEL: names, SEMANTIC: names}, {PIXEL: lora.rank, SEMANTIC: lora.rank}, lora.alpha, lora.init)
    generator.requires_grad_(False)
    return generator, {f"unet.{PIXEL}": names, f"unet.{SEMANTIC}": names}
