"""Building the toy models leaves nothing behind in the temporary directory (120 folders a day piled up)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from helpers import compose_config
from osediff_lab.models.components import build_components
from osediff_lab.prompts.llava import build_llava


def leftovers(prefix: str) -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(prefix + "*"))


def test_tiny_tokenizer_and_toy_llava_remove_their_temporary_folders(tmp_path):
    before_tok, before_llava = leftovers("osediff_tokenizer_"), leftovers("osediff_llava_")
    cfg = compose_config(["model=tiny", "prompt=llava_tiny"], tmp_path)
    components = build_components(cfg.model)
    assert components.tokenizer("a photo").input_ids  # loaded, usable after its folder is gone
    provider = build_llava(cfg.prompt)
    assert provider is not None
    assert leftovers("osediff_tokenizer_") == before_tok
    assert leftovers("osediff_llava_") == before_llava
