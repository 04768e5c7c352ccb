"""The glue between a method and its discriminator: what a generator step leaves for the discriminator's updates,
the discriminator's loss on it, and the config checks a method runs on its ``discriminator`` before building it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from osediff_lab.build import arguments, component_problems, raise_problems, taken, target
from osediff_lab.discriminators.base import DISCRIMINATOR, Discriminator, real_sample
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.components import Components
from osediff_lab.models.generator import OneStepGenerator


@dataclass
class AdversarialState:
    """What a generator step leaves for the discriminator's updates: HQ (in [-1, 1]), the prompts, and the fake in
    the discriminator's domain (detached; None until the method has made it). ``real`` and ``fake`` are made once
    and reused by every update of the step."""

    hq: torch.Tensor
    embeds: TextEmbeds
    fake: torch.Tensor | None = None
    real: torch.Tensor | None = None


def discriminator_step_loss(
    discriminator: Discriminator, generator: OneStepGenerator, state: AdversarialState
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss and diagnostics on the step's real sample (made at the first update) and fake."""
    if state.real is None:
        state.real = real_sample(discriminator, generator, state.hq)
    return discriminator.discriminator_loss(state.real, state.fake, state.embeds)


def build_discriminator(cfg: DictConfig, components: Components, denoisers: Mapping[str, nn.Module]) -> Discriminator:
    """The ``discriminator`` group's component, given the base model's ``components`` and the method's ``denoisers``
    where its constructor takes them, after its checks. Called directly: Hydra's instantiate would turn the
    Components dataclass into a config."""
    offer = {"components": components, "denoisers": dict(denoisers)}
    raise_problems(component_problems(cfg, DISCRIMINATOR, offer=offer), f"{DISCRIMINATOR} cannot be built")
    cls = target(cfg, DISCRIMINATOR)
    return cls(**arguments(cfg), **taken(cls, offer))


def discriminator_problems(args: Any, denoisers: tuple[str, ...]) -> list[str]:
    """The ``discriminator`` component's problems (its target, arguments and own checks) as a method builds it,
    offering ``components`` and the named ``denoisers``."""
    cfg = args["discriminator"]
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return component_problems(cfg, DISCRIMINATOR, offer={"components": None, "denoisers": dict.fromkeys(denoisers)})


def weight_problems(args: Any, keys: tuple[str, ...]) -> list[str]:
    """The method's loss weights ``keys`` must be >= 0 and not all 0."""
    problems = [f"method.{k}={args[k]} is negative; loss weights must be >= 0" for k in keys if float(args[k]) < 0]
    if all(float(args[k]) == 0 for k in keys):
        problems.append(f"method.{', method.'.join(keys)} are all 0: nothing to train")
    return problems
