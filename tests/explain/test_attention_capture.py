"""Attention capture under fused SDPA: equals timm's own eager softmax, leaves the forward and flags untouched,
and follows the token layout (registers, no class token, dynamic size, prompts, merged tokens)."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from vitkit.explain.attention import attention, capture, fused_flags
from vitkit.models.runner import get_runner

from conftest import VARIANTS, make_variant

TOL = 1e-5  # issue 7: captured vs eager softmax


def eager_attention(model, x):
    """Reference: a deep copy with timm's eager path (`fused_attn=False`), softmax read at `attn_drop`'s input."""
    ref = copy.deepcopy(model)
    out, handles = {}, []
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        logits = ref(x)
    for h in handles:
        h.remove()
    return out, logits


def test_timm_attention_extract_fails_under_fused_attention(images):
    """The problem vitkit solves: timm's own extractor finds no softmax while fused SDPA is on."""
    from timm.utils import AttentionExtract

    with pytest.raises(RuntimeError, match="attn.softmax"):
        AttentionExtract(make_variant("registers"))(images)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_captured_equals_eager_softmax(name, images):
    model = make_variant(name)
    with torch.no_grad():
        plain = model(images)
    maps = attention(model, images)
    ref, eager_logits = eager_attention(model, images)
    assert sorted(maps) == list(range(len(model.blocks)))
    for i, la in maps.items():
        err = (la.attn - ref[i]).abs().max().item()
        assert err <= TOL, f"{name} block {i}: captured vs eager softmax differ by {err:.2e} > {TOL}"
        rows = (la.attn.sum(-1) - 1).abs().max().item()
        assert rows <= 1e-5, f"{name} block {i}: rows sum to 1 within {rows:.2e}"
    assert torch.equal(maps.output, plain), "capturing changed the forward output"
    assert all(fused_flags(model)), "fused_attn was flipped by the capture"
    layout = vk.token_layout(model)
    n = layout.num_prefix_tokens + 64
    assert maps[0].attn.shape == (2, 4, n, n)
    assert maps[0].patch_map().shape == (2, 8, 8)


def test_layers_subset_and_negative_index(images):
    model = make_variant("registers")
    maps = attention(model, images, layers=[-1, 0])
    assert sorted(maps) == [0, 5]
    with pytest.raises(ValueError, match="out of range"):
        attention(model, images, layers=[6])


def test_hooks_removed_after_exception(images):
    model = make_variant("plain")
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model):
            raise RuntimeError("boom")
    attn = model.blocks[0].attn
    assert not attn._forward_pre_hooks and not attn.q_norm._forward_hooks and not attn.k_norm._forward_hooks
    assert all(fused_flags(model))


def test_registers_dropped_from_patch_map(images):
    model = make_variant("registers")
    la = attention(model, images, layers=[-1])[5]
    assert la.layout.reg_indices == (1, 2, 3, 4)
    cls_row = la.heads("mean")[:, 0]
    assert torch.allclose(la.patch_map("cls").flatten(1), cls_row[:, 5:]), "patch map = cls row, patch columns only"


def test_no_class_token_mean_query(images):
    model = make_variant("reg_no_cls")
    la = attention(model, images, layers=[0])[0]
    a = la.heads("mean")
    expected = a[:, 4:, 4:].mean(1).reshape(2, 8, 8)
    assert torch.allclose(la.patch_map("cls"), expected), "no class token: 'cls' falls back to mean patch query"


@pytest.mark.parametrize("size", [(32, 48), (48, 32)])
def test_dynamic_input_size(size):
    model = make_variant("registers", dynamic_img_size=True)
    x = torch.randn(1, 3, *size)
    maps = attention(model, x)
    ref, _ = eager_attention(model, x)
    gh, gw = size[0] // 4, size[1] // 4
    assert maps[3].patch_map().shape == (1, gh, gw)
    assert maps[3].attn.shape[-1] == 5 + gh * gw
    assert (maps[3].attn - ref[3]).abs().max() <= TOL


def _insert_prompts(x, ctx, prompts):
    """Test-only VPT-shallow: insert prompts after the prefix in block 0."""
    p = ctx.state.layout.num_prefix_tokens
    ctx.state.num_prompts = prompts.shape[0]
    return torch.cat([x[:, :p], prompts.expand(x.shape[0], -1, -1), x[:, p:]], dim=1)


def test_prompts_are_their_own_tokens(images):
    model = make_variant("registers")
    prompts = torch.randn(3, 64)
    get_runner(model).add("before_block", lambda x, ctx: _insert_prompts(x, ctx, prompts), owner="test-vpt",
                          blocks=[0])
    maps = attention(model, images)
    ref, _ = eager_attention(model, images)
    la = maps[2]
    assert la.num_prompts == 3 and la.prompt_indices == (5, 6, 7)
    assert la.attn.shape[-1] == 5 + 3 + 64
    assert (la.attn - ref[2]).abs().max() <= TOL
    assert torch.allclose(la.patch_map("cls").flatten(1), la.heads()[:, 0, 8:]), "prompt columns dropped"
    assert la.query_rows(la.heads(), ("prompt", 1)).shape == (2, 72)


def _merge_pairs(x, ctx):
    """Test-only token reduction: average horizontally adjacent patch pairs, keeping sizes and source."""
    st = ctx.state
    p = st.num_prefix_tokens
    B, N, C = x.shape
    pat = x[:, p:].reshape(B, -1, 2, C).mean(2)
    gh, gw = st.grid
    st.sizes = torch.cat([torch.ones(B, p, 1), torch.full((B, pat.shape[1], 1), 2.0)], 1)
    st.source = (p + torch.arange(gh * gw) // 2).expand(B, -1).clone()
    return torch.cat([x[:, :p], pat], 1)


def test_merged_tokens_mapped_back_through_source(images):
    model = make_variant("plain")
    get_runner(model).add("after_attn", _merge_pairs, owner="test-merge", blocks=[1])
    maps = attention(model, images)
    ref, _ = eager_attention(model, images)
    la = maps[3]
    assert la.attn.shape[-1] == 1 + 32 and la.source is not None
    assert (la.attn - ref[3]).abs().max() <= TOL
    pm = la.patch_map("cls")
    assert pm.shape == (2, 8, 8)
    row = la.heads()[:, 0, 1:]
    assert torch.allclose(pm.flatten(1).sum(1), row.sum(1)), "mass over patches preserved by the unmerge"
    assert torch.allclose(pm[:, :, 0], pm[:, :, 1]), "the two patches of a merged token share its attention"


def test_after_tome_if_available(images):
    if "tome" not in {m.name for m in vk.methods()}:
        pytest.skip("tome not registered yet")
    model = make_variant("registers")
    vk.accelerate(model, "tome", r=4)
    maps = attention(model, images)
    ref, _ = eager_attention(model, images)
    for i in (0, 3, 5):
        assert (maps[i].attn - ref[i]).abs().max() <= TOL, "with ToMe's log-size attn_mask"
        assert maps[i].patch_map().shape == (2, 8, 8)
    assert maps[5].attn.shape[-1] < 5 + 64
    assert all(fused_flags(model))
