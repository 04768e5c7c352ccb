"""Real-ESRGAN's second-order degradation, batched on the batch's device with per-sample random parameters.

Images inside the pipeline are in [0, 1]. Samples whose intermediate sizes differ share a canvas padded
on the bottom/right by edge replication, so blur, noise and JPEG stay batched; per-sample resizes loop.
All random parameters come from one seeded CPU generator owned by the object (``state_dict`` resumes it);
noise fields come from a device generator seeded from it per call.
"""

from __future__ import annotations

from typing import Any

import kornia
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from osediff_lab.data.degradation import resize
from osediff_lab.data.kernels import KERNEL_TYPES, KernelSpec, describe_kernel, sample_kernels
from osediff_lab.errors import ConfigError

RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")


# ---- batched operations (pure functions, images in [0, 1]) ---------------------------------------
def trim(kernels: torch.Tensor) -> torch.Tensor:
    """Crop odd (B, k, k) kernels to the smallest centred square holding every non-zero tap of the batch
    (same result, less work: most sampled supports are smaller than the padded size)."""
    c = kernels.shape[-1] // 2
    taps = (kernels != 0).any(dim=0).nonzero()
    half = int((taps - c).abs().max()) if taps.numel() else 0
    return kernels[:, c - half : c + half + 1, c - half : c + half + 1]


