"""SRPipeline: LQ images in, SR images out, with the paper's size rule, tiling and colour fix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from osediff_lab.data.images import pil_to_tensor, tensor_to_pil, to_rgb
from osediff_lab.dtypes import resolve_device, resolve_dtype
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import TextEmbeds, latent_multiple, vae_factor
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.models.text import PromptEmbedder, TextEncoders
from osediff_lab.pipeline.checkpoints import (
    OFFICIAL_KINDS,
    build_loaded_generator,
    default_prompt,
    load_base,
    read_checkpoint,
)
from osediff_lab.pipeline.colorfix import color_fix
from osediff_lab.pipeline.fast import apply_fast_paths
from osediff_lab.pipeline.options import make_options
from osediff_lab.pipeline.sizes import plan_sizes, to_network_input, to_output, unpad
from osediff_lab.pipeline.tiling import set_vae_tiling, tiled_apply
from osediff_lab.prompts import PromptProvider, build_prompt_provider

log = logging.getLogger(__name__)
EMBED_CACHE_SIZE = 1024  # distinct prompts kept (image-dependent prompts such as DAPE's rarely repeat)
VAE_TILING_ATTRS = ("use_tiling", "tile_latent_min_size", "tile_sample_min_size", "tile_overlap_factor")


class SRPipeline:
    """One-step super-resolution with a loaded generator.

    ``merge_lora`` folds the adapters into the generator's weights in place (those of the one UNet call the
    generator's ``lambda_pix`` / ``lambda_sem`` need; PiSA-SR weights needing two calls stay unmerged), and the
    generator and text encoder are moved to the pipeline's device and precision. ``live=True`` leaves a model
    that is still being trained as it is (device, dtypes, adapters unmerged): validation during training.
    """

    def __init__(
        self,
        generator: OneStepGenerator,
        text_encoders: TextEncoders,
        prompts: PromptProvider,
        scale: int,
        options: DictConfig | dict | None = None,
        live: bool = False,
    ) -> None:
        self.options = make_options(options)
        self.scale = int(self.options.scale or scale)
        # auto: torch's bicubic; from_checkpoint picks Pillow's for the official releases (as they were run)
        self.upsampler = "torch" if self.options.upsampler == "auto" else str(self.options.upsampler)
        self.generator, self.text_encoders = generator, text_encoders
        # z_L -> z_H at the LoRA weights (PiSA-SR's two-call mixing; any other generator accepts only (1, 1))
        self.denoiser = generator.inference_denoiser(self.options.lambda_pix, self.options.lambda_sem)
        patch = latent_multiple(generator.unet)  # SD3's transformer takes whole 2 x 2 latent patches
        lt = self.options.latent_tiling
        if lt.tile % patch or lt.overlap % patch:
            raise ConfigError(f"pipeline.latent_tiling.tile={lt.tile} / overlap={lt.overlap} must be multiples of "
                              f"{patch}, the denoiser's patch size")
        self.pixel_multiple = vae_factor(generator.vae) * patch  # input sides are padded to this
        if live:
            self.device = generator.vae.decoder.conv_in.weight.device
            self.dtype = self.decode_dtype = generator.vae.decoder.conv_in.weight.dtype
            # frozen weights stored in bf16/fp16 beside fp32 LoRA (memory options): run as training does, autocast
            self.autocast = self.dtype != torch.float32
        else:
            self._prepare()
            self.autocast = False
        self.prompts = prompts
        self.embedder = PromptEmbedder(text_encoders, EMBED_CACHE_SIZE)

    def _prepare(self) -> None:
        """Merge LoRA (when asked), then move to the device and precision; fp16 decoder upcast."""
        o, generator = self.options, self.generator
        self.device = resolve_device(o.device)
        self.dtype = resolve_dtype(o.precision, self.device)
        if o.merge_lora and not generator.merge_adapters(o.lambda_pix, o.lambda_sem) and o.fast.fuse_qkv:
            raise ConfigError(f"pipeline.fast.fuse_qkv=true needs merged LoRA, but pipeline.lambda_pix={o.lambda_pix} / "
                              f"pipeline.lambda_sem={o.lambda_sem} need two UNet calls (eps_pix, eps_full), which "
                              "keep the adapters unmerged; set pipeline.fast.fuse_qkv=false")
        generator.to(self.device, self.dtype)
        self.decode_dtype = self.dtype
        if self.dtype == torch.float16 and o.upcast_vae_decoder:
            generator.vae.decoder.float()
            if generator.vae.post_quant_conv is not None:  # SD3's VAE has none
                generator.vae.post_quant_conv.float()
            self.decode_dtype = torch.float32
        apply_fast_paths(generator, o.fast)
        self.text_encoders.to(self.device, self.dtype)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        base: str | Path | None = None,
        options: DictConfig | dict | None = None,
        prompt: DictConfig | dict | None = None,
        **overrides: Any,
    ) -> SRPipeline:
        """Load any supported checkpoint (ours .safetensors + .json, a training .ckpt, the official OSEDiff or
        PiSA-SR release .pkl) onto its base model (``base``: a diffusers dir; default: what the checkpoint names).

        ``options``/``overrides`` are pipeline options (conf/infer.yaml ``pipeline``), e.g. ``merge_lora=False``;
        ``prompt`` a prompt config (default: ``checkpoints.default_prompt``: the null prompt for the official files
        and PiSA-SR, as their releases infer; else the checkpoint's training prompt mode).
        """
        opts = make_options(options, **overrides)
        ckpt = read_checkpoint(path)
        components = load_base(ckpt, base)
        generator = build_loaded_generator(components, ckpt, opts)
        if prompt is None:
            prompt = default_prompt(ckpt)
        scale = ckpt.meta["scale"] if ckpt.kind == "osediff-lab" else opts[OFFICIAL_KINDS[ckpt.kind]].scale
        # a DictConfig node stays attached to its root, so interpolations such as ${paths.weights_dir} resolve
        provider = build_prompt_provider(prompt if isinstance(prompt, DictConfig) else OmegaConf.create(prompt))
        pipe = cls(generator, components.text, provider, scale, opts)
        if opts.upsampler == "auto" and ckpt.kind in OFFICIAL_KINDS:
            pipe.upsampler = "pillow"  # the releases upsample the 8-bit LQ with Pillow's bicubic
        return pipe

    # ---- public API ----------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image] | torch.Tensor) -> list[Image.Image] | torch.Tensor:
        """PIL images (any mode, made RGB) -> RGB PIL images scale x larger; or a batch (B, 3, h, w) in
        [0, 1] -> (B, 3, scale*h, scale*w) in [0, 1] (float32, on the pipeline's device)."""
        if isinstance(images, torch.Tensor):
            return self.enhance(images)[0]
        return [self.enhance_image(im)[0] for im in images]

    def enhance_image(self, image: Image.Image) -> tuple[Image.Image, str]:
        """One PIL image -> (its SR image, the prompt used)."""
        sr, prompts = self.enhance(pil_to_tensor(to_rgb(image))[None])
        return tensor_to_pil(sr[0]), prompts[0]

    @torch.inference_mode()
    def enhance(self, lq: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """LQ batch (B, 3, h, w) in [0, 1] -> (SR batch (B, 3, scale*h, scale*w) in [0, 1] float32, prompts)."""
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"expected an LQ batch (B, 3, h, w) in [0, 1], got shape {tuple(lq.shape)}")
        o = self.options
        plan = plan_sizes(lq.shape[-2], lq.shape[-1], self.scale, o.process_size, self.pixel_multiple)
        x_work, x_padded = to_network_input(lq.to(self.device, torch.float32), plan, self.upsampler)
        prompts = self.prompts(x_work)
        x_h = self.generate(x_padded * 2 - 1, self.embed(prompts))
        sr = unpad((x_h.float() + 1) / 2, plan)
        return to_output(color_fix(o.color_fix, sr, x_work, o.wavelet_levels), plan), prompts

    def generate(self, x_l: torch.Tensor, embeds: TextEmbeds) -> torch.Tensor:
        """x_L in [-1, 1] (sides multiples of the VAE factor) -> x_H in [-1, 1]: encode, tiled denoiser step, decode."""
        o, gen = self.options, self.generator
        mixed = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with self._eval(), mixed:
            gen.latent = gen.inference_latent if o.latent == "auto" else o.latent
            rng = torch.Generator(self.device).manual_seed(o.seed) if gen.latent == "sample" else None
            with self._vae_tiling(o.vae_tiling.encoder_tile):
                z_l = gen.encode(x_l.to(self.dtype), rng)
            lt = o.latent_tiling
            z_h = tiled_apply(lambda z: self.denoiser(z, embeds), z_l, lt.tile, lt.overlap, lt.sigma)
            with self._vae_tiling(o.vae_tiling.decoder_tile):
                return gen.decode(z_h.to(self.decode_dtype))

    def embed(self, prompts: list[str]) -> TextEmbeds:
        """Text embeddings per prompt (cached by string), in the pipeline's precision."""
        return self.embedder(prompts).to(self.dtype)

    # ---- state that must not leak into a model shared with training ------------------------------
    @contextmanager
    def _eval(self) -> Iterator[None]:
        gen = self.generator
        was_training, latent = gen.training, gen.latent
        gen.eval()
        try:
            yield
        finally:
            gen.train(was_training)
            gen.latent = latent

    @contextmanager
    def _vae_tiling(self, latent_tile: int) -> Iterator[None]:
        vae = self.generator.vae
        saved = {a: getattr(vae, a) for a in VAE_TILING_ATTRS}
        set_vae_tiling(vae, latent_tile, self.options.vae_tiling.overlap)
        try:
            yield
        finally:
            for attr, value in saved.items():
                setattr(vae, attr, value)
