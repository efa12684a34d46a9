"""The block runner: exactly timm's block with nothing registered; extension points compose in order."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import Block

import vitkit as vk
from vitkit.models import runner as runner_mod
from conftest import VARIANTS, make_variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_empty_runner_equals_timm_block(name):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    runner = vk.get_runner(model)
    x = torch.randn(2, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    with torch.no_grad():
        for block, ref_block in zip(model.blocks, reference.blocks):
            torch.testing.assert_close(block(x), Block.forward(ref_block, x), atol=1e-6, rtol=0)
            torch.testing.assert_close(runner.run_block(block, 0, x), ref_block(x), atol=1e-6, rtol=0)
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(images), reference(images), atol=1e-6, rtol=0)
        _, ours = model.forward_intermediates(images)
        _, theirs = reference.forward_intermediates(images)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_extension_points_run_in_documented_order():
    model = make_variant("plain")
    runner = vk.get_runner(model)
    calls = []
    for point in reversed(runner_mod.POINTS):  # registered out of order on purpose
        runner.add(point, lambda x, ctx, p=point: calls.append((ctx.index, p)), owner="probe", blocks=[2])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [(2, p) for p in runner_mod.POINTS]
    runner.remove("probe")
    assert runner.owners() == []


def test_mlp_parallel_branch_sees_residual_stream_and_adds():
    model = make_variant("layerscale")
    reference = copy.deepcopy(model)
    runner = vk.get_runner(model)
    runner.add("mlp_parallel", lambda x, ctx: 0.5 * x, owner="half")
    block, ref = model.blocks[0], reference.blocks[0]
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        x1 = x + ref.drop_path1(ref.ls1(ref.attn(ref.norm1(x))))
        expected = x1 + ref.ls2(ref.mlp(ref.norm2(x1))) + 0.5 * x1
        torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=0)


def _insert_prompts(x, ctx, n=3):
    if ctx.index == 0:
        p = ctx.state.layout.num_prefix_tokens
        ctx.state.num_prompts = n
        prompts = torch.ones(x.shape[0], n, x.shape[2])
        return torch.cat([x[:, :p], prompts, x[:, p:]], dim=1)
    return None


@pytest.mark.parametrize("name", ["plain", "registers", "no_cls_avg"])
def test_prompts_are_prefix_and_stripped_before_norm(name):
    model = make_variant(name)
    runner = vk.get_runner(model)
    runner.add("before_block", _insert_prompts, owner="prompts")
    seen = []
    runner.add("after_block", lambda x, ctx: seen.append((x.shape[1], ctx.state.num_prefix_tokens)), owner="probe")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        assert model(images).shape == (2, 10)
        final, inter = model.forward_intermediates(images, indices=[1, 5])
    p = model.num_prefix_tokens
    assert features.shape[1] == p + 64  # prompts gone
    assert seen[0] == (p + 3 + 64, p + 3)
    assert [t.shape for t in inter] == [(2, 64, 8, 8)] * 2 and final.shape == features.shape


def test_attn_bias_reaches_fused_sdpa():
    model = make_variant("plain")
    reference = copy.deepcopy(model)
    n = 65
    bias = torch.zeros(1, 1, 1, n)
    bias[..., 1:] = float("-inf")  # every query attends to the class token only
    vk.get_runner(model).add("attn_bias", lambda x, ctx: bias, owner="mask")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(images)
        assert all(b.attn.fused_attn for b in model.blocks)
        expected = reference(images, attn_mask=torch.isfinite(bias).expand(2, 1, n, n))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_non_vit_is_refused():
    with pytest.raises(NotImplementedError, match="timm VisionTransformer"):
        vk.get_runner(torch.nn.Linear(2, 2))


# --- issue 11.11: the token state belongs to one call, not to the model ---------------------------------------

def test_two_threads_with_different_sizes_and_tome_keep_their_own_state():
    """Both threads are inside a forward at once (a barrier in a block hook); each must see its own state."""
    import threading

    model = make_variant("plain", dynamic_img_size=True)
    vk.accelerate(model, "tome", r=6)
    small, large = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = {"small": model(small), "large": model(large)}
    barrier = threading.Barrier(2, timeout=20)
    hook = model.blocks[2].register_forward_hook(lambda *a: [barrier.wait(), None][1])
    results, errors = {}, []

    def run(name, x):
        try:
            with torch.no_grad():
                results[name] = model(x)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(err).__name__}: {err}")
            barrier.abort()

    threads = [threading.Thread(target=run, args=a) for a in (("small", small), ("large", large))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    hook.remove()
    assert not errors, errors
    for name in expected:
        torch.testing.assert_close(results[name], expected[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,config", [("tome", dict(r=6)), ("evit", dict(keep_rate=0.5)), ("gtp", {}),
                                           ("ats", {})])
def test_reentrant_forward_from_a_hook(method, config):
    """An explainer calling the model inside a forward hook must not disturb the outer forward."""
    model = make_variant("plain", dynamic_img_size=True)
    vk.accelerate(model, method, **config)
    outer_x, inner_x = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected_outer, expected_inner = model(outer_x), model(inner_x)
        expected_features = model.forward_features(inner_x)
    inner = {}

    def hook(module, args, out):
        if not inner:  # once (the inner forward runs this hook too)
            inner["busy"] = True
            inner["logits"] = model(inner_x)
            inner["features"] = model.forward_features(inner_x)
            inner["state_grid"] = vk.get_runner(model).state.grid  # back in the outer call

    handle = model.blocks[1].register_forward_hook(hook)
    with torch.no_grad():
        outer = model(outer_x)
    handle.remove()
    torch.testing.assert_close(outer, expected_outer, atol=1e-5, rtol=0)
    torch.testing.assert_close(inner["logits"], expected_inner, atol=1e-5, rtol=0)
    torch.testing.assert_close(inner["features"], expected_features, atol=1e-5, rtol=0)
    assert inner["state_grid"] == (8, 8)


def test_block_alone_after_a_forward_gets_a_fresh_state():
    """After a ToMe forward (state shrunk to the last block's tokens) a block called alone starts afresh and
    computes what the same block computes first in a forward."""
    model = make_variant("plain")
    vk.accelerate(model, "tome", r=6)
    seen = {}
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        handle.remove()
        assert vk.get_runner(model).state.sizes.shape[1] < 65  # the last call's state, merged
        alone = model.blocks[0](seen["x"])
    torch.testing.assert_close(alone, seen["y"], atol=1e-6, rtol=0)


def test_state_accessor_is_the_last_completed_call_of_this_thread():
    import threading

    model = make_variant("plain", dynamic_img_size=True)
    runner = vk.get_runner(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 48, 48))
    assert runner.state.grid == (12, 12)
    other = []
    t = threading.Thread(target=lambda: other.append(runner.state))
    t.start()
    t.join()
    assert other == [None]  # another thread has no completed call of its own
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert runner.state.grid == (8, 8)
