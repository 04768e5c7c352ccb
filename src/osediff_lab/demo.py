"""`python -m osediff_lab.demo ckpt=<file> [ckpt_b=<file>] [port=7860] [host=127.0.0.1] [infer overrides]`.

A Gradio page: upload an LQ image, get the SR image of each checkpoint (A, and B with ``ckpt_b``) in a
before/after slider (the LQ, bicubic-enlarged to the SR size, against the SR image), with the colour fix, the
tiling and, for PiSA-SR checkpoints (two LoRA sets), ``lambda_pix`` / ``lambda_sem`` as controls. Every other
argument is an override of conf/infer.yaml (``pipeline.*``, ``base``, ``prompt``), which also gives the controls'
defaults. Checkpoints load as ``infer`` loads them; a file the image loader refuses is answered with its reason.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from osediff_lab.data.images import UnreadableImage, load_rgb
from osediff_lab.errors import ConfigError, user_errors
from osediff_lab.pipeline import SRPipeline
from osediff_lab.pipeline.colorfix import COLOR_FIXES
from osediff_lab.resolvers import refuse_renamed_choices

log = logging.getLogger(__name__)
DEMO_KEYS = ("ckpt_b", "port", "host")  # the demo's own arguments; the rest override conf/infer.yaml
TILE_STEP = 8  # latent px; a multiple of every backbone's patch size (SD3's is 2)


@dataclass
class Model:
    """A loaded checkpoint: ``name`` (A or B) on the page, and whether it has PiSA-SR's two LoRA sets."""

    name: str
    path: Path
    pipe: SRPipeline
    two_sets: bool


