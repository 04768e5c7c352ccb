"""Discriminator heads: HYPIR's multi-level heads (spectral norm, blur-pool) and DMD2-style convolutional heads.

HYPIR's ``MultiLevelDConv`` (github XPixelGroup/HYPIR@b61d107 HYPIR/model/D.py:9-52, vision-aided-gan's
``MultiLevelDViT`` with ``down=2``, cv_discriminator.py:11-45) reads a list of feature maps and a pooled vector; each
map goes BlurPool -> spectral-normalised 3x3 conv, stride 2 -> LeakyReLU(0.2) -> BlurPool -> spectral-normalised 1x1
conv, stride 2, to a logit map; the pooled vector goes spectral-normalised linear -> LeakyReLU(0.2) ->
spectral-normalised linear to one logit.

Spectral norm here divides each weight by its exact largest singular value, recomputed at every call, where torch's
``spectral_norm`` (the release's) estimates it by one power iteration per training call from a persistent vector.
Both normalise to the same value once the iteration has converged; the exact one holds no state, so a resumed run
continues bit for bit (training checkpoints hold trained parameters only, not buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # vision-aided's BlurPool(filt_size=4) (blurpool.py:31-32)
LEAKY_SLOPE = 0.2  # HYPIR model/D.py:18 (nn.LeakyReLU(0.2))


class SpectralNormalized(nn.Module):
    """A parametrization: the weight divided by its largest singular value (the weight seen as out x rest)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = torch.linalg.matrix_norm(weight.flatten(1).float(), ord=2)
        return weight / sigma.to(weight.dtype)


def spectral_norm(module: nn.Module) -> nn.Module:
    """``module`` whose ``weight`` is spectrally normalised at every call (``SpectralNormalized``)."""
    parametrize.register_parametrization(module, "weight", SpectralNormalized())
    return module


def blur_kernel(taps: tuple[float, ...] = BLUR_TAPS) -> torch.Tensor:
    """The normalised separable binomial filter outer(taps, taps) / sum, shaped (1, 1, k, k)."""
    a = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(a, a)
    return (k / k.sum())[None, None]


class BlurPool(nn.Module):
    """vision-aided's BlurPool(channels, pad_type='zero', filt_size=4, stride=1, pad_off) (blurpool.py:14-53): zero
    padding of 1 + ``pad_off`` on every side, then the 4x4 binomial filter on each channel."""

    def __init__(self, pad_off: int = 0) -> None:
        super().__init__()
        self.pad = int((len(BLUR_TAPS) - 1) / 2) + pad_off
        self.register_buffer("kernel", blur_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(F.pad(x, [self.pad] * 4), self.kernel.to(x.dtype).expand(c, 1, -1, -1), groups=c)


def map_head(channels: int, width: int) -> nn.Sequential:
    """HYPIR's head on one feature map (D.py:25-33 with down=2): one logit map at about a quarter of its size."""
    return nn.Sequential(
        BlurPool(pad_off=1),
        spectral_norm(nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=0)),
        nn.LeakyReLU(LEAKY_SLOPE),
        BlurPool(),
        spectral_norm(nn.Conv2d(width, 1, kernel_size=1, stride=2)),
    )


class MultiLevelHeads(nn.Module):
    """HYPIR's multi-level heads: one logit map per feature map (B, H', W'), one logit per sample (B, 1) from the
    pooled vector."""

    def __init__(self, map_channels: list[int], pooled_dim: int, width: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(map_head(c, width) for c in map_channels)
        self.pooled = nn.Sequential(spectral_norm(nn.Linear(pooled_dim, width)), nn.LeakyReLU(LEAKY_SLOPE))
        self.out = spectral_norm(nn.Linear(width, 1))

    def forward(self, maps: list[torch.Tensor], pooled: torch.Tensor) -> list[torch.Tensor]:
        return [head(m).squeeze(1) for head, m in zip(self.maps, maps, strict=True)] + [self.out(self.pooled(pooled))]


def conv_head(channels: int, width: int, depth: int, groups: int) -> nn.Sequential:
    """A DMD2-style classifier branch on one feature map (its cls_pred_branch, sd_guidance.py:125-133, at any size):
    ``depth`` x [3x3 conv, stride 2 -> GroupNorm -> SiLU], then a 1x1 conv to one logit map."""
    layers: list[nn.Module] = []
    c = channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
        c = width
    return nn.Sequential(*layers, nn.Conv2d(c, 1, kernel_size=1))
