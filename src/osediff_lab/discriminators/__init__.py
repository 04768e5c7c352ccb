"""Discriminators for adversarial one-step SR methods (HYPIR, OSEDiff + GAN), built from the ``discriminator`` config
group: a frozen image-feature one (HYPIR's multi-level heads on a ConvNeXt, ``image``), a diffusion-feature one (heads
on the base denoiser's features, ``unet``), their heads (``layers``) and the GAN losses (``losses``)."""

from osediff_lab.discriminators.base import (
    DISCRIMINATOR,
    IMAGE,
    LATENT,
    Discriminator,
    real_sample,
    sample_for,
)

__all__ = ["DISCRIMINATOR", "IMAGE", "LATENT", "Discriminator", "real_sample", "sample_for"]
