"""The manifest: every external weight file the project can use, where it lives in the cache, where it comes from.

URLs are the ones the consuming libraries use by default (pyiqa, torchvision, OpenAI CLIP, timm), so a
fetched file is byte-for-byte what those libraries would have downloaded themselves. ``sha256`` is filled
only where a published full digest exists (OpenAI puts it in the CLIP URL); ``sha256_prefix`` only where the
file name follows torch.hub's documented ``name-<sha256[:8]>.pth`` convention (torchvision). Everything else
has no known digest (pyiqa publishes none) and is checked for presence and file-format integrity only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from osediff_lab.backbones import releases
from osediff_lab.errors import ConfigError

PYIQA_BASE = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
TORCHVISION_BASE = "https://download.pytorch.org/models"
CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"

# Cache layout (relative to paths.weights_dir); chosen so each library finds its file where it looks by default.
TORCH_HUB = "torch_hub"  # torch.hub.set_dir target: torchvision -> checkpoints/, pyiqa -> pyiqa/, CLIP -> clip/
HF_HUB = "huggingface/hub"  # Hugging Face cache layout (timm backbones, LLaVA)


@dataclass(frozen=True)
class WeightFile:
    """One external file (or, with ``hf_repo`` and no ``hf_file``, one Hugging Face snapshot)."""

    name: str
    what: str
    # relative to the cache dir (plain files; with ``hf_repo``: a snapshot directory) or to the package dir
    path: str = ""
    url: str | None = None  # direct download source; None when it must be obtained by hand (see ``manual``)
    sha256: str | None = None
    sha256_prefix: str | None = None
    approx_mb: float | None = None  # informational only, never used to judge a file
    package: str | None = None  # ships inside this pip package: nothing to fetch
    hf_repo: str | None = None  # without ``path``: stored in the Hugging Face cache layout under <cache>/huggingface/hub
    hf_file: str | None = None
    manual: str | None = None
    licence: str | None = None  # a licence the release is gated by, to accept before fetching
    groups: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        if self.package:
            return f"pip package '{self.package}'"
        if self.hf_repo:
            return f"https://huggingface.co/{self.hf_repo}" + (f" ({self.hf_file})" if self.hf_file else " (snapshot)")
        return self.url or f"manual: {self.manual}"


def _pyiqa(name: str, file: str, what: str, approx_mb: float, groups: tuple[str, ...]) -> WeightFile:
    return WeightFile(name, what, f"{TORCH_HUB}/pyiqa/{file}", f"{PYIQA_BASE}/{file}", approx_mb=approx_mb, groups=groups)


def _torchvision(name: str, file: str, what: str, approx_mb: float, groups: tuple[str, ...]) -> WeightFile:
    prefix = file.rsplit("-", 1)[1].split(".")[0]
    return WeightFile(
        name, what, f"{TORCH_HUB}/checkpoints/{file}", f"{TORCHVISION_BASE}/{file}", sha256_prefix=prefix,
        approx_mb=approx_mb, groups=groups,
    )


def _base_model_entries() -> tuple[WeightFile, ...]:
    """The entries ``<prefix>_<suffix>`` of every registered backbone's releases: the files of each one's diffusers
    folder on the Hugging Face Hub (``Backbone.folder_files``), in the weights group named after the release."""
    return tuple(
        WeightFile(f"{r.prefix}_{suffix}", f"{r.label} {what}", f"{r.folder}/{file}", f"https://huggingface.co/{r.repo}/resolve/main/{file}",
                   approx_mb=mb, licence=r.licence, groups=(r.group,))
        for backbone, r in releases()
        for suffix, file, what, mb in backbone.folder_files
    )


ENTRIES: tuple[WeightFile, ...] = (
    *_base_model_entries(),
    WeightFile(
        "ram_swin_large", "RAM Swin-L tagging model (DAPE's base)", "ram/ram_swin_large_14m.pth",
        "https://huggingface.co/xinyu1205/recognize_anything_model/resolve/main/ram_swin_large_14m.pth",
        approx_mb=5630, groups=("prompts",),
    ),
    WeightFile(
        "dape", "DAPE: RAM + LoRA finetuned on degraded images (SeeSR)", "dape/DAPE.pth",
        manual="download DAPE.pth from the SeeSR release (https://github.com/cswry/SeeSR, 'preset/models') "
        "and place it at <weights_dir>/dape/DAPE.pth",
        groups=("prompts",),
    ),
    WeightFile(
        "llava15_7b", "LLaVA-1.5 7B captioner (prompt ablation)", "llava-1.5-7b-hf", hf_repo="llava-hf/llava-1.5-7b-hf",
        approx_mb=14100, groups=("prompts",),
    ),
    _torchvision("tv_vgg16", "vgg16-397923af.pth", "VGG16 ImageNet (LPIPS-vgg loss, DISTS)", 528, ("lpips_vgg", "dists")),
    _torchvision("tv_alexnet", "alexnet-owt-7be5be79.pth", "AlexNet ImageNet (LPIPS-alex)", 233, ("lpips_alex",)),
    _torchvision("tv_squeezenet", "squeezenet1_1-b8a52dc0.pth", "SqueezeNet 1.1 ImageNet (LPIPS-squeeze)", 5, ("lpips_squeeze",)),
    WeightFile("lpips_linear_alex", "LPIPS v0.1 linear layers (alex)", "weights/v0.1/alex.pth", package="lpips", groups=("lpips_alex",)),
    WeightFile("lpips_linear_vgg", "LPIPS v0.1 linear layers (vgg)", "weights/v0.1/vgg.pth", package="lpips", groups=("lpips_vgg",)),
    WeightFile(
        "lpips_linear_squeeze", "LPIPS v0.1 linear layers (squeeze)", "weights/v0.1/squeeze.pth", package="lpips",
        groups=("lpips_squeeze",),
    ),
    _pyiqa("dists", "DISTS_weights-f5e65c96.pth", "DISTS alpha/beta weights", 0.1, ("dists",)),
    _pyiqa("niqe", "niqe_modelparameters.mat", "NIQE pristine-image model (mu, cov)", 0.02, ("niqe",)),
    _pyiqa("musiq_koniq", "musiq_koniq_ckpt-e95806b9.pth", "MUSIQ trained on KonIQ-10k", 105, ("musiq",)),
    _pyiqa("maniqa_pipal", "MANIQA_PIPAL-ae6d356b.pth", "MANIQA trained on PIPAL (the paper's checkpoint)", 540, ("maniqa",)),
    WeightFile(
        "vit_b8_maniqa", "ViT-B/8 ImageNet backbone MANIQA builds before loading its checkpoint",
        hf_repo="timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", hf_file="model.safetensors", approx_mb=345,
        groups=("maniqa",),
    ),
    WeightFile(
        "clip_rn50", "OpenAI CLIP RN50 (CLIPIQA)", f"{TORCH_HUB}/clip/RN50.pt",
        f"https://openaipublic.azureedge.net/clip/models/{CLIP_RN50_SHA256}/RN50.pt", sha256=CLIP_RN50_SHA256,
        approx_mb=244, groups=("clipiqa",),
    ),
    _pyiqa("fid_inception", "pt_inception-2015-12-05-6726825d.pth", "FID Inception-v3 (pytorch-fid port)", 91, ("fid",)),
    WeightFile(
        "convnext_xxlarge_clip", "OpenCLIP ConvNeXt-XXLarge image tower, LAION-2B soup (HYPIR's frozen discriminator)",
        hf_repo="timm/convnext_xxlarge.clip_laion2b_soup", hf_file="model.safetensors", groups=("discriminator",),
    ),
)

MANIFEST: dict[str, WeightFile] = {e.name: e for e in ENTRIES}
GROUPS: dict[str, list[str]] = {}
for _entry in ENTRIES:
    for _group in _entry.groups:
        GROUPS.setdefault(_group, []).append(_entry.name)
GROUPS["metrics"] = [
    n for n, e in MANIFEST.items() if set(e.groups) & {"lpips_alex", "dists", "niqe", "musiq", "maniqa", "clipiqa", "fid"}
]


def resolve_names(names: list[str] | None) -> list[WeightFile]:
    """Entries for manifest names or group names (``all`` or nothing = everything), in manifest order."""
    if not names or "all" in names:
        return list(ENTRIES)
    wanted: set[str] = set()
    for n in names:
        if n in MANIFEST:
            wanted.add(n)
        elif n in GROUPS:
            wanted.update(GROUPS[n])
        else:
            raise ConfigError(f"'{n}' is neither a weight name nor a group; names: {sorted(MANIFEST)}; groups: {sorted(GROUPS)}")
    return [e for e in ENTRIES if e.name in wanted]
