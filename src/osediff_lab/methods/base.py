"""The interface between a one-step SR method and the training loop (``lit/module.py``).

Per batch the loop encodes the prompts, calls ``generator_losses``, steps the ``generator`` parameter group
on ``terms["total"]``, then steps the group named by each ``(group, loss)`` that ``updates`` yields, in order.
Backward, gradient sync, clipping, loss scaling and non-finite skips are the loop's; a method holds only its
networks and its math. Adding a method is one file here and one config in ``conf/method``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from osediff_lab.dtypes import DTYPES
from osediff_lab.models.backbone import TextEmbeds, as_embeds
from osediff_lab.models.lora import adapters_disabled
from osediff_lab.models.osediff import cast_frozen
from osediff_lab.models.vsd import classifier_free_guidance

GENERATOR = "generator"
REGULARIZER = "regularizer"  # the second parameter group the loop knows (optim.reg_lr, optim.sync_regularizer_grads)


class Method(nn.Module):
    """A one-step SR method as the training loop drives it.

    ``generator`` is what inference runs: ``(x_L in [-1, 1], prompt embeddings) -> (x_H in [-1, 1], z_H)``.
    Validation, the sample grids and ``infer`` run it through the inference pipeline, which needs a latent
    generator (an ``OSEDiffGenerator``: ``encode``, ``denoise``, ``decode``); a method with another kind of
    generator trains with ``val=none callbacks.samples.num_images=0``.
    ``lora_targets`` maps each generator adapter (``unet.<adapter>``) to the modules it wraps: the LoRA sidecar.
    ``encode_text`` turns prompt strings into text embeddings on the current device (cached).
    """

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        """Problems with this method's config (``method.*``) found before anything is built, each naming its key."""
        return []

    def __init__(
        self,
        generator: nn.Module,
        lora_targets: dict[str, list[str]],
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.lora_targets = lora_targets
        self.encode_text = encode_text
        self.lpips = lpips  # the perceptual loss network, frozen (None when the method does not weigh LPIPS)
        self.metrics: dict[str, torch.Tensor] = {}  # diagnostics of the last step, logged as train/<key>
        self._fixed_prompts: dict[tuple[str, torch.device], TextEmbeds] = {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors per optimiser, the generator's first (``optim.lr``; ``regularizer``: ``optim.reg_lr``)."""
        return {GENERATOR: [p for p in self.generator.parameters() if p.requires_grad]}

    def generator_losses(self, batch: dict[str, Any], embeds: TextEmbeds) -> tuple[dict[str, torch.Tensor], Any]:
        """Weighted loss terms with their sum as ``total`` (``batch``: ``hq``, ``lq_up`` in [-1, 1]), and what
        ``updates`` needs from this forward pass."""
        raise NotImplementedError

    def updates(self, state: Any, embeds: TextEmbeds) -> Iterator[tuple[str, torch.Tensor]]:
        """The updates after the generator's, as (parameter group, loss); each is stepped before the next is drawn."""
        return iter(())

    def apply_memory_options(self, frozen_dtype: str, gradient_checkpointing: bool, *frozen: nn.Module) -> None:
        """``generator.frozen_dtype`` (frozen weights of the generator and of ``frozen`` stored in that dtype) and
        ``generator.gradient_checkpointing`` (the generator's UNet and VAE recompute activations in backward)."""
        if gradient_checkpointing:
            self.generator.unet.enable_gradient_checkpointing()
            self.generator.vae.enable_gradient_checkpointing()
        if DTYPES[frozen_dtype] != torch.float32:
            for module in (self.generator, *frozen):
                cast_frozen(module, DTYPES[frozen_dtype])

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
        (the negative prompt's). One batched call; the real score of VSD and both CSD targets."""
        neg = self.fixed_prompt_embedding(negative_prompt).expand(z_t.shape[0])
        with adapters_disabled(unet):
            pred = self.generator.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), TextEmbeds.cat([neg, as_embeds(embeds)]), unet)
        pred_uncond, pred_cond = pred.to(z_t.dtype).chunk(2)
        return classifier_free_guidance(pred_uncond, pred_cond, cfg_scale), pred_uncond

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
