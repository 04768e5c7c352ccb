"""An export (our LoRA safetensors + sidecar, or a training checkpoint) rebuilt on its base model, unmerged, as
inference loads it: the starting point of every other format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from osediff_lab.errors import ConfigError
from osediff_lab.models.components import Components
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.pipeline.checkpoints import Checkpoint, build_loaded_generator, load_base, read_checkpoint
from osediff_lab.pipeline.options import make_options


@dataclass
class LoadedExport:
    """The checkpoint as read, its base model and the generator over it (adapters placed and loaded, unmerged);
    ``options``: the pipeline options whose output the other formats reproduce."""

    ckpt: Checkpoint
    components: Components
    generator: OneStepGenerator
    options: DictConfig

    @property
    def denoiser_folder(self) -> str:
        """The denoiser's subfolder in its family's diffusers folder (unet, transformer)."""
        return str(self.components.backbone.denoiser_folder)


def load_export(path: str | Path, base: str | Path | None = None, options: DictConfig | dict | None = None) -> LoadedExport:
    """Our export or a training checkpoint at ``path`` on its base (``base``: a diffusers folder; default the one it
    names), its LoRA left unmerged; ``options``: pipeline options (conf/infer.yaml ``pipeline``)."""
    ckpt = read_checkpoint(path)
    if ckpt.kind != "osediff-lab":
        raise ConfigError(f"{path} is an official release ({ckpt.kind}); export reads osediff-lab exports and training "
                          "checkpoints (load the release with infer, or train from it)")
    opts = make_options(options)
    components = load_base(ckpt, base)
    generator = build_loaded_generator(components, ckpt, opts)
    return LoadedExport(ckpt, components, generator.eval(), opts)
