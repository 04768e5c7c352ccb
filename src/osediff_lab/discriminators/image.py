"""A frozen image-feature discriminator: HYPIR's multi-level heads on a frozen ConvNeXt from timm.

HYPIR (github XPixelGroup/HYPIR@b61d107, HYPIR/model/D.py:55-95, model/backbone.py) runs the OpenCLIP ConvNeXt-XXLarge
image tower (``convnext_xxlarge`` / ``laion2b_s34b_b82k_augreg_soup``, backbone.py:37-41) in bf16, frozen and in
eval mode (D.py:59-60; trainer/base.py:144), on x in [-1, 1] mapped to [0, 1] and normalised by CLIP's mean and std
(D.py:63-64, :79-80). Its heads read the outputs of the first three stages and the pooled, projected image
embedding (backbone.py:14-29 with timm 1.0.15, whose ``forward_intermediates`` lists the stem first, so
``intermediates[1:]`` are the stages): ``MultiLevelDConv(level=4, in_ch1=[384, 768, 1536], in_ch2=1024,
out_ch=512, down=2)`` (D.py:61). timm's ``convnext_xxlarge.clip_laion2b_soup`` is that tower: its head is the
tower's pooling, norm and projection (the projection as ``head.fc`` with a zero bias, timm convnext.py
``checkpoint_filter_fn``), so ``forward_head`` is the image embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.convnext import ConvNeXt

from osediff_lab.discriminators.base import IMAGE, Discriminator, dtype_problems, frozen_autocast
from osediff_lab.discriminators.layers import MultiLevelHeads
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.weights.cache import expected_path, fetch_command, locate, offline
from osediff_lab.weights.manifest import MANIFEST

SOURCES = ("pretrained", "random")
RANDOM_KEYS = ("depths", "dims", "num_classes")


def backbone_problems(backbone: Mapping[str, Any], weights_dir: str | None) -> list[str]:
    """Problems of ``discriminator.backbone``: its source, a random twin's architecture, a pretrained one's weights
    (listed in the manifest and on disk)."""
    source = backbone.get("source")
    if source not in SOURCES:
        return [f"discriminator.backbone.source='{source}' must be one of {list(SOURCES)}"]
    problems = dtype_problems(str(backbone.get("dtype")), "discriminator.backbone.dtype")
    if source == "random":
        missing = [k for k in RANDOM_KEYS if backbone.get(k) is None]
        problems += [f"discriminator.backbone.{k} is missing: a random ConvNeXt needs {list(RANDOM_KEYS)}" for k in missing]
        if not missing and len(backbone["depths"]) != len(backbone["dims"]):
            problems.append(f"discriminator.backbone.depths={list(backbone['depths'])} and .dims={list(backbone['dims'])} "
                            "need one entry per stage")
        return problems
    try:
        weights_file(str(backbone.get("weights")), weights_dir)
    except (ConfigError, MissingWeightsError) as exc:
        problems.append(str(exc))
    return problems


def weights_file(name: str, weights_dir: str | Path | None) -> Path:
    """The local file of manifest entry ``name``; an error naming the missing file and the command that fetches it."""
    if name not in MANIFEST:
        raise ConfigError(f"discriminator.backbone.weights='{name}' is not in the weights manifest "
                          "(osediff_lab/weights/manifest.py); name its entry")
    entry = MANIFEST[name]
    cache = Path(str(weights_dir)).expanduser()
    found = locate(entry, cache)
    if found is None:
        raise MissingWeightsError(
            f"discriminator backbone weights '{name}' ({entry.what}) are missing: expected {expected_path(entry, cache)}. "
            f"Run `{fetch_command([name])}` on a connected machine (cache: paths.weights_dir / OSEDIFF_WEIGHTS), or "
            "choose discriminator=convnext_tiny (random, tests) or discriminator=unet_features (no extra weights)."
        )
    return found


def build_convnext(backbone: Mapping[str, Any], weights_dir: str | Path | None) -> ConvNeXt:
    """A frozen ConvNeXt in eval mode, stored in ``backbone.dtype``: timm's ``architecture`` with the manifest's
    ``weights`` read from the cache (never downloaded), or a random one of ``depths``/``dims``/``num_classes``."""
    if backbone["source"] == "random":
        model = ConvNeXt(depths=tuple(backbone["depths"]), dims=tuple(backbone["dims"]), num_classes=int(backbone["num_classes"]))
    else:
        path = weights_file(str(backbone["weights"]), weights_dir)
        with offline(Path(str(weights_dir)).expanduser()):
            model = timm.create_model(str(backbone["architecture"]), pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return model.to(DTYPES[str(backbone["dtype"])]).requires_grad_(False).eval()


class ConvNeXtDiscriminator(Discriminator):
    """HYPIR's image discriminator: a frozen ConvNeXt, multi-level heads on stage outputs ``feature_stages`` and
    on the pooled embedding. Takes x in [-1, 1]."""

    domain = IMAGE

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = super().argument_problems(args) + backbone_problems(args["backbone"], args.get("weights_dir"))
        stages = list(args["feature_stages"])
        if not stages or sorted(set(stages)) != stages:
            problems.append(f"discriminator.feature_stages={stages} must be increasing stage indices (HYPIR: [0, 1, 2])")
        if len(args["mean"]) != 3 or len(args["std"]) != 3:
            problems.append("discriminator.mean and discriminator.std need one value per RGB channel")
        if int(args["head_width"]) < 1:
            problems.append(f"discriminator.head_width={args['head_width']} must be >= 1")
        return problems

    def __init__(
        self,
        backbone: Mapping[str, Any],
        feature_stages: Sequence[int],
        head_width: int,
        mean: Sequence[float],
        std: Sequence[float],
        loss: str,
        real_target: float,
        r1_gamma: float,
        weights_dir: str | None = None,
    ) -> None:
        super().__init__(loss, real_target, r1_gamma)
        self.backbone = build_convnext(backbone, weights_dir)
        self.backbone_dtype = DTYPES[str(backbone["dtype"])]
        self.stages = list(feature_stages)
        if self.stages[-1] >= len(self.backbone.stages):
            raise ConfigError(f"discriminator.feature_stages={self.stages}: the backbone has {len(self.backbone.stages)} stages")
        channels = [self.backbone.feature_info[i]["num_chs"] for i in self.stages]
        self.heads = MultiLevelHeads(channels, int(self.backbone.num_classes), int(head_width))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def frozen_eval(self) -> None:
        self.backbone.eval()

    def features(self, x: torch.Tensor, embeds: TextEmbeds) -> list[torch.Tensor]:
        """Stage outputs ``feature_stages`` and the pooled embedding of x in [-1, 1] (the prompt is not used)."""
        x = ((x.float() * 0.5 + 0.5) - self.mean) / self.std
        net = self.backbone
        maps = []
        with frozen_autocast(x.device.type, self.backbone_dtype):
            h = net.stem(x.to(self.backbone_dtype))
            for i, stage in enumerate(net.stages):
                h = stage(h)
                if i in self.stages:
                    maps.append(h)
            pooled = net.forward_head(net.norm_pre(h))
        return maps + [pooled]

    def classify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """HYPIR's heads, in fp32 (the release's decoder is fp32, D.py:44 casts the pooled vector)."""
        return self.heads([f.float() for f in features[:-1]], features[-1].float())