@dataclass
class Result:
    """One checkpoint's answer: the LQ enlarged to the SR size (the slider's "before"), the SR image, seconds."""

    name: str
    checkpoint: str
    before: Image.Image
    sr: Image.Image
    seconds: float


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments -> (the demo's own: ckpt_b, port, host; the overrides of conf/infer.yaml)."""
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in DEMO_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def infer_config(overrides: list[str]) -> DictConfig:
    """conf/infer.yaml with ``overrides``, composed as ``python -m osediff_lab.infer`` would; ``ckpt`` required."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from osediff_lab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=overrides)
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("the demo needs a checkpoint: python -m osediff_lab.demo ckpt=<file> [ckpt_b=<file>]")
    return cfg


def load_model(name: str, ckpt: str | Path, cfg: DictConfig) -> Model:
    """Load ``ckpt`` as infer does (``cfg``: the infer config), LoRA unmerged so that a PiSA-SR checkpoint's lambdas
    can change per run; a checkpoint with one set is merged afterwards when ``pipeline.merge_lora``."""
    pipe = SRPipeline.from_checkpoint(ckpt, base=cfg.get("base"), options=cfg.pipeline, prompt=cfg.get("prompt"),
                                      merge_lora=False)
    two_sets = pipe.generator.two_sets
    if cfg.pipeline.merge_lora and not two_sets:
        pipe.generator.merge_adapters(1.0, 1.0)
    return Model(name, Path(ckpt), pipe, two_sets)


def run_options(color_fix: str, latent_tile: int, latent_overlap: int, vae_encoder_tile: int, vae_decoder_tile: int,
                lambda_pix: float, lambda_sem: float) -> dict[str, Any]:
    """The page's controls as ``pipeline.*`` overrides."""
    return {
        "color_fix": color_fix,
        "latent_tiling": {"tile": int(latent_tile), "overlap": int(latent_overlap)},
        "vae_tiling": {"encoder_tile": int(vae_encoder_tile), "decoder_tile": int(vae_decoder_tile)},
        "lambda_pix": float(lambda_pix),
        "lambda_sem": float(lambda_sem),
    }


def pipeline_for(model: Model, options: dict[str, Any]) -> SRPipeline:
    """A pipeline over ``model``'s loaded generator with ``options`` on top of its own; the lambdas only for a
    checkpoint with two LoRA sets (another keeps 1 and 1). Cheap: nothing is loaded or copied."""
    base = model.pipe
    lambdas = {} if model.two_sets else {"lambda_pix": 1.0, "lambda_sem": 1.0}
    fixed = {"upsampler": base.upsampler, "merge_lora": False}  # as loaded (Pillow's for the releases), merged or not
    merged = OmegaConf.merge(base.options, options, lambdas, fixed)
    return SRPipeline(base.generator, base.text_encoders, base.prompts, base.scale, merged)


def super_resolve(models: list[Model], lq: Image.Image, options: dict[str, Any],
                  progress: Callable[[float, str], None]) -> list[Result]:
    """``lq`` through every model with ``options``; ``progress(fraction done, what runs now)`` before each."""
    results = []
    for i, model in enumerate(models):
        progress(i / len(models), f"super-resolving with {model.name} ({model.path.name})")
        pipe = pipeline_for(model, options)
        start = time.perf_counter()
        sr, _ = pipe.enhance_image(lq)
        seconds = time.perf_counter() - start
        results.append(Result(model.name, model.path.name, lq.resize(sr.size, Image.Resampling.BICUBIC), sr, seconds))
    progress(1.0, "done")
    return results


def describe_upload(path: str | None, scale: int) -> str:
    """The status line for an uploaded file: its size and the SR size, or the image loader's reason."""
    if not path:
        return "Upload an LQ image."
    try:
        lq = load_rgb(path)
    except UnreadableImage as exc:
        return f"**Cannot read {Path(path).name}**: {exc.reason}"
    w, h = lq.size
    return f"{Path(path).name}: {w}x{h} px; SR x{scale}: {w * scale}x{h * scale} px"


def result_caption(result: Result) -> str:
    """One result's line under its slider."""
    w, h = result.sr.size
    return f"**{result.name}** ({result.checkpoint}): {w}x{h} px in {result.seconds:.1f} s"


def build_app(models: list[Model], cfg: DictConfig) -> Any:
    """The page: upload, options (defaults from the infer config ``cfg``), one before/after slider per model."""
    import gradio as gr

    o, scale = cfg.pipeline, models[0].pipe.scale
    any_two_sets = any(m.two_sets for m in models)
    with gr.Blocks(title="osediff-lab demo") as app:
        gr.Markdown("# osediff-lab: one-step diffusion super-resolution\n"
                    + " | ".join(f"**{m.name}**: `{m.path}` (x{m.pipe.scale})" for m in models))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="LQ image", file_types=["image"], type="filepath", elem_id="upload")
                color_fix = gr.Dropdown(sorted(COLOR_FIXES), value=o.color_fix, label="colour fix")
                with gr.Accordion("tiling (latent px)", open=False):
                    latent_tile = gr.Slider(16, 256, value=o.latent_tiling.tile, step=TILE_STEP, label="UNet tile")
                    latent_overlap = gr.Slider(0, 128, value=o.latent_tiling.overlap, step=TILE_STEP, label="UNet tile overlap")
                    encoder_tile = gr.Slider(32, 512, value=o.vae_tiling.encoder_tile, step=TILE_STEP, label="VAE encoder tile")
                    decoder_tile = gr.Slider(32, 512, value=o.vae_tiling.decoder_tile, step=TILE_STEP, label="VAE decoder tile")
                lambda_pix = gr.Slider(0, 2, value=o.lambda_pix, step=0.05, label="lambda_pix (PiSA-SR pixel set)",
                                       visible=any_two_sets, elem_id="lambda_pix")
                lambda_sem = gr.Slider(0, 2, value=o.lambda_sem, step=0.05, label="lambda_sem (PiSA-SR semantic set)",
                                       visible=any_two_sets, elem_id="lambda_sem")
                run = gr.Button("Super-resolve", variant="primary", elem_id="run")
                status = gr.Markdown("Upload an LQ image.", elem_id="status")
            with gr.Column(scale=3), gr.Row():
                sliders, captions = [], []
                for m in models:
                    with gr.Column():
                        sliders.append(gr.ImageSlider(label=f"{m.name}: LQ (bicubic) | SR", type="pil", format="png",
                                                      elem_id=f"result-{m.name}"))
                        captions.append(gr.Markdown(elem_id=f"caption-{m.name}"))

        def on_upload(path: str | None) -> str:
            return describe_upload(path, scale)

        def on_run(path, fix, tile, overlap, enc, dec, l_pix, l_sem, progress=gr.Progress()):  # noqa: B008 (gradio's API)
            empty = [None] * len(models) + [""] * len(models)
            if not path:
                return [*empty, "Upload an LQ image."]
            try:
                lq = load_rgb(path)
                options = run_options(fix, tile, overlap, enc, dec, l_pix, l_sem)
                results = super_resolve(models, lq, options, lambda f, desc: progress(f, desc=desc))
            except UnreadableImage as exc:
                return [*empty, f"**Cannot read {Path(path).name}**: {exc.reason}"]
            except (ValueError, torch.OutOfMemoryError) as exc:  # ConfigError is a ValueError
                return [*empty, f"**Cannot run**: {type(exc).__name__}: {exc}"]
            return [(r.before, r.sr) for r in results] + [result_caption(r) for r in results] + [describe_upload(path, scale)]

        upload.upload(on_upload, upload, status)
        run.click(on_run, [upload, color_fix, latent_tile, latent_overlap, encoder_tile, decoder_tile, lambda_pix, lambda_sem],
                  [*sliders, *captions, status])
    return app


@user_errors
def main(argv: list[str]) -> None:
    """Load the checkpoints, build the page and serve it until interrupted."""
    own, overrides = split_args(argv)
    cfg = infer_config(overrides)
    models = [load_model("A", cfg.ckpt, cfg)]
    if own.get("ckpt_b"):
        models.append(load_model("B", own["ckpt_b"], cfg))
    app = build_app(models, cfg)
    app.queue().launch(server_name=own.get("host", "127.0.0.1"), server_port=int(own.get("port", 7860)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_renamed_choices(sys.argv)
    main(sys.argv[1:])
