"""Prompt providers: turn a batch of images into one text prompt per image."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from osediff_lab.errors import ConfigError
from osediff_lab.prompts.provider import FixedPrompt, NullPrompt, PromptProvider

__all__ = ["FixedPrompt", "NullPrompt", "PromptProvider", "build_prompt_provider", "with_cache"]


def build_prompt_provider(cfg: DictConfig | None) -> PromptProvider:
    """The provider named by ``cfg.name``; no prompt config at all means the null prompt."""
    name = "null" if cfg is None else cfg.name
    if name == "null":
        return NullPrompt()
    if name == "fixed":
        return FixedPrompt(str(cfg.text))
    if name in ("dape", "ram"):  # ram = the same tagger without DAPE's LoRA
        from osediff_lab.prompts.dape import build_dape

        provider = build_dape(cfg)
    elif name == "llava":
        from osediff_lab.prompts.llava import build_llava

        provider = build_llava(cfg)
    else:
        raise ConfigError(f"prompt.name '{name}' is not available; choose prompt=null|fixed|dape|ram|llava (or dape_tiny|ram_tiny|llava_tiny)")
    return with_cache(provider, cfg)


# Prompt options that never change the text of a prompt, so they are left out of the cache key.
NON_TEXT_SETTINGS = ("source", "on_miss", "cache", "batch_size")


def with_cache(provider: PromptProvider, cfg: DictConfig) -> PromptProvider:
    """``provider`` behind the on-disk cache when ``prompt.cache.enabled``; misses follow ``prompt.on_miss``."""
    if not cfg.cache.enabled:
        return provider
    from osediff_lab.prompts.cache import CachedPrompt, PromptCache

    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NON_TEXT_SETTINGS}
    return CachedPrompt(
        provider,
        PromptCache(cfg.cache.path),
        settings,
        on_miss=str(cfg.on_miss),
        fill_command=f"python -m osediff_lab.prompts.precompute data=<your data> prompt={cfg.name}",
        batch_size=int(cfg.batch_size),
    )
