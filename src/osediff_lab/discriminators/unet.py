"""A diffusion-feature discriminator: heads on the encoder and mid-block features of the base model's own denoiser
at a noised timestep, as DMD2 (its classifier on the fake score UNet's bottleneck, github tianweiy/DMD2@8d8fa55
main/sd_guidance.py:143-165), ADD and InvSR do. No extra weights: the denoiser is a frozen copy of the base UNet
(``unet: frozen``) or the method's own regularizer UNet with its LoRA (``unet: regularizer``, DMD2's choice: the
fake score network); only the heads are trained.

Works on every backbone: the family names its denoiser's feature points (``Backbone.feature_points``: ``down.<i>``
and ``mid`` of a UNet, ``block.<i>`` and ``mid`` of a transformer, whose image tokens become a map), taken by forward
hooks; the call stops once the last of them is taken, so the rest of the denoiser never runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from math import gcd
from typing import Any

import torch
from torch import nn

from osediff_lab.discriminators.base import LATENT, Discriminator, dtype_problems, frozen_autocast
from osediff_lab.discriminators.layers import conv_head
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import TextEmbeds, as_embeds, denoiser_output, vae_factor
from osediff_lab.models.components import Components
from osediff_lab.models.lora import frozen_base_copy
from osediff_lab.models.vsd import sample_timesteps

UNETS = ("frozen", "regularizer")
LAYER = re.compile(r"^(mid|[a-z_]+\.\d+)$")
NO_REGULARIZER = ("discriminator.unet=regularizer reads the method's regularizer UNet, and this method has none (HYPIR): "
                  "set discriminator.unet=frozen")


class _Taken(Exception):
    """Raised by the last feature hook: the rest of the denoiser need not run."""


def layer_problems(layers: Sequence[str]) -> list[str]:
    """Each layer must be ``mid`` or ``down.<i>``, none twice."""
    bad = [name for name in layers if not LAYER.match(str(name))]
    problems = [f"discriminator.layers: {bad} are not 'mid' or '<kind>.<i>' (down.<i>, block.<i>)"] if bad else []
    if not layers or len(set(layers)) != len(layers):
        problems.append(f"discriminator.layers={list(layers)} must name at least one layer, each once")
    return problems


class UNetFeatureDiscriminator(Discriminator):
    """Heads on the denoiser's ``layers`` features of a latent noised at t ~ U[t_min, t_max) (one draw per sample
    and call), conditioned on the batch's prompts. Takes the denoiser's scaled latents."""

    domain = LATENT

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = super().argument_problems(args) + layer_problems(list(args["layers"]))
        problems += dtype_problems(str(args["dtype"]), "discriminator.dtype")
        if args["unet"] not in UNETS:
            problems.append(f"discriminator.unet='{args['unet']}' must be one of {list(UNETS)}")
        elif args["unet"] == "regularizer" and "regularizer" not in (args.get("denoisers") or {}):
            problems.append(NO_REGULARIZER)
        if not 0 <= int(args["t_min"]) < int(args["t_max"]) <= 1000:
            problems.append(f"discriminator.t_min={args['t_min']} / t_max={args['t_max']}: need 0 <= t_min < t_max <= 1000")
        if int(args["head_depth"]) < 1:
            problems.append(f"discriminator.head_depth={args['head_depth']} must be >= 1")
        return problems

    def __init__(
        self,
        components: Components,
        unet: str,
        layers: Sequence[str],
        t_min: int,
        t_max: int,
        head_depth: int,
        head_width: int | None,
        norm_groups: int,
        dtype: str,
        loss: str,
        real_target: float,
        r1_gamma: float,
        denoisers: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__(loss, real_target, r1_gamma)
        base, self.backbone = components.denoiser, components.backbone
        points = self.backbone.feature_points(base)
        unknown = [name for name in layers if name not in points]
        if unknown:
            raise ConfigError(f"discriminator.layers: {unknown} are not features of this {self.backbone.name} denoiser; "
                              f"it has {list(points)}")
        self.layers = [str(name) for name in layers]
        self.t = (int(t_min), int(t_max))
        # a frozen copy is stored (and run) in ``dtype``; a shared UNet runs as its method runs it
        self.frozen_dtype = DTYPES[dtype] if unet == "frozen" else torch.float32
        self._shared: tuple[nn.Module, ...] = ()  # the method's UNet, not registered here (the method owns it)
        if unet == "frozen":
            self.unet = frozen_base_copy(base, self.frozen_dtype)
        elif denoisers and "regularizer" in denoisers:
            self._shared = (denoisers["regularizer"],)
        else:
            raise ConfigError(NO_REGULARIZER)
        self.schedule = components.backbone.schedule(components.scheduler)
        self.vae_factor = vae_factor(components.vae)
        heads = {}
        for name in self.layers:
            channels = points[name][1]
            width = int(head_width or channels)
            groups = gcd(int(norm_groups), width)
            heads[name.replace(".", "_")] = conv_head(channels, width, int(head_depth), groups)
        self.heads = nn.ModuleDict(heads)

    @property
    def denoiser(self) -> nn.Module:
        """The UNet whose features the heads read."""
        return self._shared[0] if self._shared else self.unet

    def frozen_eval(self) -> None:
        if not self._shared:
            self.unet.eval()

    def features(self, x: torch.Tensor, embeds: TextEmbeds) -> list[torch.Tensor]:
        """The ``layers`` features of z_t = add_noise(x, n, t), x a scaled latent, at fresh t and n."""
        t = sample_timesteps(x.shape[0], *self.t, x.device)
        z_t = self.schedule.add_noise(x.float(), torch.randn_like(x, dtype=torch.float32), t)
        net, taken = self.denoiser, {}
        points = self.backbone.feature_points(net)
        modules = [module for module, _ in points.values()]
        last = max(modules.index(points[name][0]) for name in self.layers)  # "mid" may be one of the blocks

        def take(name: str):
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                taken[name] = self.backbone.feature_map(output, z_t, net)
                if modules.index(module) == last and all(n in taken for n in self.layers if points[n][0] is module):
                    raise _Taken

            return hook

        handles = [points[name][0].register_forward_hook(take(name)) for name in self.layers]
        try:
            with frozen_autocast(x.device.type, self.frozen_dtype):
                denoiser_output(net, z_t.to(self.frozen_dtype), self.schedule.model_timestep(t, z_t), as_embeds(embeds).detach(), self.vae_factor)
        except _Taken:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [taken[name] for name in self.layers]

    def classify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One logit map per feature, heads in fp32."""
        return [self.heads[name.replace(".", "_")](f.float()) for name, f in zip(self.layers, features, strict=True)]
