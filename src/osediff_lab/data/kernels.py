"""Blur kernels of the Real-ESRGAN degradation as pure, batched torch functions (each kernel sums to 1).

Every function takes per-sample parameter tensors of shape (B,) and returns kernels (B, size, size);
``sample_kernels`` draws a kernel per sample from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets (x, y) from the centre of an odd ``size`` x ``size`` window."""
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _normalise(k: torch.Tensor) -> torch.Tensor:
    return (k / k.sum(dim=(-2, -1), keepdim=True)).float()


def mahalanobis(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Q = p^T S^-1 p per pixel offset p, with S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T; shape (B, size, size)."""
    xx, yy = _grid(size, sigma_x.device)
    c, s = torch.cos(theta.double()), torch.sin(theta.double())
    sx2, sy2 = sigma_x.double() ** 2, sigma_y.double() ** 2
    # Rotating the offsets into the kernel's principal axes: u along sigma_x, v along sigma_y.
    u = c[:, None, None] * xx + s[:, None, None] * yy
    v = -s[:, None, None] * xx + c[:, None, None] * yy
    return u**2 / sx2[:, None, None] + v**2 / sy2[:, None, None]


def generalized_gaussian_kernel(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """exp(-0.5 Q^beta), normalised; beta = 1 is the (an)isotropic Gaussian."""
    q = mahalanobis(size, sigma_x, sigma_y, theta)
    return _normalise(torch.exp(-0.5 * q ** beta.double()[:, None, None]))


def gaussian_kernel(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """exp(-0.5 Q), normalised: isotropic when sigma_x == sigma_y."""
    return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, torch.ones_like(sigma_x))


def plateau_kernel(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """1 / (1 + Q^beta), normalised: a flat top with heavy tails."""
    q = mahalanobis(size, sigma_x, sigma_y, theta)
    return _normalise(1.0 / (1.0 + q ** beta.double()[:, None, None]))


def sinc_kernel(size: int, omega: torch.Tensor) -> torch.Tensor:
    """Ideal circular low-pass with cutoff ``omega`` (rad/pixel): omega J1(omega r) / (2 pi r), normalised.

    Its centre value is the r -> 0 limit omega^2 / (4 pi).
    """
    xx, yy = _grid(size, omega.device)
    r = torch.sqrt(xx**2 + yy**2)
    w = omega.double()[:, None, None]
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    k = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    return _normalise(torch.where(r > 0, k, w**2 / (4 * math.pi)))


def pad_to(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad odd (B, k, k) kernels symmetrically to (B, size, size)."""
    p = (size - kernels.shape[-1]) // 2
    return torch.nn.functional.pad(kernels, (p, p, p, p))


def window(kernels: torch.Tensor, ksize: torch.Tensor) -> torch.Tensor:
    """Zero every tap outside each sample's centred ``ksize`` x ``ksize`` window and renormalise.

    Equivalent to evaluating the kernel on a ksize grid and zero-padding it to the full size.
    """
    size = kernels.shape[-1]
    xx, yy = _grid(size, kernels.device)
    half = ((ksize.to(kernels.device) - 1) / 2).double()[:, None, None]
    inside = (xx.abs() <= half) & (yy.abs() <= half)
    return _normalise(kernels.double() * inside)


@dataclass(frozen=True)
class KernelSpec:
    """The distribution one blur stage draws its kernels from (Real-ESRGAN's kernel_list/probs/ranges).

    ``omega_small``/``omega_large`` are sinc cutoffs as fractions of pi, for kernel sizes below / from 13.
    """

    size: int
    ksize_range: tuple[int, int]
    types: tuple[str, ...]
    probs: tuple[float, ...]
    sinc_prob: float
    sigma_range: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    omega_small: tuple[float, float]
    omega_large: tuple[float, float]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _split_beta(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """Shape parameter: half the time from [lo, 1], half from [1, hi], so both sides of 1 are as likely."""
    low, high = _uniform(n, lo, min(1.0, hi), g), _uniform(n, max(1.0, lo), hi, g)
    return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, low, high)


def sample_kernels(n: int, spec: KernelSpec, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` kernels (n, size, size) on the CPU with their parameters; a fixed number of draws per call.

    Params: ``type`` (index into KERNEL_TYPES, or -1 for sinc), ``ksize``, ``sigma_x``, ``sigma_y``,
    ``theta``, ``beta``, ``omega`` (rad/pixel, for sinc).
    """
    for t in spec.types:
        if t not in KERNEL_TYPES:
            raise ValueError(f"kernel type '{t}' is unknown; choose from {KERNEL_TYPES}")
    lo, hi = spec.ksize_range
    if lo % 2 == 0 or hi % 2 == 0 or not 1 <= lo <= hi <= spec.size:
        raise ValueError(f"kernel size range {spec.ksize_range} must hold odd sizes up to {spec.size}")
    ksize = lo + 2 * torch.randint(0, (hi - lo) // 2 + 1, (n,), generator=g)
    sinc = torch.rand(n, generator=g, dtype=torch.float64) < spec.sinc_prob
    pick = torch.multinomial(torch.tensor(spec.probs, dtype=torch.float64), n, replacement=True, generator=g)
    kind = torch.tensor([KERNEL_TYPES.index(spec.types[i]) for i in pick.tolist()], dtype=torch.long)
    sx = _uniform(n, *spec.sigma_range, g)
    sy_draw = _uniform(n, *spec.sigma_range, g)
    theta_draw = _uniform(n, -math.pi, math.pi, g)
    betag, betap = _split_beta(n, *spec.betag_range, g), _split_beta(n, *spec.betap_range, g)
    omega = math.pi * torch.where(ksize < 13, _uniform(n, *spec.omega_small, g), _uniform(n, *spec.omega_large, g))

    aniso = kind % 2 == 1
    sy = torch.where(aniso, sy_draw, sx)
    theta = torch.where(aniso, theta_draw, torch.zeros_like(theta_draw))
    beta = torch.where(kind >= 4, betap, torch.where(kind >= 2, betag, torch.ones_like(betag)))
    gauss = generalized_gaussian_kernel(spec.size, sx, sy, theta, beta)
    plateau = plateau_kernel(spec.size, sx, sy, theta, beta)
    kernels = torch.where((kind >= 4)[:, None, None], plateau, gauss)
    kernels = torch.where(sinc[:, None, None], sinc_kernel(spec.size, omega), kernels)
    kind = torch.where(sinc, torch.full_like(kind, -1), kind)
    params = {"type": kind, "ksize": ksize, "sigma_x": sx, "sigma_y": sy, "theta": theta, "beta": beta, "omega": omega}
    return window(kernels, ksize), params


def describe_kernel(params: dict[str, torch.Tensor], i: int) -> str:
    """A short human-readable description of sample ``i``'s kernel."""
    k = int(params["ksize"][i])
    t = int(params["type"][i])
    if t < 0:
        return f"sinc k{k} w={float(params['omega'][i]) / math.pi:.2f}pi"
    name = KERNEL_TYPES[t].replace("generalized", "gen")
    text = f"{name} k{k} s={float(params['sigma_x'][i]):.2f}"
    if t % 2:
        text += f"/{float(params['sigma_y'][i]):.2f} th={math.degrees(float(params['theta'][i])):.0f}"
    if t >= 2:
        text += f" b={float(params['beta'][i]):.2f}"
    return text
