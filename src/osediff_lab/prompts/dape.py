"""The DAPE prompt provider: RAM/DAPE tags of each image as ``"<tags>, <user prompt>,"``."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError
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


def build_tagger(cfg: DictConfig) -> RAMTagger:
    """A ``RAMTagger`` per ``prompt.weights``: ``pretrained`` loads RAM (+ DAPE) from local files; ``random`` seeds."""
    if cfg.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            return RAMTagger(RAMArch.from_config(cfg.arch))
    if cfg.weights != "pretrained":
        raise ConfigError(f"prompt.weights must be 'pretrained' or 'random', got '{cfg.weights}'")
    require_file(cfg.ram_path, "RAM")
    if cfg.dape_path:
        require_file(cfg.dape_path, "DAPE")
    arch = RAMArch.from_config(cfg.arch, lora_rank=None if cfg.dape_path else 0)
    model = RAMTagger(arch)
    report = load_ram_dape(model, cfg.ram_path, cfg.dape_path, tuple(cfg.ignore_prefixes))
    log.info("RAM tagger: %d tensors loaded, %d checkpoint entries ignored (%s)", len(report.loaded), len(report.ignored),
             ", ".join(cfg.ignore_prefixes))
    return model


def build_dape(cfg: DictConfig) -> DapePrompt:
    """The DAPE provider for ``cfg`` (the ``prompt`` config group); ``dape_path: null`` is plain RAM (prompt=ram)."""
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"prompt.dtype must be one of {sorted(DTYPES)}, got '{cfg.dtype}'")
    names, thresholds = tag_vocabulary(int(cfg.arch.num_tags))
    if cfg.threshold is not None:
        thresholds = torch.full_like(thresholds, float(cfg.threshold))
    return DapePrompt(
        build_tagger(cfg), names, thresholds, str(cfg.user_prompt), set(cfg.exclude_tags), DTYPES[cfg.dtype],
        int(cfg.batch_size), str(cfg.get("template", INFERENCE_TEMPLATE)),
    )
