"""EViT: identity at keep rate 1, token counts, fused token from an eager recomputation, prefix protection."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import make_variant


@pytest.mark.parametrize("name", ["plain", "registers", "layerscale", "qk_norm"])
def test_keep_rate_one_is_identity(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.accelerate(model, "evit", keep_rate=1.0, drop_loc=(0, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["no_cls_avg", "reg_no_cls"])
def test_refuses_models_without_class_token(name):
    with pytest.raises(NotImplementedError, match="evit: needs a class token"):
        vk.accelerate(make_variant(name), "evit")


def test_counts_and_flops_on_deit_small():
    model = vk.load("deit_small_patch16_224", pretrained=False).eval()
    vk.accelerate(model, "evit", keep_rate=0.7)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(x.shape[1]), owner="probe")
    gmacs = vk.info(model).gmacs  # eager attention while counting
    assert seen == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert abs(gmacs - 3.03) <= 0.05, f"{gmacs:.3f} GMACs, expected 3.03 +- 0.05 (analytic 3.029)"


def test_fused_token_is_class_attention_weighted_sum_of_dropped(images):
    model = make_variant("registers")
    runner = vk.get_runner(model)
    got = {}
    runner.add("after_attn", lambda x, ctx: got.__setitem__("before", x), owner="probe", blocks=[3])
    vk.accelerate(model, "evit", keep_rate=0.5, drop_loc=(3,))
    runner.add("after_attn", lambda x, ctx: got.__setitem__("after", x), owner="probe", blocks=[3])
    attn = model.blocks[3].attn
    attn.fused_attn = False  # eager recomputation of the full matrix, tapped after the softmax
    attn.attn_drop.register_forward_hook(lambda m, a, out: got.__setitem__("attn", out))
    with torch.no_grad():
        model(images)
    p = model.num_prefix_tokens
    a = got["attn"].mean(1)[:, 0]  # (B, N): class-token row, head-averaged
    x, y = got["before"], got["after"]
    keep = 32
    assert y.shape[1] == p + keep + 1
    for b in range(2):
        order = a[b, p:].argsort(descending=True) + p
        kept, dropped = order[:keep].sort().values, order[keep:]
        torch.testing.assert_close(y[b, p:p + keep], x[b, kept])
        torch.testing.assert_close(y[b, -1], (a[b, dropped, None] * x[b, dropped]).sum(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[b, :p], x[b, :p])


def test_registers_never_dropped_and_sizes(images):
    model = make_variant("registers")
    vk.accelerate(model, "evit", keep_rate=0.3, drop_loc=(0, 1, 2, 3, 4, 5))
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(
        (x.shape[1], ctx.state.sizes, ctx.state.source)), owner="probe")
    with torch.no_grad():
        model(images)
        _, nchw = model.forward_intermediates(images)
    p = 5
    for n, sizes, source in seen[:6]:
        assert (source >= p).all() and (sizes[:, :p] == 1).all()
        assert (sizes[:, p:].sum(1) == 64).all()  # fused token carries the dropped patches
    assert nchw[-1].shape == (2, 64, 8, 8)


def test_batch_invariance():
    model = make_variant("plain")
    vk.accelerate(model, "evit", keep_rate=0.5)
    torch.manual_seed(3)
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[1:2]), model(batch)[1:2], atol=1e-5, rtol=0)
