"""The interface between a one-step SR method and the training loop (``lit/module.py``).

Per batch the loop encodes the prompts, calls ``generator_losses``, steps the ``generator`` parameter group
on ``terms["total"]``, then, for every further group of ``param_groups()`` in order and as often as its
``updates`` setting says, steps it on ``group_loss(name, state, embeds)``. Backward, gradient accumulation and
sync, clipping, loss scaling and non-finite skips are the loop's (``osediff_lab.step``); a method holds its
networks, its math and its groups' optimiser settings (``method.optim.<group>``). Adding a method is one file
and one config in ``conf/method``; a method defined elsewhere plugs in by its ``_target_``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from osediff_lab.backbones import backbone_of
from osediff_lab.build import HYDRA_KEYS, LABELS
from osediff_lab.models.backbone import TextEmbeds, as_embeds
from osediff_lab.models.frozen import FP8_E4M3, FROZEN_DTYPES, store_fp8
from osediff_lab.models.lora import adapters_disabled, enable_checkpointing
from osediff_lab.models.osediff import build_generator, cast_frozen
from osediff_lab.models.vsd import classifier_free_guidance
from osediff_lab.step import GENERATOR, GroupSettings, ParamGroup, settings_problems

log = logging.getLogger(__name__)
__all__ = ["GENERATOR", "Method", "ParamGroup", "weighted_total"]


class Method(nn.Module):
    """A one-step SR method as the training loop drives it.

    ``generator`` is what inference runs: ``(x_L in [-1, 1], prompt embeddings) -> (x_H in [-1, 1], z_H)``.
    Validation, the sample grids and ``infer`` run it through the inference pipeline, which needs a latent
    generator (an ``OneStepGenerator``: ``encode``, ``denoise``, ``decode``); a method with another kind of
    generator trains with ``val=none callbacks.samples.num_images=0``.
    ``lora_targets`` maps each generator adapter (``unet.<adapter>``) to the modules it wraps: the LoRA sidecar.
    ``encode_text`` turns prompt strings into text embeddings on the current device (cached).
    """

    groups: tuple[str, ...] = (GENERATOR,)  # the parameter groups it trains, the generator's first
    export_stem = "osediff_lora"  # the file name of its LoRA export (lora/<stem>.safetensors)

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        """Problems with this method's config (``method.*``) found before anything is built, each naming its key:
        here, every group of ``groups`` needs its optimiser settings in ``method.optim.<group>`` (settings of groups it
        lacks are left unused: an experiment tuned for one method's groups composes with another)."""
        optim = args.get("optim") or {}
        problems = [f"method.optim.{name} is missing: {cls.__name__} trains the parameter group '{name}' "
                    "(give its lr, betas, weight_decay, eps)" for name in cls.groups if name not in optim]
        for name in cls.groups:
            if name in optim:
                problems += settings_problems(name, optim[name], f"method.optim.{name}")
        taken = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in taken.values()):  # a term or option this method lacks: named, not dropped
            problems += [f"method.{k} is not an argument of {cls.__name__}: it has no such loss term or option (it takes "
                         f"{sorted(taken)})" for k in args if k not in taken and k not in (*HYDRA_KEYS, *LABELS)]
        return problems

    def __init__(
        self,
        generator: nn.Module,
        lora_targets: dict[str, list[str]],
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None = None,
        optim: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.optim_settings = {name: GroupSettings.from_config(values) for name, values in (optim or {}).items()
                               if name in self.groups}
        unused = sorted(set(optim or {}) - set(self.groups))
        if unused:
            log.info("method.optim.%s: %s has no such parameter group; left unused", ", ".join(unused), type(self).__name__)
        self.generator = generator
        self.lora_targets = lora_targets
        self.encode_text = encode_text
        self.lpips = lpips  # the perceptual loss network, frozen (None when the method does not weigh LPIPS)
        self.metrics: dict[str, torch.Tensor] = {}  # diagnostics of the last step, logged as train/<key>
        self.weights: dict[str, float] = {}  # each generator loss term's weight (weighted_total)
        # the last generator forward's outputs the loop's telemetry reads: z_h (the latent the terms reach)
        self.outputs: dict[str, torch.Tensor] = {}
        self._fixed_prompts: dict[tuple[str, torch.device], TextEmbeds] = {}

    def group(self, name: str, params: list[nn.Parameter]) -> ParamGroup:
        """``params`` with the optimiser settings of ``method.optim.<name>``."""
        if name not in self.optim_settings:
            raise KeyError(f"method.optim.{name} is missing: no optimiser settings for the parameter group '{name}'")
        return ParamGroup(params, self.optim_settings[name])

    def param_groups(self) -> dict[str, ParamGroup]:
        """Trained tensors per named parameter group with its optimiser settings, the generator's first."""
        return {GENERATOR: self.group(GENERATOR, [p for p in self.generator.parameters() if p.requires_grad])}

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], Any]:
        """Weighted loss terms with their sum as ``total`` (``batch``: ``hq``, ``lq_up`` in [-1, 1]), and what
        ``updates`` needs from this forward pass."""
        raise NotImplementedError

    def group_loss(self, name: str, state: Any, embeds: TextEmbeds) -> torch.Tensor:
        """The loss of a group other than the generator's, for one of its updates (``state``: what
        ``generator_losses`` returned); called after the previous update was stepped."""
        raise NotImplementedError(f"{type(self).__name__} trains the group '{name}' but defines no group_loss")

    def health_metrics(self) -> dict[str, torch.Tensor]:
        """The method's own telemetry, measured at log steps only (OSEDiff: its regularizer's fit); none by default."""
        return {}

    def apply_memory_options(self, frozen_dtype: str, gradient_checkpointing: bool, *frozen: nn.Module) -> None:
        """``generator.frozen_dtype`` (frozen weights of the generator and of ``frozen`` stored in that dtype; fp8_e4m3:
        the frozen Linear / Conv2d weights of the generator's denoiser and of ``frozen``, denoisers, in 8 bits) and
        ``generator.gradient_checkpointing`` (the generator's UNet and VAE recompute activations in backward; the UNet
        with the adapters active at forward time, whatever a later call switched)."""
        if gradient_checkpointing:
            enable_checkpointing(self.generator.unet)
            self.generator.vae.enable_gradient_checkpointing()
        if frozen_dtype == FP8_E4M3:  # the denoisers' frozen Linear / Conv2d weights in 8 bits, the rest in bf16
            store_fp8(self.generator.unet, *frozen)
        if FROZEN_DTYPES[frozen_dtype] != torch.float32:
            for module in (self.generator, *frozen):
                cast_frozen(module, FROZEN_DTYPES[frozen_dtype])

    def frozen_eval(self) -> None:
        """Put frozen feature extractors (LPIPS has dropout) back in eval mode after ``train()``."""
        if self.lpips is not None:
            self.lpips.eval()

    def lpips_loss(self, x_h: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS between x_H and HQ, both in [-1, 1], in the network's own precision (``loss.lpips.dtype``)."""
        dtype = next(self.lpips.parameters()).dtype
        return self.lpips(x_h.to(dtype), hq.to(dtype)).float().mean()

    def fixed_prompt_embedding(self, prompt: str) -> TextEmbeds:
        """A fixed prompt's embedding (a negative prompt), encoded once per device and kept outside the string
        cache, which image-dependent prompts churn."""
        key = (prompt, next(self.generator.parameters()).device)
        if key not in self._fixed_prompts:
            self._fixed_prompts[key] = as_embeds(self.encode_text([prompt]))
        return self._fixed_prompts[key]

    def guided_prediction(self, unet: nn.Module, z_t: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds,
                          negative_prompt: str, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretrained denoiser's outputs (``unet`` with its adapters off) on the scaled latent ``z_t`` at integer
        timesteps ``t``: classifier-free guided at ``cfg_scale`` against ``negative_prompt``, and unconditional
        (the negative prompt's). One batched call; the real score of VSD and both CSD targets. On a guidance-distilled
        base the guided output is ``real_prediction``'s and the negative prompt's is a call of its own."""
        neg = self.fixed_prompt_embedding(negative_prompt).expand(z_t.shape[0])
        if backbone_of(unet).guidance_distilled(unet):
            with adapters_disabled(unet):
                pred_uncond = self.generator.predict(z_t, t, neg, unet).to(z_t.dtype)
            return self.real_prediction(unet, z_t, t, embeds, negative_prompt, cfg_scale), pred_uncond
        with adapters_disabled(unet):
            pred = self.generator.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), TextEmbeds.cat([neg, as_embeds(embeds)]), unet)
        pred_uncond, pred_cond = pred.to(z_t.dtype).chunk(2)
        return classifier_free_guidance(pred_uncond, pred_cond, cfg_scale), pred_uncond

    def real_prediction(self, unet: nn.Module, z_t: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds,
                        negative_prompt: str, cfg_scale: float) -> torch.Tensor:
        """VSD's real score, ``guided_prediction``'s guided output; on a guidance-distilled base
        (``Backbone.guidance_distilled``, FLUX.1-dev) one call of the prompt at guidance = ``cfg_scale``, the value its
        guidance embedding was distilled to imitate CFG at, with no negative prompt."""
        if not backbone_of(unet).guidance_distilled(unet):
            return self.guided_prediction(unet, z_t, t, embeds, negative_prompt, cfg_scale)[0]
        with adapters_disabled(unet):
            return self.generator.predict(z_t, t, as_embeds(embeds).with_guidance(cfg_scale), unet).to(z_t.dtype)

    @classmethod
    def inference_generator(cls, components: Any, sidecar: Mapping[str, Any]) -> tuple[nn.Module, dict[str, list[str]]]:
        """The inference generator over ``components`` (its adapters placed, untrained) and its LoRA targets, rebuilt
        from an export's sidecar (``models/lora_files.py``): by default OSEDiff's generator as the sidecar
        describes it (timestep, LoRA ranks and targets, trained VAE parts)."""
        gen_cfg = OmegaConf.create({key: sidecar[key] for key in ("timestep", "train_vae_encoder", "train_vae_decoder", "lora")}
                                   | {"latent": "mode"})
        return build_generator(components, gen_cfg, share_unet=True)

    @classmethod
    def inference_prompt(cls, sidecar: Mapping[str, Any]) -> dict[str, Any]:
        """The prompt config inference uses unless told: the one the export was trained with."""
        return sidecar.get("prompt", {"name": "none"})

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator tensors inference loads, keyed relative to the generator: by default the trained ones."""
        return {n: p for n, p in self.generator.named_parameters() if p.requires_grad}

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trained tensors beside the generator's to write at the end of a run: {file stem: tensors}."""
        return {}



def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``terms`` plus ``total`` = sum of weight x term (every term needs a weight)."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"loss terms without a weight: {missing}")
    return terms | {"total": sum(weights[k] * v for k, v in terms.items())}
