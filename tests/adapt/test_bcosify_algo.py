"""vitkit/adapt/bcosify_algo.py beyond test_bcosify.py's model oracle: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- kept biases (`bias=True`), LayerNorm without affine
weights, the tanh GELU (`gelu_tanh` ViTs), convolutions with padding, float64 inputs, receptive fields with a
norm below 1 or near 0, the gradient outside explanation mode, and the functions' defaults (b = 2, detach off).
Expected values are the spec's formulas written out per element / per receptive field (torch.nn.functional.unfold)
here; nothing from vitkit computes them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitkit.adapt.bcosify_algo import EPS, bcos_conv2d, bcos_linear, gelu, layer_norm


def bcos_formula(x, w, b):
    """y_j = (|w_jᵀx| / (‖x‖ + 1e-6))^(b − 1) · w_jᵀx over the last dim, nothing detached."""
    dot = x @ w.T
    return (dot.abs() / (x.norm(dim=-1, keepdim=True) + 1e-6)) ** (b - 1) * dot


def test_bcos_linear_defaults_bias_and_gradient():
    torch.manual_seed(0)
    x, w, bias = torch.randn(3, 6, requires_grad=True), torch.randn(4, 6), torch.randn(4)
    got = bcos_linear(x, w, bias)  # defaults: b = 2, gradient through the scale
    expected = bcos_formula(x, w, 2.0) + bias
    torch.testing.assert_close(got, expected)
    g = torch.randn(3, 4)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expected, x, g)[0])


def test_bcos_scale_is_non_negative_on_tiny_inputs():
    """‖x‖ below EPS: the scale (|wᵀx| / (‖x‖ + EPS))^(b − 1) stays >= 0 (y keeps the sign of wᵀx), also for
    b = 2.5 (no NaN)."""
    torch.manual_seed(1)
    x, w = 1e-8 * torch.randn(5, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    assert float(x.norm(dim=-1).max()) < EPS
    for b in (2.0, 2.5):
        y = bcos_linear(x, w, b=b)
        assert torch.isfinite(y).all() and torch.equal(y.sign(), (x @ w.T).sign())


def test_bcos_conv2d_defaults_padding_small_norms_and_float64():
    torch.manual_seed(2)
    w, bias = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for x, stride, padding in (((0.01 * torch.randn(2, 2, 6, 6, dtype=torch.float64)).requires_grad_(), 1, 0),
                               (torch.randn(2, 2, 7, 7, dtype=torch.float64), 2, 1)):
        fields = F.unfold(x, 3, padding=padding, stride=stride).transpose(1, 2)  # (B, L, C·3·3)
        side = (x.shape[-1] + 2 * padding - 3) // stride + 1
        expected = (bcos_formula(fields, w.flatten(1), 2.0) + bias).transpose(1, 2).reshape(2, 4, side, side)
        if stride == 1 and padding == 0:
            got = bcos_conv2d(x, w, bias)  # defaults: stride 1, no padding, b = 2, gradient through the scale
            g = torch.randn_like(got)
            torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expected, x, g)[0])
        else:
            got = bcos_conv2d(x, w, bias, stride, padding, b=2.0)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected)


def test_layer_norm_bias_no_affine_and_gradient():
    torch.manual_seed(3)
    x, w, bias = torch.randn(2, 3, 8, requires_grad=True), torch.randn(8), torch.randn(8)
    xc = x - x.mean(-1, keepdim=True)
    std = (xc.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    expected = xc / std * w + bias
    g = torch.randn(2, 3, 8)
    for detach in (False, True):
        torch.testing.assert_close(layer_norm(x, w, bias, 1e-6, detach), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_norm(x, None, None, 1e-6, True), xc / std, atol=1e-5, rtol=1e-5)
    got = layer_norm(x, w, bias, 1e-6)  # default: the full LayerNorm gradient
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expected, x, g)[0],
                               atol=1e-5, rtol=1e-5)


def test_gelu_exact_and_tanh_values_and_explanation_gradient():
    torch.manual_seed(4)
    x = 3 * torch.randn(50, dtype=torch.float64, requires_grad=True)
    exact = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    tanh = lambda t: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))  # noqa: E731
    for approximate, gate in (("none", exact), ("tanh", tanh)):
        for detach in (False, True):
            y = gelu(x, approximate, detach)
            torch.testing.assert_close(y, x * gate(x))
            grad = torch.autograd.grad(y.sum(), x)[0]
            expected = gate(x) if detach else torch.autograd.grad((x * gate(x)).sum(), x)[0]
            torch.testing.assert_close(grad, expected.detach())
    y = gelu(x)  # defaults: exact, gradient through the gate
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0],
                               torch.autograd.grad((x * exact(x)).sum(), x)[0])
