"""The LLaVA prompt provider: a caption per image from a local LLaVA-1.5 checkpoint (transformers).

About 170x slower than DAPE, so it normally runs behind the prompt cache (``prompt.cache.enabled``),
filled beforehand by ``python -m osediff_lab.prompts.precompute``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from osediff_lab.build import checked_by
from osediff_lab.data.images import tensor_to_pil
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import MissingWeightsError
from osediff_lab.models.components import write_tiny_tokenizer

log = logging.getLogger(__name__)



class LlavaPrompt:
    """Greedy captions of images in [0, 1], ``batch_size`` images per ``generate`` call."""

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: LlavaProcessor,
        instruction: str,
        template: str,
        max_new_tokens: int,
        batch_size: int = 8,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its end
        self.text = template.format(instruction=instruction)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @torch.no_grad()
    def captions(self, images01: torch.Tensor) -> list[str]:
        """One caption per image (images in [0, 1], [B, 3, H, W])."""
        if self.model.device != images01.device:
            self.model.to(images01.device)
        out: list[str] = []
        for chunk in images01.split(self.batch_size):
            inputs = self.processor(
                images=[tensor_to_pil(x) for x in chunk], text=[self.text] * len(chunk), return_tensors="pt", padding=True
            ).to(images01.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            tokens = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.processor.tokenizer.pad_token_id
            )
            texts = self.processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [t.strip() for t in texts]
        if any(not t for t in out):
            log.warning("LLaVA returned %d empty caption(s) out of %d", sum(not t for t in out), len(out))
        return out

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]:
        return self.captions(lq)


def write_tiny_llava(directory: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised toy LLaVA (CLIP vision tower + Llama) with its processor, as a checkpoint dir.

    It loads through exactly the same ``from_pretrained`` path as LLaVA-1.5, so tests exercise the real code.
    """
    directory = Path(directory)
    tokenizer_dir = write_tiny_tokenizer(directory / "tokenizer_src", ["a n", "t h", "th e</w>", "o n</w>"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_size, patch = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def resolve_model_dir(model_dir: str) -> Path:
    """The local checkpoint directory ``prompt.model_dir`` (``prompt.weights=pretrained``), checked."""
    path = Path(os.path.expanduser(str(model_dir)))
    if not (path / "config.json").is_file():
        raise MissingWeightsError(
            f"LLaVA checkpoint not found: {path} has no config.json. Download a transformers-format LLaVA-1.5 "
            "(e.g. llava-hf/llava-1.5-7b-hf) on a connected machine and set prompt.model_dir to it; "
            "use prompt=llava_tiny to run without weights."
        )
    return path


def llava_problems(args: Mapping[str, Any]) -> list[str]:
    """``prompt.dtype`` and ``prompt.weights`` known, and with pretrained weights the checkpoint on disk."""
    problems = []
    if args["dtype"] not in DTYPES:
        problems.append(f"prompt.dtype must be one of {sorted(DTYPES)}, got '{args['dtype']}'")
    if args["weights"] not in ("pretrained", "random"):
        problems.append(f"prompt.weights must be 'pretrained' or 'random', got '{args['weights']}'")
    elif args["weights"] == "pretrained":
        try:
            resolve_model_dir(args["model_dir"])
        except MissingWeightsError as exc:
            problems.append(str(exc))
    return problems


@checked_by(llava_problems)
def build_llava(
    weights: str,
    model_dir: str,
    instruction: str,
    template: str,
    max_new_tokens: int,
    dtype: str,
    batch_size: int,
    seed: int,
) -> LlavaPrompt:
    """The LLaVA provider from the ``prompt`` group's keys; loads offline only (``weights=random``: a toy model)."""
    if weights == "random":  # a toy model, written to a temporary folder and loaded through the same path
        with tempfile.TemporaryDirectory(prefix="osediff_llava_") as tmp:
            return load_llava(write_tiny_llava(tmp, int(seed)), instruction, template, max_new_tokens, dtype, batch_size)
    return load_llava(resolve_model_dir(model_dir), instruction, template, max_new_tokens, dtype, batch_size)


def load_llava(path: Path, instruction: str, template: str, max_new_tokens: int, dtype: str, batch_size: int) -> LlavaPrompt:
    """The provider around the checkpoint in ``path`` (a transformers LLaVA directory), in ``dtype``."""
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True, dtype=DTYPES[dtype])
    return LlavaPrompt(model, processor, str(instruction), str(template), int(max_new_tokens), int(batch_size))
