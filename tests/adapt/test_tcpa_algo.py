"""vitkit/adapt/tcpa_algo.py beyond test_tcpa.py's block oracle: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- another method's additive attention mask (`bias`), the
masks as bool tensors, and VFPT's Fourier transform of the prompts (`fourier=True`). Expected values from loops
and numpy's FFT; nothing from vitkit computes them."""
from __future__ import annotations

import math

import numpy as np
import torch

from vitkit.adapt.tcpa_algo import allowed_keys, fourier, masked_attention, slot_columns


def test_masked_attention_adds_the_bias_before_the_softmax_and_masks_after():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8)
    bias = torch.zeros(2, 1, 4, 6)
    bias[:, :, :, 1] = float("-inf")  # another method hides key 1
    bias[1, :, :, 2] = 0.7
    allowed = torch.rand(2, 4, 6) > 0.3
    got = masked_attention(q, k, 0.125, allowed, bias)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                logits = [float(q[b, h, i] @ k[b, h, j]) * 0.125 + float(bias[b, 0, i, j]) for j in range(6)]
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                expected = torch.tensor([e[j] / sum(e) * bool(allowed[b, i, j]) for j in range(6)])
                torch.testing.assert_close(got[b, h, i], expected, atol=1e-6, rtol=1e-5)


def test_slot_columns_and_allowed_keys_are_the_spec_masks():
    idx = torch.tensor([[[2, 0], [1, 2]]])  # (B=1, n=2, k=2) of 3 slots
    cols = slot_columns(idx, 3, 2)
    assert cols.dtype == torch.bool
    assert cols.tolist() == [[[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]]
    cls_cols = torch.tensor([[True, False, True]])  # (B, p_cls = 3)
    patch_cols = torch.tensor([[[True, False], [False, True]]])  # rows 2, 3: (B, 2, p_img = 2)
    mask = allowed_keys(4, 0, 2, cls_cols, patch_cols)  # row 0: class token, row 1: a register
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [[[1, 1, 1, 1, 1, 0, 1, 0, 0],
                                    [1, 1, 1, 1, 0, 0, 0, 0, 0],
                                    [1, 1, 1, 1, 0, 0, 0, 1, 0],
                                    [1, 1, 1, 1, 0, 0, 0, 0, 1]]]


def test_fourier_is_the_real_part_of_the_2d_fft_over_tokens_and_width():
    torch.manual_seed(1)
    prompts = torch.randn(3, 5, 8, dtype=torch.float64)  # (slots, tokens, D)
    got = fourier(prompts)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.from_numpy(np.fft.fft2(prompts.numpy(), axes=(-2, -1)).real),
                               atol=1e-4, rtol=1e-5)
