"""The DAPE prompt provider: RAM/DAPE tags of each image as ``"<tags>, <user prompt>,"``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from osediff_lab.build import checked_by
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.prompts.ram import RAMArch, RAMTagger, select_tags, tag_vocabulary
from osediff_lab.prompts.ram_checkpoint import load_ram_dape, require_file

log = logging.getLogger(__name__)



INFERENCE_TEMPLATE = "{tags}, {user_prompt},"


def format_tag_prompt(tags: list[str], user_prompt: str, template: str = INFERENCE_TEMPLATE) -> str:
    """The prompt from ``template``, whose ``{tags}`` is the tags joined with ", ". OSEDiff's inference
    template adds the user prompt and a trailing comma; the release's training prompts are ``{tags}`` alone."""
    return template.format(tags=", ".join(tags), user_prompt=user_prompt)


class DapePrompt:
    """Tags images in [0, 1] with a ``RAMTagger`` (moved lazily to the images' device) and formats the prompt."""

    def __init__(
        self,
        tagger: RAMTagger,
        names: list[str],
        thresholds: torch.Tensor,
        user_prompt: str = "",
        exclude: set[int] | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        template: str = INFERENCE_TEMPLATE,
    ) -> None:
        self.tagger = tagger.eval().requires_grad_(False)
        self.names = names
        self.thresholds = thresholds
        self.user_prompt = user_prompt
        self.exclude = exclude or set()
        self.dtype = dtype
        self.batch_size = batch_size
        self.template = template

    @torch.no_grad()
    def tags(self, images01: torch.Tensor) -> list[list[str]]:
        """Tag names per image (images in [0, 1], [B, 3, H, W], any size)."""
        weight = self.tagger.image_proj.weight
        if weight.device != images01.device or weight.dtype != self.dtype:
            self.tagger.to(images01.device, self.dtype)
        out: list[list[str]] = []
        for chunk in images01.split(self.batch_size):
            out += select_tags(self.tagger(chunk), self.thresholds, self.names, self.exclude)
        return out

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]:
        return [format_tag_prompt(t, self.user_prompt, self.template) for t in self.tags(lq)]


WEIGHTS = ("pretrained", "random")


def dape_problems(args: Mapping[str, Any]) -> list[str]:
    """``prompt.dtype`` and ``prompt.weights`` known, and with pretrained weights RAM's (and DAPE's) file on disk."""
    problems = []
    if args["dtype"] not in DTYPES:
        problems.append(f"prompt.dtype must be one of {sorted(DTYPES)}, got '{args['dtype']}'")
    if args["weights"] not in WEIGHTS:
        problems.append(f"prompt.weights must be 'pretrained' or 'random', got '{args['weights']}'")
    elif args["weights"] == "pretrained":
        try:
            require_file(args["ram_path"], "RAM")
            if args.get("dape_path"):
                require_file(args["dape_path"], "DAPE")
        except MissingWeightsError as exc:
            problems.append(str(exc))
    return problems


def build_tagger(
    weights: str, seed: int, arch: Mapping[str, Any], ram_path: str, dape_path: str | None, ignore_prefixes: Sequence[str]
) -> RAMTagger:
    """A ``RAMTagger`` per ``prompt.weights``: ``pretrained`` loads RAM (+ DAPE) from local files; ``random`` seeds."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return RAMTagger(RAMArch.from_config(arch))
    if weights != "pretrained":
        raise ConfigError(f"prompt.weights must be 'pretrained' or 'random', got '{weights}'")
    require_file(ram_path, "RAM")
    if dape_path:
        require_file(dape_path, "DAPE")
    model = RAMTagger(RAMArch.from_config(arch, lora_rank=None if dape_path else 0))
    report = load_ram_dape(model, ram_path, dape_path, tuple(ignore_prefixes))
    log.info("RAM tagger: %d tensors loaded, %d checkpoint entries ignored (%s)", len(report.loaded), len(report.ignored),
             ", ".join(ignore_prefixes))
    return model


@checked_by(dape_problems)
def build_dape(
    weights: str,
    arch: Mapping[str, Any],
    ram_path: str,
    dape_path: str | None,
    ignore_prefixes: Sequence[str],
    threshold: float | None,
    exclude_tags: Sequence[int],
    dtype: str,
    batch_size: int,
    seed: int,
    user_prompt: str = "",
    template: str = INFERENCE_TEMPLATE,
) -> DapePrompt:
    """The DAPE provider from the ``prompt`` group's keys; ``dape_path: null`` is plain RAM (prompt=ram)."""
    names, thresholds = tag_vocabulary(int(arch["num_tags"]))
    if threshold is not None:
        thresholds = torch.full_like(thresholds, float(threshold))
    tagger = build_tagger(weights, seed, arch, ram_path, dape_path, ignore_prefixes)
    return DapePrompt(tagger, names, thresholds, str(user_prompt), set(exclude_tags), DTYPES[dtype], int(batch_size), str(template))
