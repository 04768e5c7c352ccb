"""LPIPS for the generator loss, loaded from the local weights cache (never downloaded at run time)."""

from __future__ import annotations

import logging
from pathlib import Path

import lpips
import torch
from omegaconf import DictConfig

from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import MissingWeightsError

log = logging.getLogger(__name__)

# loss.lpips.dtype: LPIPS weights and inputs in reduced precision (fp16/bf16) halve its memory and time.
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def torch_hub_dir(weights_dir: str | Path) -> Path:
    """Where torchvision backbones live inside our cache (torch.hub layout: <dir>/checkpoints/<file>)."""
    return Path(weights_dir).expanduser() / "torch_hub"


def check_lpips_weights(net: str, weights_dir: str | Path) -> Path:
    """The torch hub dir holding LPIPS's backbone; raises naming the missing file and the fix."""
    hub = torch_hub_dir(weights_dir)
    backbone = hub / "checkpoints" / BACKBONE_FILES[net]
    if not backbone.is_file():
        raise MissingWeightsError(
            f"LPIPS({net}) backbone {backbone} is missing. Run `python -m osediff_lab.weights fetch lpips_{net}` "
            "on a connected machine (cache: paths.weights_dir / OSEDIFF_WEIGHTS), or set loss.lpips.pretrained=false "
            "for a random LPIPS (tests, demo)."
        )
    return hub


def build_lpips(cfg: DictConfig, weights_dir: str | Path) -> lpips.LPIPS:
    """LPIPS(net) with pretrained backbone + linear layers, or a random network when ``cfg.pretrained`` is false.

    Inputs to the returned module are images in [-1, 1].
    """
    net = cfg.net
    if net not in BACKBONE_FILES:
        raise ValueError(f"loss.lpips.net must be one of {sorted(BACKBONE_FILES)}, got '{net}'")
    if not cfg.pretrained:
        log.warning(
            "LPIPS(%s) is RANDOMLY INITIALISED (loss.lpips.pretrained=false): fine for tests and the demo, "
            "meaningless as a perceptual loss. Set loss.lpips.pretrained=true for real training.",
            net,
        )
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    else:
        hub = check_lpips_weights(net, weights_dir)
        torch.hub.set_dir(str(hub))
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    model.requires_grad_(False)
    return model.to(DTYPES[cfg.get("dtype", "fp32")]).eval()
