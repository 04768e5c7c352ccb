"""Inference: sizes, tiling, colour fix, checkpoint formats, and the pipeline that ties them together."""

from osediff_lab.data.images import tensor_to_pil
from osediff_lab.pipeline.checkpoints import Checkpoint, build_loaded_generator, load_base, read_checkpoint
from osediff_lab.pipeline.colorfix import adain_color_fix, color_fix, wavelet_color_fix
from osediff_lab.pipeline.core import SRPipeline
from osediff_lab.pipeline.options import default_options, make_options
from osediff_lab.pipeline.sizes import SizePlan, plan_sizes

__all__ = [
    "Checkpoint",
    "SRPipeline",
    "SizePlan",
    "adain_color_fix",
    "build_loaded_generator",
    "color_fix",
    "default_options",
    "load_base",
    "make_options",
    "plan_sizes",
    "read_checkpoint",
    "tensor_to_pil",
    "wavelet_color_fix",
]
