"""Real-ESRGAN's second-order degradation, batched on the batch's device with per-sample random parameters.

Images inside the pipeline are in [0, 1]. Once the per-sample resizes have given samples different sizes
there is no shared canvas: every operation runs once per group of samples that agree on what it needs
(image size, blur support, resize target and mode, noise kind), so a sample costs what it would cost
alone, and each sample's result equals processing it on its own (``apply`` on ``select_samples``).
All random parameters come from one seeded CPU generator owned by the object (``state_dict`` resumes it);
noise fields come from a device generator per sample, seeded from it per call.
The public releases' quirks (OSEDiff's and PiSA-SR's basicsr-based pipeline) are switches: ``jpeg_codec``,
``resize_rule``, ``poisson_levels`` and ``clamp_lq`` (docs/degradation_quirks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from osediff_lab.build import raise_problems
from osediff_lab.data.jpeg import RGB_TO_YCC, jpeg_compress
from osediff_lab.data.kernels import KERNEL_TYPES, KernelSpec, describe_kernel, sample_kernels
from osediff_lab.data.release_jpeg import release_jpeg
from osediff_lab.data.resize import resize, resize_by_factor
from osediff_lab.dtypes import host_to_device
from osediff_lab.errors import ConfigError

RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
# Supports up to this size are correlated directly (a grouped convolution), larger ones through the FFT,
# whose cost does not grow with the kernel (`python benchmarks/bench_degradation.py --blur` measures both).
DIRECT_MAX = 11
# oneDNN's depthwise convolution vectorises across channels: with fewer than this many (one RGB image has 3)
# most lanes idle, so rows are cut into strips stacked as channels (same taps per pixel: the same result).
MIN_CHANNELS = 24
MIN_STRIP_ROWS = 16  # shorter strips would spend more on their overlapping border rows than they save
# auto: each kernel cropped to its support, then direct or FFT as above; plain: the full kernel in one grouped
# convolution, as Real-ESRGAN's filter2D (the reference; the same as auto to float rounding, and slower).
BLUR_METHODS = ("auto", "plain")
# libjpeg: what an 8-bit JPEG file decodes to (data/jpeg.py); release_diffjpeg: basicsr's DiffJPEG approximation,
# which the public releases run (data/release_jpeg.py).
JPEG_CODECS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "libjpeg": jpeg_compress,
    "release_diffjpeg": release_jpeg,
}
# The first stage's resize: size = to exactly floor(size * factor); scale_factor = F.interpolate(scale_factor=factor)
# as the releases call it (the same output size, but the sampling grid spaced 1 / factor: content stretched).
RESIZE_RULES = ("size", "scale_factor")
# poisson_levels takes a number, or this: the releases' count (basicsr's generate_poisson_noise_pt, see release_poisson_noise).
RELEASE_LEVELS = "release"
# torchvision's rgb_to_grayscale weights, which basicsr's gray Poisson noise uses (degradations.py:631).
TORCHVISION_GRAY = (0.2989, 0.587, 0.114)


# ---- operations on groups of samples (pure functions, images in [0, 1]) -----------------------------
def groups(keys: list[Hashable | None]) -> list[list[int]]:
    """Indices of the samples sharing each key, in order of first appearance; ``None`` keys are left out."""
    found: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            found.setdefault(key, []).append(i)
    return list(found.values())


def map_groups(
    xs: list[torch.Tensor], keys: list[Hashable | None], fn: Callable[[torch.Tensor, list[int]], torch.Tensor]
) -> list[torch.Tensor]:
    """``fn(stacked samples, their indices)`` once per group of equal keys; samples come back in order.

    Samples (C, H, W) whose key is ``None`` pass through unchanged. Keys must include the sample's size.
    """
    out = list(xs)
    for idx in groups(keys):
        y = fn(torch.stack([xs[i] for i in idx]) if len(idx) > 1 else xs[idx[0]][None], idx)
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


def support(kernels: torch.Tensor) -> list[int]:
    """Half-width of each odd (B, k, k) kernel's non-zero taps around its centre (0: a scaled identity)."""
    c = kernels.shape[-1] // 2
    offsets = (torch.arange(kernels.shape[-1]) - c).abs()
    nonzero = (kernels != 0).cpu()
    rows, cols = nonzero.any(dim=-1), nonzero.any(dim=-2)
    return ((rows | cols) * offsets).amax(dim=-1).tolist()


def fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 5 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def depthwise_correlate(xp: torch.Tensor, kernels: torch.Tensor, strip: bool = True) -> torch.Tensor:
    """Each sample of the padded xp (B, C, H + 2r, W + 2r) correlated with its kernel (B, 2r + 1, 2r + 1) -> (B, C, H, W).

    One grouped convolution; with ``strip``, below ``MIN_CHANNELS`` channels the rows are cut into
    overlapping strips stacked as channels (zero rows fill the last strip and are dropped).
    """
    b, c, hp, wp = xp.shape
    r = kernels.shape[-1] // 2
    h, w, n = hp - 2 * r, wp - 2 * r, b * c
    strips = max(1, min(-(-MIN_CHANNELS // n), h // MIN_STRIP_ROWS)) if strip else 1
    weight = kernels.repeat_interleave(c, dim=0)[:, None]
    if strips == 1:
        return F.conv2d(xp.reshape(1, n, hp, wp), weight, groups=n).view(b, c, h, w)
    rows = -(-h // strips)
    x = F.pad(xp, (0, 0, 0, rows * strips - h)).reshape(1, n, rows * strips + 2 * r, wp)
    x = torch.cat([x[:, :, i * rows : (i + 1) * rows + 2 * r] for i in range(strips)], dim=1)
    y = F.conv2d(x, weight.repeat(strips, 1, 1, 1), groups=n * strips)
    return torch.cat(y.split(n, dim=1), dim=2)[:, :, :h].reshape(b, c, h, w)


def fft_correlate(xp: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``depthwise_correlate`` as a product of spectra (the same to float rounding, ~1e-6); its cost does not
    grow with the kernel. On the CPU one sample at a time: a batch's spectra would not stay in cache."""
    if xp.device.type == "cpu" and xp.shape[0] > 1:
        return torch.cat([fft_correlate(xp[i : i + 1], kernels[i : i + 1]) for i in range(xp.shape[0])])
    r = kernels.shape[-1] // 2
    h, w = xp.shape[-2] - 2 * r, xp.shape[-1] - 2 * r
    size = (fft_size(h + 2 * r), fft_size(w + 2 * r))
    spectrum = torch.fft.rfft2(xp, s=size) * torch.fft.rfft2(kernels.flip(-2, -1), s=size)[:, None]
    return torch.fft.irfft2(spectrum, s=size)[..., 2 * r : 2 * r + h, 2 * r : 2 * r + w].contiguous()


def correlate(
    x: torch.Tensor, kernels: torch.Tensor, border: str = "reflect", direct_max: int = DIRECT_MAX, plain: bool = False
) -> torch.Tensor:
    """Correlate each sample of x (B, C, H, W) with its own odd kernel (B, k, k); ``border`` pads the edges.

    Reflect padding needs sides longer than k // 2; smaller images fall back to edge replication.
    Kernels up to ``direct_max`` are convolved directly, larger ones through the FFT; ``plain``: one grouped
    convolution whatever the kernel, no strips (Real-ESRGAN's filter2D).
    """
    h, w = x.shape[-2:]
    k = host_to_device(kernels, x.device, x.dtype)
    r = k.shape[-1] // 2
    if r == 0:
        return x * k[:, :, 0, None, None]
    if border == "reflect" and min(h, w) <= r:
        border = "replicate"
    xp = F.pad(x, (r, r, r, r), mode=border)
    if plain or k.shape[-1] <= direct_max:
        return depthwise_correlate(xp, k, strip=not plain)
    return fft_correlate(xp, k)


def blur_each(
    xs: list[torch.Tensor], kernels: torch.Tensor, border: str = "reflect", method: str = "auto"
) -> list[torch.Tensor]:
    """Correlate sample i (C, H_i, W_i) with kernels[i] (B, K, K) by ``method`` (one of ``BLUR_METHODS``).

    auto: supports up to ``DIRECT_MAX`` are cropped and convolved, one call per (size, support); larger ones
    go through the FFT at the full size K, whose cost does not depend on the support: one call per size.
    plain: the full K x K kernel in one grouped convolution per size.
    """
    if method == "plain":
        return map_groups(xs, [tuple(x.shape) for x in xs], lambda x, idx: correlate(x, kernels[idx], border, plain=True))
    halves, c = support(kernels), kernels.shape[-1] // 2

    def fn(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        r = halves[idx[0]]
        if 2 * r + 1 > DIRECT_MAX:
            return correlate(x, kernels[idx], border)
        return correlate(x, kernels[idx, c - r : c + r + 1, c - r : c + r + 1], border)

    keys = [(tuple(x.shape), r if 2 * r + 1 <= DIRECT_MAX else "fft") for x, r in zip(xs, halves, strict=True)]
    return map_groups(xs, keys, fn)


def filter_each(x: torch.Tensor, kernels: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """Correlate each sample of a same-size batch x (B, C, H, W) with its own kernel (B, k, k)."""
    return torch.stack(blur_each(list(x.unbind(0)), kernels, border))


def resize_each(xs: list[torch.Tensor], out_sizes: list[tuple[int, int]], modes: list[str], antialias: bool) -> list[torch.Tensor]:
    """Resize sample i to ``out_sizes[i]`` with ``modes[i]``; one call per (size, target, mode)."""
    keys = [(tuple(x.shape), tuple(s), m) for x, s, m in zip(xs, out_sizes, modes, strict=True)]
    return map_groups(xs, keys, lambda x, idx: resize(x, out_sizes[idx[0]], modes[idx[0]], antialias))


def rescale_each(xs: list[torch.Tensor], factors: list[float], modes: list[str], antialias: bool) -> list[torch.Tensor]:
    """Resize sample i by ``factors[i]`` with ``modes[i]`` (``resize_by_factor``); one call per (size, factor, mode)."""
    keys = [(tuple(x.shape), f, m) for x, f, m in zip(xs, factors, modes, strict=True)]
    return map_groups(xs, keys, lambda x, idx: resize_by_factor(x, factors[idx[0]], modes[idx[0]], antialias))


def gaussian_noise(shape: torch.Size, sigma: torch.Tensor, gray: bool, gens: list[torch.Generator]) -> torch.Tensor:
    """N(0, sigma^2) noise for (B, C, H, W), sample i from ``gens[i]`` (sigma per sample, on the [0, 1] scale).

    ``gray`` draws one field shared by every channel.
    """
    b, c, h, w = shape
    device = gens[0].device
    n = torch.stack([torch.randn((1 if gray else c, h, w), generator=g, device=device) for g in gens])
    return n.expand(b, c, h, w) * host_to_device(sigma, n.device, n.dtype)[:, None, None, None]


def luminance(x: torch.Tensor) -> torch.Tensor:
    """JFIF's Y of RGB x (B, 3, H, W) -> (B, 1, H, W), on x's scale."""
    (wr, wg, wb), (r, g, b) = RGB_TO_YCC[0], x.unbind(1)
    return (wr * r + wg * g + wb * b)[:, None]


def poisson_noise(x: torch.Tensor, scale: torch.Tensor, gray: bool, levels: float, gens: list[torch.Generator]) -> torch.Tensor:
    """Shot noise (Poisson(x * levels) / levels - x) * scale, sample i from ``gens[i]``; ``gray`` uses the
    luminance for every channel. x in [0, 1]; the noise std at intensity v is scale * sqrt(v / levels)."""
    v = (luminance(x) if gray else x).clamp(0, 1)
    n = torch.stack([torch.poisson(v[j] * levels, generator=g) for j, g in enumerate(gens)]) / levels - v
    return n.expand_as(x) * host_to_device(scale, x.device, x.dtype)[:, None, None, None]


def gray_torchvision(x: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale of RGB x (B, 3, H, W) -> (B, 1, H, W), on x's scale (``TORCHVISION_GRAY``)."""
    (wr, wg, wb), (r, g, b) = TORCHVISION_GRAY, x.unbind(1)
    return (wr * r + wg * g + wb * b)[:, None]


def distinct_8bit(v: torch.Tensor) -> torch.Tensor:
    """How many distinct values each sample of v (B, ...) holds, v holding 8-bit levels k / 255 -> (B,) int64."""
    k = (v.flatten(1) * 255).round().long()
    return torch.zeros(v.shape[0], 256, dtype=torch.bool, device=v.device).scatter_(1, k, True).sum(1)


def release_levels(counts: torch.Tensor) -> torch.Tensor:
    """basicsr's Poisson level count 2 ** ceil(log2(n)) for n distinct values (degradations.py:647), counts (B,)
    in [1, 256], exactly: 2 to the number of powers 1, 2, ..., 128 that n exceeds."""
    powers = 2 ** torch.arange(8, device=counts.device)
    return 2 ** (counts[:, None] > powers).sum(1)


def release_poisson_noise(x: torch.Tensor, scale: torch.Tensor, gray: bool, gens: list[torch.Generator]) -> torch.Tensor:
    """basicsr's ``generate_poisson_noise_pt`` (degradations.py:610-655), sample i from ``gens[i]``; x in [0, 1].

    The noise is drawn around x (``gray``: its torchvision grayscale, for every channel) rounded to 8 bits and
    clipped, at ``release_levels`` of that rounded image's distinct values (of all its channels):
    (Poisson(v * L) / L - v) * scale."""
    v = ((gray_torchvision(x) if gray else x) * 255).round().clamp(0, 255) / 255
    levels = release_levels(distinct_8bit(v)).to(v.dtype)[:, None, None, None]
    n = torch.stack([torch.poisson(v[j] * levels[j], generator=g) for j, g in enumerate(gens)]) / levels - v
    return n.expand_as(x) * host_to_device(scale, x.device, x.dtype)[:, None, None, None]


def noise_each(
    xs: list[torch.Tensor], p: dict[str, Any], gens: list[torch.Generator], levels: float | str
) -> list[torch.Tensor]:
    """Add each sample's Gaussian or Poisson noise and clamp to [0, 1]; one call per (size, kind, gray).

    ``levels``: the Poisson intensity levels, or ``RELEASE_LEVELS`` (``release_poisson_noise``)."""

    def fn(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        gray, g = bool(p["gray"][idx[0]]), [gens[i] for i in idx]
        if p["gaussian"][idx[0]]:
            noise = gaussian_noise(x.shape, p["sigma"][idx], gray, g)
        elif levels == RELEASE_LEVELS:
            noise = release_poisson_noise(x, p["poisson"][idx], gray, g)
        else:
            noise = poisson_noise(x, p["poisson"][idx], gray, float(levels), g)
        return (x + noise).clamp(0, 1)

    keys = [(tuple(x.shape), bool(p["gaussian"][i]), bool(p["gray"][i])) for i, x in enumerate(xs)]
    return map_groups(xs, keys, fn)


def jpeg_each(
    xs: list[torch.Tensor], quality: torch.Tensor, where: list[bool] | None = None, codec: str = "libjpeg"
) -> list[torch.Tensor]:
    """JPEG each sample (only those with ``where[i]``) at its quality with ``codec`` (a ``JPEG_CODECS`` key); one
    call per size."""
    keys = [tuple(x.shape) if where is None or where[i] else None for i, x in enumerate(xs)]
    compress = JPEG_CODECS[codec]
    return map_groups(xs, keys, lambda x, idx: compress(x, quality[idx]))


def pulse(n: int, size: int) -> torch.Tensor:
    """Identity kernels (n, size, size): the 'no filter' choice."""
    k = torch.zeros(n, size, size)
    k[:, size // 2, size // 2] = 1
    return k


def select_samples(params: Any, idx: list[int]) -> Any:
    """The parameters (nested dicts of per-sample tensors and lists, as ``sample`` returns) of samples ``idx``."""
    if isinstance(params, dict):
        return {k: select_samples(v, idx) for k, v in params.items()}
    if isinstance(params, torch.Tensor):
        return params[idx]
    return [params[i] for i in idx]


# ---- settings (frozen, checked once when the degradation is built) ---------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage's sampling settings (``degradation.first`` / ``degradation.second``); ranges are (low, high).

    Noise sigmas are on the 0-255 scale; ``resize_probs`` weigh (up, down, keep)."""

    blur_prob: float
    kernel_types: tuple[str, ...]
    kernel_probs: tuple[float, ...]
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag: tuple[float, float]
    betap: tuple[float, float]
    resize_probs: tuple[float, ...]
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]


@dataclass(frozen=True)
class Final:
    """The last stage (``degradation.final``): sinc filter chance and cutoffs, and the chance JPEG comes first."""

    sinc_prob: float
    sinc_omega: tuple[float, float]
    jpeg_first_prob: float


@dataclass(frozen=True)
class Pool:
    """Real-ESRGAN's training-pair pool (``degradation.pool``)."""

    enabled: bool
    size: int


@dataclass(frozen=True)
class Settings:
    """Everything the sampling and the pipeline read: the shared kernel, resize and noise settings and the stages."""

    kernel_size: int
    kernel_size_range: tuple[int, int]
    sinc_omega_small: tuple[float, float]
    sinc_omega_large: tuple[float, float]
    resize_modes: tuple[str, ...]
    resize_per_sample: bool
    antialias: bool
    border: str
    blur: str
    jpeg_codec: str
    resize_rule: str
    poisson_levels: float | str
    clamp_lq: bool
    first: Stage
    second: Stage
    final: Final


S = TypeVar("S", Stage, Final, Pool)
SECTIONS: dict[str, type] = {"first": Stage, "second": Stage, "final": Final, "pool": Pool}
BORDERS = ("reflect", "replicate", "circular")


def section(kind: type[S], value: S | Mapping[str, Any], key: str) -> S:
    """``value`` as the frozen ``kind`` (a mapping's lists become tuples); unknown or missing keys raise a
    ConfigError naming them."""
    if isinstance(value, kind):
        return value
    names = [f.name for f in fields(kind)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping with the keys {names}, got {value!r}")
    unknown, missing = sorted(set(value) - set(names)), [n for n in names if n not in value]
    if unknown or missing:
        raise ConfigError(f"{key}: unknown keys {unknown}, missing keys {missing}; it takes {names}")
    return kind(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in value.items()})


def settings_problems(
    first: Stage, second: Stage, resize_modes: tuple[str, ...], border: str, blur: str, pool: Pool
) -> list[str]:
    """Unknown kernel types, resize modes, border or blur method, mismatched probability lists and an empty pool,
    each naming its key."""
    problems = []
    for name, st in (("first", first), ("second", second)):
        bad = [t for t in st.kernel_types if t not in KERNEL_TYPES]
        if bad or len(st.kernel_types) != len(st.kernel_probs):
            problems.append(f"degradation.{name}.kernel_types {list(st.kernel_types)} must come from {KERNEL_TYPES} "
                            f"with one entry of degradation.{name}.kernel_probs each")
        if len(st.resize_probs) != len(RESIZE_DIRECTIONS):
            problems.append(f"degradation.{name}.resize_probs needs 3 entries (up, down, keep)")
    bad = [m for m in resize_modes if m not in RESIZE_MODES]
    if bad:
        problems.append(f"degradation.resize_modes {bad} unknown; choose from {RESIZE_MODES}")
    if border not in BORDERS:
        problems.append(f"degradation.border='{border}' must be one of {list(BORDERS)}")
    if blur not in BLUR_METHODS:
        problems.append(f"degradation.blur='{blur}' must be one of {list(BLUR_METHODS)}")
    if pool.enabled and pool.size < 1:
        problems.append(f"degradation.pool.size={pool.size} must be >= 1 (a multiple of the batch size)")
    return problems


def quirk_problems(jpeg_codec: Any, resize_rule: Any, poisson_levels: Any, clamp_lq: Any) -> list[str]:
    """Unknown values of the switches for the releases' quirks, each naming its key."""
    problems = []
    if jpeg_codec not in JPEG_CODECS:
        problems.append(f"degradation.jpeg_codec='{jpeg_codec}' must be one of {list(JPEG_CODECS)}")
    if resize_rule not in RESIZE_RULES:
        problems.append(f"degradation.resize_rule='{resize_rule}' must be one of {list(RESIZE_RULES)}")
    number = isinstance(poisson_levels, int | float) and not isinstance(poisson_levels, bool)
    if not (poisson_levels == RELEASE_LEVELS or number and poisson_levels > 0):
        problems.append(f"degradation.poisson_levels={poisson_levels!r} must be a number > 0 or '{RELEASE_LEVELS}'")
    if not isinstance(clamp_lq, bool):
        problems.append(f"degradation.clamp_lq={clamp_lq!r} must be true or false")
    return problems


# ---- parameter sampling ---------------------------------------------------------------------------
def kernel_spec(s: Settings, stage: Stage) -> KernelSpec:
    """The KernelSpec of one stage (``s.first`` or ``s.second``)."""
    return KernelSpec(
        size=s.kernel_size,
        ksize_range=s.kernel_size_range,
        types=stage.kernel_types,
        probs=stage.kernel_probs,
        sinc_prob=float(stage.sinc_prob),
        sigma_range=stage.blur_sigma,
        betag_range=stage.betag,
        betap_range=stage.betap,
        omega_small=s.sinc_omega_small,
        omega_large=s.sinc_omega_large,
    )


def _uniform(n: int, bounds, g: torch.Generator) -> torch.Tensor:
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def sample_stage(n: int, s: Settings, stage: Stage, g: torch.Generator) -> dict[str, Any]:
    """One stage's per-sample parameters: blur kernel, resize factor/mode, noise kind/strength, JPEG quality."""
    blur = torch.rand(n, generator=g, dtype=torch.float64) < float(stage.blur_prob)
    kernels, kparams = sample_kernels(n, kernel_spec(s, stage), g)
    kernels = torch.where(blur[:, None, None], kernels, pulse(n, kernels.shape[-1]))
    direction = torch.multinomial(torch.tensor(list(stage.resize_probs), dtype=torch.float64), n, True, generator=g)
    lo, hi = stage.resize_range
    up, down = _uniform(n, (1.0, hi), g), _uniform(n, (lo, 1.0), g)
    factor = torch.where(direction == 0, up, torch.where(direction == 1, down, torch.ones_like(up)))
    modes = torch.randint(0, len(s.resize_modes), (n,), generator=g)
    if not s.resize_per_sample:  # Real-ESRGAN's original: the first sample's resize for the whole batch
        direction, factor, modes = direction[:1].expand(n), factor[:1].expand(n), modes[:1].expand(n)
    return {
        "blur": blur,
        "kernels": kernels,
        "kernel_params": kparams,
        "direction": direction,
        "factor": factor,
        "mode": [s.resize_modes[int(m)] for m in modes],
        "gaussian": torch.rand(n, generator=g, dtype=torch.float64) < float(stage.gaussian_noise_prob),
        "sigma": _uniform(n, stage.noise_range, g) / 255.0,
        "poisson": _uniform(n, stage.poisson_scale_range, g),
        "gray": torch.rand(n, generator=g, dtype=torch.float64) < float(stage.gray_noise_prob),
        "quality": _uniform(n, stage.jpeg_range, g),
    }


def sample_final(n: int, s: Settings, g: torch.Generator) -> dict[str, Any]:
    """The last stage: optional sinc filter, resize mode to the LQ size, and whether JPEG comes first."""
    f = s.final
    sinc = torch.rand(n, generator=g, dtype=torch.float64) < float(f.sinc_prob)
    spec = KernelSpec(
        size=s.kernel_size,
        ksize_range=s.kernel_size_range,
        types=("iso",),
        probs=(1.0,),
        sinc_prob=1.0,
        sigma_range=(1.0, 1.0),
        betag_range=(1.0, 1.0),
        betap_range=(1.0, 1.0),
        omega_small=f.sinc_omega,
        omega_large=f.sinc_omega,
    )
    kernels, kparams = sample_kernels(n, spec, g)
    modes = torch.randint(0, len(s.resize_modes), (n,), generator=g)
    return {
        "sinc": sinc,
        "kernels": torch.where(sinc[:, None, None], kernels, pulse(n, kernels.shape[-1])),
        "kernel_params": kparams,
        "mode": [s.resize_modes[int(m)] for m in modes],
        "jpeg_first": torch.rand(n, generator=g, dtype=torch.float64) < float(f.jpeg_first_prob),
    }


# ---- the pipeline ---------------------------------------------------------------------------------
class RealESRGANDegradation:
    """HQ (B, 3, H, W) in [-1, 1] -> LQ (B, 3, H/scale, W/scale) in [-1, 1], Real-ESRGAN's second-order model.

    Built from ``degradation=realesrgan`` (the arguments are its keys; ``first``/``second``/``final``/``pool``
    take mappings or their frozen settings). ``last_params`` holds the sampled parameters of the latest call,
    one dict per sample; ``describe`` turns one into text. ``pair`` gives (HQ, LQ) through the training-pair pool
    (``pool.enabled``), which swaps both sides; the call gives the LQ alone and refuses while the pool is on.
    """

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        """Problems with ``degradation.*`` found before anything is built, each naming its key."""
        problems, parts = [], {}
        for name, kind in SECTIONS.items():
            try:
                parts[name] = section(kind, args[name], f"degradation.{name}")
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            return problems
        return settings_problems(parts["first"], parts["second"], tuple(args["resize_modes"]), str(args["border"]),
                                 str(args["blur"]), parts["pool"]) + quirk_problems(
            args["jpeg_codec"], args["resize_rule"], args["poisson_levels"], args["clamp_lq"])

    def __init__(
        self,
        scale: int,
        seed: int,
        kernel_size: int,
        kernel_size_range: tuple[int, int],
        sinc_omega_small: tuple[float, float],
        sinc_omega_large: tuple[float, float],
        resize_modes: tuple[str, ...],
        resize_per_sample: bool,
        antialias: bool,
        border: str,
        blur: str,
        jpeg_codec: str,
        resize_rule: str,
        poisson_levels: float | str,
        clamp_lq: bool,
        first: Stage | Mapping[str, Any],
        second: Stage | Mapping[str, Any],
        final: Final | Mapping[str, Any],
        pool: Pool | Mapping[str, Any],
    ) -> None:
        args = {"first": first, "second": second, "final": final, "pool": pool, "resize_modes": resize_modes,
                "border": border, "blur": blur, "jpeg_codec": jpeg_codec, "resize_rule": resize_rule,
                "poisson_levels": poisson_levels, "clamp_lq": clamp_lq}
        raise_problems(self.argument_problems(args), "degradation=realesrgan")
        self.settings = Settings(
            kernel_size=int(kernel_size),
            kernel_size_range=(int(kernel_size_range[0]), int(kernel_size_range[1])),
            sinc_omega_small=tuple(sinc_omega_small),
            sinc_omega_large=tuple(sinc_omega_large),
            resize_modes=tuple(str(m) for m in resize_modes),
            resize_per_sample=bool(resize_per_sample),
            antialias=bool(antialias),
            border=str(border),
            blur=str(blur),
            jpeg_codec=str(jpeg_codec),
            resize_rule=str(resize_rule),
            poisson_levels=poisson_levels if poisson_levels == RELEASE_LEVELS else float(poisson_levels),
            clamp_lq=bool(clamp_lq),
            first=section(Stage, first, "degradation.first"),
            second=section(Stage, second, "degradation.second"),
            final=section(Final, final, "degradation.final"),
        )
        pool_settings = section(Pool, pool, "degradation.pool")
        self.scale = int(scale)
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        self.last_params: list[dict[str, Any]] = []
        self.pool = PairPool(int(pool_settings.size)) if pool_settings.enabled else None

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
        """The LQ of ``hq`` in [-1, 1] (``degrade``). With the pool enabled the HQ changes too: that is ``pair``'s
        work, and this raises a ValueError saying so."""
        if self.pool is not None:
            raise ValueError("degradation.pool.enabled: the pool swaps the HQ side as well; take both from "
                             "pair(hq) (osediff_lab.data.degradation.degrade_pair)")
        return self.degrade(hq)

    def pair(self, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(HQ, LQ) in [-1, 1], passed through the training-pair pool when it is enabled (shuffles pairs across
        batches); ``hq`` itself is left as it is."""
        lq = self.degrade(hq)
        if self.pool is None:
            return hq, lq
        return self.pool(hq, lq, self.generator)

    @torch.no_grad()
    def degrade(self, hq: torch.Tensor) -> torch.Tensor:
        """The degradation itself, no pool: HQ in [-1, 1] -> LQ at exactly H/scale x W/scale, in [-1, 1] unless
        ``clamp_lq`` is false."""
        b, _, h, w = hq.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HQ size {h}x{w} is not divisible by scale {self.scale}")
        params = self.sample(b, (h, w))
        lq = self.apply(hq, params)
        p1, p2, pf = params["first"], params["second"], params["final"]
        self.last_params = [self._record(i, p1, p2, pf, params["sizes1"], params["sizes2"]) for i in range(b)]
        return lq

    def sample(self, b: int, size: tuple[int, int]) -> dict[str, Any]:
        """Every random parameter of ``b`` samples of HQ ``size``, drawn from the object's generator.

        Per-sample entries (tensors, lists) under ``first``, ``second``, ``final``, the intermediate sizes
        ``sizes1``/``sizes2`` and ``noise_seed`` (one device generator per sample); ``select_samples`` slices it.
        """
        s, g = self.settings, self.generator
        h, w = size
        lq_h, lq_w = h // self.scale, w // self.scale
        p1, p2, pf = sample_stage(b, s, s.first, g), sample_stage(b, s, s.second, g), sample_final(b, s, g)
        return {
            "first": p1,
            "second": p2,
            "final": pf,
            "sizes1": [(max(1, int(h * f)), max(1, int(w * f))) for f in p1["factor"].tolist()],
            "sizes2": [(max(1, int(lq_h * f)), max(1, int(lq_w * f))) for f in p2["factor"].tolist()],
            "noise_seed": torch.randint(0, 2**62, (b,), generator=g),
        }

    @torch.no_grad()
    def apply(self, hq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """HQ (B, 3, H, W) in [-1, 1] -> LQ with given parameters (``sample``'s, one entry per sample), in [-1, 1]
        unless ``clamp_lq`` is false: then samples whose last operation is the final resize and sinc filter
        (JPEG first) keep their overshoot, as the releases' do until their resize back clamps."""
        s = self.settings
        b, _, h, w = hq.shape
        lq_size = (h // self.scale, w // self.scale)
        p1, p2, pf = params["first"], params["second"], params["final"]
        gens = [torch.Generator(device=hq.device).manual_seed(int(s)) for s in params["noise_seed"]]
        xs = list(((hq.float() + 1) / 2).unbind(0))
        factors = p1["factor"].tolist() if s.resize_rule == "scale_factor" else None
        xs = jpeg_each(self._stage(xs, params["sizes1"], p1, gens, factors), p1["quality"], codec=s.jpeg_codec)
        xs = self._stage(xs, params["sizes2"], p2, gens)
        first = pf["jpeg_first"].tolist()
        xs = jpeg_each(xs, p2["quality"], where=first, codec=s.jpeg_codec)
        xs = blur_each(resize_each(xs, [lq_size] * b, pf["mode"], s.antialias), pf["kernels"], s.border, s.blur)
        xs = [x.clamp(0, 1) if s.clamp_lq or not f else x for x, f in zip(xs, first, strict=True)]
        x = torch.stack(jpeg_each(xs, p2["quality"], where=[not f for f in first], codec=s.jpeg_codec))
        return (x * 2 - 1).to(hq.dtype)

    def _stage(
        self, xs: list[torch.Tensor], out_sizes, p: dict[str, Any], gens: list[torch.Generator], factors=None
    ) -> list[torch.Tensor]:
        """Blur, resize (to ``out_sizes``, or by ``factors``: ``resize_rule=scale_factor``), noise (no JPEG) for
        one stage, sample by sample in groups."""
        s = self.settings
        xs = blur_each(xs, p["kernels"], s.border, s.blur)
        if factors is None:
            xs = resize_each(xs, out_sizes, p["mode"], s.antialias)
        else:
            xs = rescale_each(xs, factors, p["mode"], s.antialias)
        return noise_each(xs, p, gens, s.poisson_levels)

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
        perm = host_to_device(torch.randperm(self.size, generator=g), hq.device)
        self.hq, self.lq = self.hq[perm], self.lq[perm]
        out_hq, out_lq = self.hq[:b].clone(), self.lq[:b].clone()
        self.hq[:b], self.lq[:b] = hq, lq
        return out_hq, out_lq
