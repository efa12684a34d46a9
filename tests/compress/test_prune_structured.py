"""prune-structured: exact heads / channels removed (the reported ones, the least important), the result a plain
timm model that timm alone rebuilds and runs, identity at 0 %, save / load, bad input."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.layers.attention import Attention

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vitkit.compress.prune_structured import pruned_structure

SHOWN = ["plain", "qk_norm", "layerscale", "reg_no_cls"]


def sliced(model, report):
    """Expected tensors of every block: the original rows / columns at the kept indices (plain indexing)."""
    out = {}
    for r in report:
        b = model.blocks[r["block"]]
        a, d = b.attn, b.attn.head_dim
        D = a.num_heads * d
        heads = [h for h in range(a.num_heads) if h not in r["removed_heads"]]
        cols = torch.tensor([h * d + j for h in heads for j in range(d)])
        rows = torch.cat([cols + s * D for s in range(3)])  # q, k, v sections
        ch = torch.tensor([c for c in range(b.mlp.fc1.out_features) if c not in r["removed_channels"]])
        p = f"blocks.{r['block']}."
        out |= {p + "attn.qkv.weight": a.qkv.weight[rows], p + "attn.qkv.bias": a.qkv.bias[rows],
                p + "attn.proj.weight": a.proj.weight[:, cols], p + "attn.proj.bias": a.proj.bias,
                p + "mlp.fc1.weight": b.mlp.fc1.weight[ch], p + "mlp.fc1.bias": b.mlp.fc1.bias[ch],
                p + "mlp.fc2.weight": b.mlp.fc2.weight[:, ch], p + "mlp.fc2.bias": b.mlp.fc2.bias}
    return out


@pytest.mark.parametrize("variant_name", SHOWN)
def test_removes_exactly_what_it_reports(variant_name):
    model = make_variant(variant_name)
    original = copy.deepcopy(model)
    vk.compress(model, "prune-structured", heads=0.5, channels=0.3)
    report = pruned_structure(model)
    assert [len(r["removed_heads"]) for r in report] == [2] * 6  # round(0.5 · 4)
    assert [len(r["removed_channels"]) for r in report] == [80] * 6  # round(0.3 · 256 / 8) · 8 (round_to=8)
    state = model.state_dict()
    for key, expected in sliced(original, report).items():
        torch.testing.assert_close(state[key], expected, atol=0, rtol=0, msg=key)
    assert [b.attn.num_heads for b in model.blocks] == [2] * 6
    assert vk.applied(model)[0].config.kept_heads == (2,) * 6
    assert vk.applied(model)[0].config.kept_channels == (176,) * 6
    if variant_name == "qk_norm":  # per-head-dim norms are shared by the heads: never cut
        assert model.blocks[0].attn.q_norm.weight.shape == (16,)


def test_removes_the_least_important():
    model = make_variant("plain")
    with torch.no_grad():  # head 2 of block 0 and channels 3, 7, 9 of block 1 made tiny
        a = model.blocks[0].attn
        for s in range(3):
            a.qkv.weight[s * 64 + 32: s * 64 + 48] *= 0.01
        a.proj.weight[:, 32:48] *= 0.01
        model.blocks[1].mlp.fc1.weight[[3, 7, 9]] *= 0.01
        model.blocks[1].mlp.fc2.weight[:, [3, 7, 9]] *= 0.01
    vk.compress(model, "prune-structured", heads=0.25, channels=3 / 256, round_to=1)
    report = pruned_structure(model)
    assert report[0]["removed_heads"] == [2]
    assert report[1]["removed_channels"] == [3, 7, 9]


@pytest.mark.parametrize("variant_name", SHOWN)
def test_timm_alone_rebuilds_and_runs_it(variant_name, images):
    model = make_variant(variant_name)
    vk.compress(model, "prune-structured", heads=0.25, channels=0.4)
    heads, widths = vk.applied(model)[0].config.kept_heads, vk.applied(model)[0].config.kept_channels
    args = {**TINY, **VARIANTS[variant_name]}
    rebuilt = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()  # timm only from here
    for block, h, w in zip(rebuilt.blocks, heads, widths):
        block.attn = Attention(64, num_heads=h, attn_head_dim=16, qkv_bias=True, qk_norm=args.get("qk_norm", False),
                               norm_layer=timm.layers.LayerNorm)
        block.mlp = Mlp(64, hidden_features=w)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), atol=1e-6, rtol=1e-6)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_zero_is_identity_and_fewer_macs(images):
    model = make_variant("registers")
    reference = copy.deepcopy(model)
    vk.compress(model, "prune-structured", heads=0.0, channels=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=0, rtol=0)
    before = vk.info(reference).gmacs
    vk.compress(reference, "prune-structured", heads=0.5, channels=0.5)
    assert vk.info(reference).gmacs < 0.7 * before


def test_save_load_after_fine_tune(tmp_path):
    """On the embedded checkpoint (a save of the changes only): pruned, a training step, saved, loaded."""
    model = vk.load("vitkit/vit-tiny-cifar")
    vk.compress(model, "prune-structured", heads=0.25, channels=0.3)
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    vk.save(model, tmp_path / "pruned")
    loaded = vk.load(tmp_path / "pruned").eval()
    model.eval()
    assert [b.mlp.fc1.out_features for b in loaded.blocks] == [176] * 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=1.0), "`heads` must be in \\[0, 1\\), got 1.0"),
    (dict(channels=-0.1), "`channels` must be in"),
    (dict(kept_heads=(2, 2)), "`kept_heads` has 2 entries, the model 6 blocks"),
    (dict(kept_heads=(5,) * 6), "block 0: 5 > 4"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.compress(make_variant("plain"), "prune-structured", **kwargs)


def test_refuses_wrapped_linears():
    model = make_variant("plain")
    model.blocks[2].attn.qkv = torch.nn.Sequential(model.blocks[2].attn.qkv)  # as an unmerged adapter would
    with pytest.raises(ValueError, match="block 2's attn.qkv \\(Sequential\\) are wrapped.*merge adapters first"):
        vk.compress(model, "prune-structured")


def test_composes_with_token_methods_in_either_order(images):
    """Torch-Pruning cannot trace through token merging; the structure is traced without it, same result."""
    before, after = make_variant("plain"), make_variant("plain")
    vk.accelerate(before, "tome", r=4)
    vk.compress(before, "prune-structured", heads=0.25, channels=0.25)
    vk.compress(after, "prune-structured", heads=0.25, channels=0.25)
    vk.accelerate(after, "tome", r=4)
    with torch.no_grad():
        torch.testing.assert_close(before(images), after(images), atol=0, rtol=0)
    assert [a.name for a in vk.applied(before)] == ["tome", "prune-structured"]
