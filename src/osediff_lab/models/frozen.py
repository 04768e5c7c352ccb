"""Frozen base weights in 8 bits (``generator.frozen_dtype=fp8_e4m3``): each frozen Linear and Conv2d of the denoiser
keeps its weight in torch.float8_e4m3fn with one fp32 scale per output channel (the channel's largest magnitude maps
to e4m3's largest finite value, 448) and dequantises it to the compute dtype in its forward; every other frozen tensor
is stored in bf16. LoRA layers wrap these modules unchanged and stay trainable in fp32. Relative error per weight:
at most 2^-4 (three mantissa bits), against bf16's 2^-8 (tests/test_frozen_storage.py bounds both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from osediff_lab.dtypes import DTYPES

FP8_E4M3 = "fp8_e4m3"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
# generator.frozen_dtype -> the dtype of the frozen tensors not held in 8 bits (all of them for fp32 / bf16 / fp16)
FROZEN_DTYPES: dict[str, torch.dtype] = DTYPES | {FP8_E4M3: torch.bfloat16}


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, ...) as e4m3 values and fp32 scales shaped (out, 1, ...): weight ~ values * scales."""
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(FP8), scale


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class FP8Matmul(torch.autograd.Function):
    """A Linear or Conv2d on an e4m3 weight that saves the 8-bit weight for backward, not its dequantised copy (which
    would put every layer's weight back in full precision in the graph), and dequantises again for the input's
    gradient; the frozen weight and bias get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FP8Weight, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_shape = x.shape
        ctx.save_for_backward(values, scale)
        weight, bias = layer.dequantized(x.dtype)
        return layer.apply_weight(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        values, scale = ctx.saved_tensors
        weight = values.to(grad.dtype) * scale.to(grad.dtype)
        return ctx.layer.input_grad(ctx.input_shape, weight, grad), None, None, None


class FP8Weight(nn.Module):
    """A frozen weight in e4m3 with per-output-channel scales (buffers: they move with the module, and no optimiser
    or trained-tensor list sees them) and the bias in ``bias_dtype``, run in the input's compute dtype (autocast's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bias_dtype: torch.dtype) -> None:
        super().__init__()
        values, scale = quantize_fp8(weight)
        self.register_buffer("weight_fp8", values)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype))

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in ``dtype`` (a temporary of one layer's size)."""
        weight = self.weight_fp8.to(dtype) * self.weight_scale.to(dtype)
        return weight, None if self.bias is None else self.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8Matmul.apply(x.to(compute_dtype(x)), self, self.weight_fp8, self.weight_scale)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's op on ``x`` with this weight and bias."""
        raise NotImplementedError

    def input_grad(self, shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the op's input (of ``shape``) from its output's ``grad``."""
        raise NotImplementedError


class FP8Linear(FP8Weight):
    """A frozen nn.Linear stored in e4m3 (``FP8Weight``)."""

    def __init__(self, linear: nn.Linear, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(linear.weight, linear.bias, bias_dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def input_grad(self, shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad @ weight


class FP8Conv2d(FP8Weight):
    """A frozen zero-padded nn.Conv2d stored in e4m3 (``FP8Weight``)."""

    def __init__(self, conv: nn.Conv2d, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"FP8Conv2d stores zero-padded convolutions; this one pads '{conv.padding_mode}'")
        super().__init__(conv.weight, conv.bias, bias_dtype)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)


def fp8_replacement(module: nn.Module) -> nn.Module | None:
    """The e4m3 module for a frozen Linear or zero-padded Conv2d; None for anything else (trained, other layers)."""
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return None
    if type(module) is nn.Linear:
        return FP8Linear(module)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        return FP8Conv2d(module)
    return None


def store_fp8(*models: nn.Module) -> int:
    """Replace every frozen Linear and Conv2d of ``models`` outside LoRA adapters by its e4m3 module, in place; a layer
    several models hold (``models.lora.shared_base_copy``) becomes one module they all hold. Returns the count."""
    done: dict[int, nn.Module | None] = {}
    for model in models:
        for parent_name, parent in list(model.named_modules()):
            if any(part.startswith("lora_") for part in parent_name.split(".")):
                continue  # an adapter's own Linear / Conv2d (frozen ones too: PiSA-SR's pixel set)
            for name, child in list(parent.named_children()):
                if name.startswith("lora_") or type(child) not in (nn.Linear, nn.Conv2d):
                    continue
                if id(child) not in done:
                    done[id(child)] = fp8_replacement(child)
                if done[id(child)] is not None:
                    setattr(parent, name, done[id(child)])
    return sum(m is not None for m in done.values())