def filter_each(x: torch.Tensor, kernels: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """Correlate each sample of x (B, C, H, W) with its own kernel (B, k, k); ``border`` pads the edges.

    Reflect padding needs sides longer than k // 2; smaller images fall back to edge replication.
    """
    kernels = trim(kernels)
    k = kernels.shape[-1]
    if k == 1:
        return x * kernels.to(x)[:, None]
    if border == "reflect" and min(x.shape[-2:]) <= k // 2:
        border = "replicate"
    return kornia.filters.filter2d(x, kernels.to(x), border_type=border)


def gaussian_noise(shape: torch.Size, sigma: torch.Tensor, gray: torch.Tensor, g: torch.Generator, device) -> torch.Tensor:
    """N(0, sigma^2) noise (sigma per sample, on the [0, 1] scale); ``gray`` samples share one field across channels."""
    n = torch.randn(shape, generator=g, device=device)
    n = torch.where(gray.to(device)[:, None, None, None], n[:, :1].expand_as(n), n)
    return n * sigma.to(device=device, dtype=n.dtype)[:, None, None, None]


def poisson_noise(x: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, levels: float, g: torch.Generator) -> torch.Tensor:
    """Shot noise: (Poisson(x * levels) / levels - x) * scale; ``gray`` samples use the luminance for every channel.

    x in [0, 1]; the noise std at intensity v is scale * sqrt(v / levels).
    """
    noise = torch.zeros_like(x)
    gray = gray.to(x.device)
    for mask, channels in ((~gray, x), (gray, kornia.color.rgb_to_grayscale(x))):
        idx = mask.nonzero().flatten()
        if idx.numel():
            v = channels[idx].clamp(0, 1)
            noise[idx] = (torch.poisson(v * levels, generator=g) / levels - v).expand(-1, x.shape[1], -1, -1)
    return noise * scale.to(x)[:, None, None, None]


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG encode/decode per sample quality (IJG tables, 8x8 DCT, 4:2:0 chroma) via kornia; 8-bit output in [0, 1]."""
    q = quality.to(device=x.device, dtype=torch.float32)
    out = kornia.enhance.jpeg_codec_differentiable(x.float().clamp(0, 1), q)
    return (out.clamp(0, 1) * 255).round() / 255


def resize_each(
    x: torch.Tensor, sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]], modes: list[str], antialias: bool
) -> torch.Tensor:
    """Resize sample i's valid region (top-left ``sizes[i]``) to ``out_sizes[i]``; returns the new padded canvas."""
    if len(set(sizes)) == 1 and len(set(out_sizes)) == 1 and len(set(modes)) == 1 and tuple(x.shape[-2:]) == sizes[0]:
        return resize(x, out_sizes[0], modes[0], antialias)
    hmax, wmax = max(s[0] for s in out_sizes), max(s[1] for s in out_sizes)
    out = x.new_empty(x.shape[0], x.shape[1], hmax, wmax)
    for i, ((h, w), (h2, w2), mode) in enumerate(zip(sizes, out_sizes, modes, strict=True)):
        y = resize(x[i : i + 1, :, :h, :w], (h2, w2), mode, antialias)
        out[i] = F.pad(y, (0, wmax - w2, 0, hmax - h2), mode="replicate")[0]
    return out


def pulse(n: int, size: int) -> torch.Tensor:
    """Identity kernels (n, size, size): the 'no filter' choice."""
    k = torch.zeros(n, size, size)
    k[:, size // 2, size // 2] = 1
    return k


# ---- parameter sampling ---------------------------------------------------------------------------
def kernel_spec(cfg: DictConfig, stage: DictConfig) -> KernelSpec:
    """The KernelSpec of one stage (``cfg.first`` or ``cfg.second``) from the degradation config."""
    return KernelSpec(
        size=int(cfg.kernel_size),
        ksize_range=tuple(cfg.kernel_size_range),
        types=tuple(stage.kernel_types),
        probs=tuple(stage.kernel_probs),
        sinc_prob=float(stage.sinc_prob),
        sigma_range=tuple(stage.blur_sigma),
        betag_range=tuple(stage.betag),
        betap_range=tuple(stage.betap),
        omega_small=tuple(cfg.sinc_omega_small),
        omega_large=tuple(cfg.sinc_omega_large),
    )


def _uniform(n: int, bounds, g: torch.Generator) -> torch.Tensor:
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def sample_stage(n: int, cfg: DictConfig, stage: DictConfig, g: torch.Generator) -> dict[str, Any]:
    """One stage's per-sample parameters: blur kernel, resize factor/mode, noise kind/strength, JPEG quality."""
    blur = torch.rand(n, generator=g, dtype=torch.float64) < float(stage.blur_prob)
    kernels, kparams = sample_kernels(n, kernel_spec(cfg, stage), g)
    kernels = torch.where(blur[:, None, None], kernels, pulse(n, kernels.shape[-1]))
    direction = torch.multinomial(torch.tensor(list(stage.resize_probs), dtype=torch.float64), n, True, generator=g)
    lo, hi = stage.resize_range
    up, down = _uniform(n, (1.0, hi), g), _uniform(n, (lo, 1.0), g)
    factor = torch.where(direction == 0, up, torch.where(direction == 1, down, torch.ones_like(up)))
    modes = torch.randint(0, len(cfg.resize_modes), (n,), generator=g)
    if not cfg.resize_per_sample:  # Real-ESRGAN's original: the first sample's resize for the whole batch
        direction, factor, modes = direction[:1].expand(n), factor[:1].expand(n), modes[:1].expand(n)
    return {
        "blur": blur,
        "kernels": kernels,
        "kernel_params": kparams,
        "direction": direction,
        "factor": factor,
        "mode": [str(cfg.resize_modes[int(m)]) for m in modes],
        "gaussian": torch.rand(n, generator=g, dtype=torch.float64) < float(stage.gaussian_noise_prob),
        "sigma": _uniform(n, stage.noise_range, g) / 255.0,
        "poisson": _uniform(n, stage.poisson_scale_range, g),
        "gray": torch.rand(n, generator=g, dtype=torch.float64) < float(stage.gray_noise_prob),
        "quality": _uniform(n, stage.jpeg_range, g),
    }


def sample_final(n: int, cfg: DictConfig, g: torch.Generator) -> dict[str, Any]:
    """The last stage: optional sinc filter, resize mode to the LQ size, and whether JPEG comes first."""
    f = cfg.final
    sinc = torch.rand(n, generator=g, dtype=torch.float64) < float(f.sinc_prob)
    spec = KernelSpec(
        size=int(cfg.kernel_size),
        ksize_range=tuple(cfg.kernel_size_range),
        types=("iso",),
        probs=(1.0,),
        sinc_prob=1.0,
        sigma_range=(1.0, 1.0),
        betag_range=(1.0, 1.0),
        betap_range=(1.0, 1.0),
        omega_small=tuple(f.sinc_omega),
        omega_large=tuple(f.sinc_omega),
    )
    kernels, kparams = sample_kernels(n, spec, g)
    modes = torch.randint(0, len(cfg.resize_modes), (n,), generator=g)
    return {
        "sinc": sinc,
        "kernels": torch.where(sinc[:, None, None], kernels, pulse(n, kernels.shape[-1])),
        "kernel_params": kparams,
        "mode": [str(cfg.resize_modes[int(m)]) for m in modes],
        "jpeg_first": torch.rand(n, generator=g, dtype=torch.float64) < float(f.jpeg_first_prob),
    }


def validate(cfg: DictConfig) -> None:
    """Refuse unknown kernel types or resize modes and mismatched probability lists, naming the key."""
    for name in ("first", "second"):
        st = cfg[name]
        bad = [t for t in st.kernel_types if t not in KERNEL_TYPES]
        if bad or len(st.kernel_types) != len(st.kernel_probs):
            raise ConfigError(f"degradation.{name}.kernel_types {list(st.kernel_types)} must come from {KERNEL_TYPES} "
                              f"with one entry of degradation.{name}.kernel_probs each")
        if len(st.resize_probs) != len(RESIZE_DIRECTIONS):
            raise ConfigError(f"degradation.{name}.resize_probs needs 3 entries (up, down, keep)")
    bad = [m for m in cfg.resize_modes if m not in RESIZE_MODES]
    if bad:
        raise ConfigError(f"degradation.resize_modes {bad} unknown; choose from {RESIZE_MODES}")


# ---- the pipeline ---------------------------------------------------------------------------------
class RealESRGANDegradation:
    """HQ (B, 3, H, W) in [-1, 1] -> LQ (B, 3, H/scale, W/scale) in [-1, 1], Real-ESRGAN's second-order model.

    ``last_params`` holds the sampled parameters of the latest call, one dict per sample; ``describe``
    turns one into text. With ``cfg.pool.enabled`` the call also swaps pairs with a pool (see ``pair``).
    """

    def __init__(self, cfg: DictConfig, scale: int) -> None:
        self.cfg = cfg
        self.scale = int(scale)
        self.seed = int(cfg.seed)
        self._gen: torch.Generator | None = None
        self.last_params: list[dict[str, Any]] = []
        self.pool = PairPool(int(cfg.pool.size)) if cfg.pool.enabled else None
        validate(cfg)

    @property
    def generator(self) -> torch.Generator:
        """The parameter generator, seeded lazily with seed + distributed rank so DDP ranks differ."""
        if self._gen is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
            self._gen = torch.Generator().manual_seed(self.seed + rank)
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        """Generator state (and seed), so a resumed run continues the same random stream."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._gen = torch.Generator()
        self._gen.set_state(state["generator"])

    def __call__(self, hq: torch.Tensor) -> torch.Tensor:
        """LQ for ``hq`` in [-1, 1]. With the pool enabled ``hq`` is overwritten in place by the LQ's HQ partners."""
        if self.pool is None:
            return self.degrade(hq)
        new_hq, lq = self.pair(hq)
        hq.copy_(new_hq)
        return lq

    def pair(self, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(HQ, LQ) in [-1, 1], passed through the training-pair pool when it is enabled (shuffles pairs across batches)."""
        lq = self.degrade(hq)
        if self.pool is None:
            return hq, lq
        return self.pool(hq, lq, self.generator)

    @torch.no_grad()
    def degrade(self, hq: torch.Tensor) -> torch.Tensor:
        """The degradation itself, no pool: HQ in [-1, 1] -> LQ in [-1, 1] at exactly H/scale x W/scale."""
        b, _, h, w = hq.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HQ size {h}x{w} is not divisible by scale {self.scale}")
        cfg, g = self.cfg, self.generator
        p1, p2, pf = sample_stage(b, cfg, cfg.first, g), sample_stage(b, cfg, cfg.second, g), sample_final(b, cfg, g)
        noise_gen = torch.Generator(device=hq.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        lq_size = (h // self.scale, w // self.scale)
        x = (hq.float() + 1) / 2

        sizes1 = [(max(1, int(h * f)), max(1, int(w * f))) for f in p1["factor"].tolist()]
        x = self._stage(x, [(h, w)] * b, sizes1, p1, noise_gen)
        x = jpeg(x, p1["quality"])
        sizes2 = [(max(1, int(lq_size[0] * f)), max(1, int(lq_size[1] * f))) for f in p2["factor"].tolist()]
        x = self._stage(x, sizes1, sizes2, p2, noise_gen)
        first = pf["jpeg_first"].to(x.device)
        if first.any():
            x[first] = jpeg(x[first], p2["quality"][pf["jpeg_first"]])
        x = resize_each(x, sizes2, [lq_size] * b, pf["mode"], bool(cfg.antialias))
        x = filter_each(x, pf["kernels"], cfg.border).clamp(0, 1)
        if (~first).any():
            x[~first] = jpeg(x[~first], p2["quality"][~pf["jpeg_first"]])
        self.last_params = [self._record(i, p1, p2, pf, sizes1, sizes2) for i in range(b)]
        return (x * 2 - 1).to(hq.dtype)

    def _stage(self, x: torch.Tensor, sizes, out_sizes, p: dict[str, Any], noise_gen: torch.Generator) -> torch.Tensor:
        """Blur, resize, noise (no JPEG) for one stage on the padded canvas."""
        x = filter_each(x, p["kernels"], self.cfg.border)
        x = resize_each(x, sizes, out_sizes, p["mode"], bool(self.cfg.antialias))
        gaussian = p["gaussian"].to(x.device)
        noise = torch.zeros_like(x)
        if gaussian.any():
            noise[gaussian] = gaussian_noise(x[gaussian].shape, p["sigma"][p["gaussian"]], p["gray"][p["gaussian"]], noise_gen, x.device)
        if (~gaussian).any():
            idx = ~p["gaussian"]
            noise[~gaussian] = poisson_noise(x[~gaussian], p["poisson"][idx], p["gray"][idx], float(self.cfg.poisson_levels), noise_gen)
        return (x + noise).clamp(0, 1)

    @staticmethod
    def _record(i: int, p1, p2, pf, sizes1, sizes2) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        for tag, p, size in (("1", p1, sizes1[i]), ("2", p2, sizes2[i])):
            rec[f"blur{tag}"] = describe_kernel(p["kernel_params"], i) if bool(p["blur"][i]) else None
            rec[f"resize{tag}"] = (RESIZE_DIRECTIONS[int(p["direction"][i])], float(p["factor"][i]), p["mode"][i], size)
            kind = "gaussian" if bool(p["gaussian"][i]) else "poisson"
            strength = float(p["sigma"][i]) * 255 if kind == "gaussian" else float(p["poisson"][i])
            rec[f"noise{tag}"] = (kind, strength, bool(p["gray"][i]))
            rec[f"jpeg{tag}"] = float(p["quality"][i])
        rec["final_sinc"] = describe_kernel(pf["kernel_params"], i) if bool(pf["sinc"][i]) else None
        rec["final_mode"] = pf["mode"][i]
        rec["jpeg_first"] = bool(pf["jpeg_first"][i])
        return rec


def describe(rec: dict[str, Any]) -> list[str]:
    """Text lines (one per stage) for a sample's parameter record from ``last_params``."""
    lines = []
    for tag in ("1", "2"):
        direction, factor, mode, size = rec[f"resize{tag}"]
        kind, strength, gray = rec[f"noise{tag}"]
        noise = f"{kind} {'s' if kind == 'gaussian' else 'x'}={strength:.2f}{' gray' if gray else ''}"
        lines.append(f"{tag}: {rec[f'blur{tag}'] or 'no blur'}")
        lines.append(f"   {direction} x{factor:.2f} {mode} -> {size[1]}x{size[0]}; {noise}")
    jp1, jp2 = f"jpeg q{rec['jpeg1']:.0f}", f"jpeg q{rec['jpeg2']:.0f}"
    final = f"{rec['final_mode']} + {rec['final_sinc'] or 'no sinc'}"
    lines.insert(2, f"   {jp1}")
    lines.append(f"f: {jp2} then {final}" if rec["jpeg_first"] else f"f: {final} then {jp2}")
    return lines


class PairPool:
    """Real-ESRGAN's training-pair pool: a queue of degraded pairs; once full, each batch is swapped with a
    random draw from it, so a batch mixes pairs from earlier batches and degradations decorrelate."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hq: torch.Tensor | None = None
        self.lq: torch.Tensor | None = None
        self.filled = 0

    def __call__(self, hq: torch.Tensor, lq: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b = hq.shape[0]
        if self.size % b:
            raise ValueError(f"degradation.pool.size={self.size} must be a multiple of the batch size {b}")
        if self.hq is None:
            self.hq = hq.new_empty((self.size, *hq.shape[1:]))
            self.lq = lq.new_empty((self.size, *lq.shape[1:]))
        if self.filled < self.size:
            self.hq[self.filled : self.filled + b] = hq
            self.lq[self.filled : self.filled + b] = lq
            self.filled += b
            return hq, lq
        perm = torch.randperm(self.size, generator=g).to(hq.device)
        self.hq, self.lq = self.hq[perm], self.lq[perm]
        out_hq, out_lq = self.hq[:b].clone(), self.lq[:b].clone()
        self.hq[:b], self.lq[:b] = hq, lq
        return out_hq, out_lq
