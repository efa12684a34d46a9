"""B-cos layers as plain torch functions (B-cosification, Arya et al., NeurIPS 2024; spec: explain.md E4).

Every function takes `detach`: in *explanation mode* (`detach=True`) each input-dependent factor (B-cos scale,
LayerNorm standard deviation, GELU gate) is detached, so the layer is linear in its input, `y = W(x)·x`, and a
network of them satisfies `Σ_i x_i ∂y/∂x_i = y` (plus whatever constants were added on the way). With
`detach=False` the values are the same; only the gradient differs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-6  # added to ‖x‖ so that an all-zero input (a padded patch) gives 0, not NaN


def encode(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised image z = (x − μ)/σ -> (B, 2C, H, W) `[z, −z]`.

    This *is* the [x, 1 − x] encoding normalised with means (μ, 1 − μ) and stds (σ, σ): ((1 − x) − (1 − μ))/σ = −z.
    So a model that takes the usual normalised 3-channel image computes the encoding itself, exactly.
    """
    return torch.cat([z, -z], dim=1)


def encode_weight(w: torch.Tensor) -> torch.Tensor:
    """(D, C, kh, kw) conv weight -> (D, 2C, kh, kw) `[W/2, −W/2]`: on `encode(z)` it computes exactly W ⊛ z."""
    return torch.cat([w / 2, -w / 2], dim=1)


def _scale(dot: torch.Tensor, norm: torch.Tensor, b: float, detach: bool) -> torch.Tensor:
    """(|wᵀx| / ‖x‖)^(b − 1), detached in explanation mode."""
    s = (dot.abs() / (norm + EPS)).pow(b - 1)
    return s.detach() if detach else s


def bcos_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, b: float = 2.0,
                detach: bool = False) -> torch.Tensor:
    """B-cos linear: y_j = (|w_jᵀx| / ‖x‖)^(b − 1) · w_jᵀx (+ bias_j), with the rows w_j as given (not unit-norm).

    x: (..., in); weight: (out, in). b = 1 is the plain linear layer.
    """
    dot = F.linear(x, weight)
    if b != 1:
        dot = dot * _scale(dot, x.norm(dim=-1, keepdim=True), b, detach)
    return dot if bias is None else dot + bias


def bcos_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                b: float = 2.0, detach: bool = False) -> torch.Tensor:
    """B-cos convolution: `bcos_linear` on every receptive field (‖x‖ over the field's C·kh·kw values).

    x: (B, C, H, W); weight: (D, C, kh, kw) -> (B, D, H', W').
    """
    dot = F.conv2d(x, weight, None, stride, padding)
    if b != 1:
        ones = torch.ones((1,) + tuple(weight.shape[1:]), dtype=x.dtype, device=x.device)
        norm = F.conv2d(x * x, ones, None, stride, padding).clamp_min(0).sqrt()
        dot = dot * _scale(dot, norm, b, detach)
    return dot if bias is None else dot + bias.view(1, -1, 1, 1)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               detach: bool = False) -> torch.Tensor:
    """LayerNorm over the last dim, `(x − mean) / std · γ (+ β)`.

    In explanation mode only the standard deviation is detached: centring is a linear map of x and stays live
    (a detached mean would add a constant and break `Σ x ∂y/∂x = y`).
    """
    if not detach:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    xc = x - x.mean(-1, keepdim=True)
    std = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    y = xc / std
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def gelu(x: torch.Tensor, approximate: str = "none", detach: bool = False) -> torch.Tensor:
    """GELU as `x · Φ(x)` with the gate Φ detached in explanation mode (`approximate`: 'none' or 'tanh')."""
    if not detach:
        return F.gelu(x, approximate=approximate)
    if approximate == "tanh":
        gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
    else:
        gate = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * gate.detach()
