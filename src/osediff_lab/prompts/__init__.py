"""Prompt providers: turn a batch of images into one text prompt per image."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from osediff_lab.build import build
from osediff_lab.errors import ConfigError
from osediff_lab.prompts.provider import FixedPrompt, NullPrompt, PromptProvider

__all__ = ["FixedPrompt", "NullPrompt", "PromptProvider", "build_prompt_provider", "provider_from_config", "with_cache"]

# Prompt settings the training loop (source) and the cache (on_miss, cache) read; no provider takes them.
CALLER_SETTINGS = ("source", "on_miss", "cache")
# Prompt options that never change the text of a prompt, so they are left out of the cache key.
NON_TEXT_SETTINGS = ("_target_", "source", "on_miss", "cache", "batch_size")
# What each shipped option builds, for prompt configs saved without a _target_ (LoRA sidecars of earlier runs).
TARGETS = {
    "none": "osediff_lab.prompts.provider.NullPrompt",
    "null": "osediff_lab.prompts.provider.NullPrompt",  # its name until prompt=null became prompt=none
    "fixed": "osediff_lab.prompts.provider.FixedPrompt",
    "dape": "osediff_lab.prompts.dape.build_dape",
    "ram": "osediff_lab.prompts.dape.build_dape",
    "llava": "osediff_lab.prompts.llava.build_llava",
}


def provider_from_config(cfg: DictConfig) -> PromptProvider:
    """The provider ``cfg._target_`` builds (``prompt=none|fixed|dape|ram|llava`` or any importable one), uncached;
    a config saved without ``_target_`` builds the shipped option its ``name`` labels."""
    if "_target_" not in cfg:
        if cfg.get("name") not in TARGETS:
            raise ConfigError(f"prompt.name '{cfg.get('name')}' is not available; choose prompt=none|fixed|dape|ram|llava "
                              "(or dape_tiny|ram_tiny|llava_tiny)")
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg._target_ = TARGETS[cfg.name]
    return build(cfg, "prompt", skip=CALLER_SETTINGS)


def build_prompt_provider(cfg: DictConfig | None) -> PromptProvider:
    """The configured provider behind the cache when ``prompt.cache.enabled``; no prompt config at all means the null prompt."""
    if cfg is None:
        return NullPrompt()
    return with_cache(provider_from_config(cfg), cfg)


def with_cache(provider: PromptProvider, cfg: DictConfig) -> PromptProvider:
    """``provider`` behind the on-disk cache when ``prompt.cache.enabled``; misses follow ``prompt.on_miss``."""
    if not cfg.get("cache", {}).get("enabled", False):
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
