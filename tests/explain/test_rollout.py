"""Attention rollout (Abnar & Zuidema 2020) and `vk.explain` heatmaps: exact cases from the algorithm, the legacy
vit-explain bug reproduced only on request, and shapes that follow the input size and grid."""
from __future__ import annotations

from functools import partial

import pytest
import torch

import vitkit as vk
from vitkit.explain import rollout_algo as algo
from vitkit.explain.attention import AttentionMaps, LayerAttention, fused_flags
from vitkit.explain.maps import rollout_map

from conftest import make_variant

P, G = 1, 16  # one class token, 4x4 grid
N = P + G


def fake_maps(attn: torch.Tensor, depth: int = 3, name: str = "plain") -> AttentionMaps:
    """AttentionMaps holding the same (B, h, N, N) attention in every layer."""
    layout = vk.token_layout(make_variant(name, img_size=16))
    maps = AttentionMaps()
    for i in range(depth):
        maps[i] = LayerAttention(i, attn, layout, (4, 4))
    return maps


def test_uniform_attention_gives_uniform_map():
    maps = fake_maps(torch.full((2, 4, N, N), 1.0 / N))
    m = rollout_map(maps, discard_ratio=0.0)
    assert torch.allclose(m, torch.ones(2, 4, 4)), f"uniform attention -> uniform map, got {m}"


def test_attention_to_one_patch_gives_one_hot():
    j = 5
    a = torch.zeros(1, 2, N, N)
    a[..., P + j] = 1.0
    m = rollout_map(fake_maps(a)).flatten()
    assert m[j] == 1 and m.sum() == 1, f"one-hot at patch {j}, got {m}"


def test_identity_attention_gives_zeros_with_warning():
    a = torch.eye(N).expand(1, 2, N, N)
    with pytest.warns(RuntimeWarning, match="all zeros"):
        m = rollout_map(fake_maps(a))
    assert torch.equal(m, torch.zeros(1, 4, 4)) and not m.isnan().any()


def test_residual_rows_sum_to_one_and_batch_independence():
    torch.manual_seed(0)
    a = torch.rand(3, 4, N, N).softmax(-1)
    step = algo.residual_step(algo.discard(algo.fuse_heads(a, "max"), 0.5, protect=0))
    assert torch.allclose(step.sum(-1), torch.ones(3, N))
    full = rollout_map(fake_maps(a), head_fusion="max", discard_ratio=0.5)
    single = rollout_map(fake_maps(a[1:2]), head_fusion="max", discard_ratio=0.5)
    assert torch.allclose(full[1:2], single), "each sample's map is independent of the batch"


def test_discard_keeps_query_diagonal():
    a = torch.zeros(1, N, N)
    a[0, 0, 0] = 1e-9  # the smallest entry, but it is the query token's diagonal
    a[0, 1:, :] = 1.0
    kept = algo.discard(a, 0.9, protect=0)
    assert kept[0, 0, 0] == 1e-9
    assert (kept == 0).sum() == int(N * N * 0.9)


def test_legacy_equals_correct_at_discard_0_and_differs_at_09():
    torch.manual_seed(0)
    a = torch.rand(1, 4, N, N).softmax(-1)
    maps = fake_maps(a, depth=4)
    same = (rollout_map(maps, discard_ratio=0.0, legacy=True) - rollout_map(maps, discard_ratio=0.0)).abs().max()
    diff = (rollout_map(maps, discard_ratio=0.9, legacy=True) - rollout_map(maps, discard_ratio=0.9)).abs().max()
    assert same <= 1e-6, f"legacy vs correct at discard 0: {same:.2e}"
    assert diff > 1e-3, f"legacy must differ at discard 0.9 (vit-explain#16), got {diff:.2e}"


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_head_fusion(head_fusion):
    a = torch.rand(1, 3, N, N).softmax(-1)
    expected = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[head_fusion]
    assert torch.equal(algo.fuse_heads(a, head_fusion), expected)
    with pytest.raises(ValueError, match="head_fusion"):
        algo.fuse_heads(a, "median")


@pytest.mark.parametrize("method", ["attention", "rollout", "grad_rollout", "gradcam"])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_heatmap_shapes_follow_input_size(method, size):
    model = make_variant("registers", dynamic_img_size=True)
    x = torch.randn(2, 3, *size)
    e = vk.explain(model, x, method=method)
    assert e.heatmap.shape == (2, *size)
    assert e.patch_map.shape == (2, size[0] // 4, size[1] // 4)
    assert e.heatmap.max() <= 1 + 1e-6 and e.heatmap.min() >= 0
    assert all(fused_flags(model))


def test_explain_from_image_file(tmp_path):
    from PIL import Image

    model = make_variant("no_cls_avg")
    path = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(path)
    e = vk.explain(model, path, method="attention", layer=2, head=1)
    assert e.heatmap.shape == (1, 32, 32) and e.image.size == (32, 32)
    png, npy = e.save(tmp_path / "heat.png")
    assert png.exists() and npy.exists()


@pytest.mark.parametrize("name", ["registers", "reg_no_cls", "qk_norm"])
def test_attention_gradient_equals_eager_autograd(name, images):
    """grad_rollout's ∂y/∂A = ∂y/∂(A·V)·Vᵀ under fused SDPA equals autograd through timm's eager softmax."""
    import copy

    from vitkit.explain.maps import attention_gradients

    model = make_variant(name)
    maps, grads, ids = attention_gradients(model, images, target=3)
    ref, store = copy.deepcopy(model), {}

    def keep(i, module, args, out):
        out.retain_grad()
        store[i] = out

    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(partial(keep, i))
    ref(images)[:, 3].sum().backward()
    err = max((grads[i] - store[i].grad).abs().max().item() for i in grads)
    assert err <= 1e-5, f"dy/dA vs eager autograd: {err:.2e}"
    assert ids == [3, 3] and all(p.grad is None for p in model.parameters())
    assert all(fused_flags(model))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown `method`"):
        vk.explain(make_variant("plain"), torch.randn(1, 3, 32, 32), method="lime")
