"""ATS: identity without ATS blocks, the sampling facts, prefix protection, and batch independence."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import make_variant
from vitkit.tokens import ats_algo as algo


@pytest.mark.parametrize("name", ["plain", "registers", "layerscale", "qk_norm"])
def test_no_ats_blocks_is_identity(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.accelerate(model, "ats", blocks=())
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["no_cls_avg", "reg_no_cls"])
def test_refuses_models_without_class_token(name):
    with pytest.raises(NotImplementedError, match="ats: needs a class token"):
        vk.accelerate(make_variant(name), "ats")


@pytest.mark.parametrize("seed", range(5))
def test_sampling_facts_on_skewed_scores(seed):
    torch.manual_seed(seed)
    K, n = 197, 196
    scores = torch.distributions.Exponential(1.0).sample((n,)) ** 4  # skewed
    scores = scores / scores.sum()
    picked = algo.inverse_transform_sample(scores, K)
    assert len(picked) <= min(K - 1, n)
    assert int(scores.argmax()) in picked.tolist(), "the top token is always kept"
    assert int(scores.argmin()) not in picked.tolist(), "the lowest token is never kept"
    # every token whose normalised CDF jump is >= 1/(K-2) is kept
    s, order = scores.sort()
    cdf = s.cumsum(0)
    jumps = torch.diff((cdf - cdf[0]) / (cdf[-1] - cdf[0]), prepend=torch.zeros(1))
    must = set(order[jumps >= 1 / (K - 2)].tolist())
    assert must <= set(picked.tolist())
    assert torch.equal(picked, picked.sort().values)


def _peaky(name="registers", **cfg):
    """A random model with peaky attention, so the kept count varies across images."""
    model = make_variant(name)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:128] *= 6
    return vk.accelerate(model, "ats", **cfg)


def test_prefix_kept_counts_vary_and_are_bounded():
    model = _peaky(blocks=(1, 3), num_samples=40)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append((x, ctx.state.sizes, ctx.state.source)),
                             owner="probe")
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randn(6, 3, 32, 32))
    p = model.num_prefix_tokens
    x, sizes, source = seen[-1]
    kept = (sizes[:, p:, 0] > 0).sum(1)
    assert (kept <= 39).all() and len(set(kept.tolist())) > 1, kept.tolist()
    assert (sizes[:, :p] == 1).all() and ((source >= p) | (source == -1)).all()
    for b in range(6):  # padding slots are zero-size and no patch maps to them
        assert (sizes[b, p + kept[b]:] == 0).all()
        assert (source[b] < p + kept[b]).all()


def test_batch_independence_with_mixed_images():
    model = _peaky()
    torch.manual_seed(1)
    batch = torch.cat([torch.randn(3, 3, 32, 32), torch.rand(2, 1, 1, 1).expand(2, 3, 32, 32),
                       3 * torch.randn(3, 3, 32, 32)])
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(ctx.state.sizes), owner="probe")
    with torch.no_grad():
        together = model(batch)
        assert len(set((seen[-1][:, :, 0] > 0).sum(1).tolist())) > 1  # padding really happened
        for i in range(len(batch)):
            torch.testing.assert_close(model(batch[i:i + 1]), together[i:i + 1], atol=1e-5, rtol=0)


def test_intermediates_and_features(images):
    model = _peaky(num_samples=30)
    with torch.no_grad():
        final, nchw = model.forward_intermediates(images)
        assert all(t.shape == (2, 64, 8, 8) for t in nchw)
        torch.testing.assert_close(model.forward_features(images), final)


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg"])
def test_pooling_ignores_padding_slots(pool):
    """Images of one batch keep different token counts; the zero padding must not enter 'max' pooling
    (one image alone = the same image in a batch)."""
    model = make_variant("plain", global_pool=pool)
    with torch.no_grad():
        for block in model.blocks:  # peaky attention (as `_peaky`): kept counts vary across images
            block.attn.qkv.weight[:128] *= 6
        model.pos_embed.sub_(10.0)  # real tokens carry -10 in the residual stream (the norms ignore it); a
        # padding slot (zeros, then only the last MLP's constant) would win the max
    vk.accelerate(model, "ats", num_samples=40)
    torch.manual_seed(1)
    with torch.no_grad():
        x = torch.cat([torch.randn(2, 3, 32, 32), torch.rand(1, 1, 1, 1).expand(1, 3, 32, 32),
                       3 * torch.randn(1, 3, 32, 32)])
        batched = model(x)
        counts = (vk.get_runner(model).state.sizes[..., 0] > 0).sum(1)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert len(set(counts.tolist())) > 1, "the test needs images with different token counts"
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
