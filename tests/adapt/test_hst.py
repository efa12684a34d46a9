"""HST: the whole forward (ViT with meta-registers + side network + read-out) against a plain-torch oracle written
from adapt.md P10, stage shapes at three input sizes, the trainable count on ViT-B/16 (≈ 0.78 M), gradient
checkpointing, refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.adapt import hst
from vitkit.train import features

DIMS, HEADS = (32, 48, 64, 72), (2, 4, 8, 12)


def randomize(model, seed: int = 0) -> None:
    """Move every side-network tensor (BN statistics included) off its init, so nothing is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.startswith("hst.") and t.is_floating_point():
                noise = torch.rand(t.shape, generator=g) if "running_var" in name else torch.randn(t.shape, generator=g)
                t.copy_(t + 0.2 * noise if "running_var" not in name else 0.5 + noise)


def oracle(sd: dict, x: torch.Tensor, heads: int, num_prefix: int, groups: list[list[int]]) -> torch.Tensor:
    """Logits from the spec: per layer insert m_l after the prefix, run the block, take r_l and F_l, drop m_l,
    run the side block of that layer; stage s starts from the stem (s = 0) or a downsampling of stage s-1."""
    ln = lambda t, k, eps=1e-6: F.layer_norm(t, t.shape[-1:], sd[f"{k}.weight"], sd[f"{k}.bias"], eps)  # noqa: E731
    lin = lambda t, k: F.linear(t, sd[f"{k}.weight"], sd[f"{k}.bias"])  # noqa: E731
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    b, gh, gw = x.shape[0], x.shape[-2] // w.shape[-2], x.shape[-1] // w.shape[-1]
    prefix = [sd[k].expand(b, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    s_x = None
    for layer in range(len(sd["hst.meta"])):
        blk = f"blocks.{layer}."
        t = torch.cat([t[:, :num_prefix], sd["hst.meta"][layer].expand(b, 1, -1), t[:, num_prefix:]], 1)
        n, d = t.shape[1:]
        q, k, v = lin(ln(t, blk + "norm1"), blk + "attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        t = t + lin(a.transpose(1, 2).reshape(b, n, d), blk + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, blk + "norm2"), blk + "mlp.fc1")), blk + "mlp.fc2")
        r, t = t[:, num_prefix], torch.cat([t[:, :num_prefix], t[:, num_prefix + 1:]], 1)
        fmap = t[:, num_prefix:].transpose(1, 2).reshape(b, d, gh, gw)
        s = next(i for i, g in enumerate(groups) if layer in g)
        j = groups[s].index(layer)
        if j == 0 and s == 0:  # stem: conv3x3 s2, BN (eval), ReLU, conv2x2 s2
            y = F.conv2d(x, sd["hst.stem.0.weight"], sd["hst.stem.0.bias"], stride=2, padding=1)
            y = F.batch_norm(y, sd["hst.stem.1.running_mean"], sd["hst.stem.1.running_var"], sd["hst.stem.1.weight"],
                             sd["hst.stem.1.bias"], False, 0.0, 1e-5)
            s_x = F.conv2d(F.relu(y), sd["hst.stem.3.weight"], sd["hst.stem.3.bias"], stride=2)
        elif j == 0:  # overlapping conv3x3 s2 + LayerNorm over channels
            p = f"hst.downsamples.{s - 1}."
            y = F.conv2d(s_x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1)
            s_x = ln(y.permute(0, 2, 3, 1), p + "1.norm", 1e-5).permute(0, 3, 1, 2)
        st, sb = f"hst.stages.{s}.", f"hst.stages.{s}.blocks.{j}."
        c, h, wd = s_x.shape[1:]
        ctx = torch.stack([ln(lin(r, st + "bridge"), st + f"meta_norms.{j}", 1e-5),
                           lin(fmap.flatten(2).transpose(1, 2), st + "bridge").mean(1)], 1)  # (B, 2, c)
        tok = s_x.flatten(2).transpose(1, 2)
        nh = HEADS[s]
        qq = lin(ln(tok, sb + "norm1", 1e-5), sb + "attn.q").reshape(b, -1, nh, c // nh).transpose(1, 2)
        kk, vv = lin(ctx, sb + "attn.kv").reshape(b, 2, 2, nh, c // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(c // nh), -1) @ vv
        tok = tok + lin(att.transpose(1, 2).reshape(b, -1, c), sb + "attn.proj")
        resized = F.interpolate(fmap, size=(h, wd), mode="bilinear", align_corners=False)
        tok = tok + lin(resized.flatten(2).transpose(1, 2), st + "bridge")
        tok = tok + lin(F.gelu(lin(ln(tok, sb + "norm2", 1e-5), sb + "mlp.0")), sb + "mlp.2")
        s_x = tok.transpose(1, 2).reshape(b, c, h, wd)
    pooled = s_x.mean((2, 3))
    pooled = (pooled - sd["hst.norm.running_mean"]) / torch.sqrt(sd["hst.norm.running_var"] + 1e-5)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name", ["plain", "registers"])
def test_forward_matches_oracle(name):
    model = make_variant(name)
    vk.adapt(model, "hst")
    randomize(model)
    model.eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        got = model(x)
        expected = oracle(sd, x, heads=4, num_prefix=model.num_prefix_tokens, groups=[[0, 1], [2, 3], [4], [5]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size,patch,depth,grids", [
    (224, 16, 12, [56, 28, 14, 7]),
    (32, 4, 6, [8, 4, 2, 1]),
    (48, 4, 6, [12, 6, 3, 2]),
], ids=["224px-p16", "32px-p4", "48px-dynamic"])
def test_stage_shapes(size, patch, depth, grids):
    model = make_variant("reg_no_cls", patch_size=patch, depth=depth, img_size=32 if size == 48 else size,
                         dynamic_img_size=size == 48)
    vk.adapt(model, "hst")
    with torch.no_grad():
        maps = hst.forward_dense(model, torch.randn(1, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(1, d, g, g) for d, g in zip(DIMS, grids)]


def test_trainable_count_vit_b16():
    """Side network + meta-registers + bridges + head (100 classes) + every ViT LayerNorm, from the spec's sizes:
    0.773 M (the paper's "0.78 M")."""
    import timm

    with torch.device("meta"):  # shapes only (vk.adapt would fingerprint the weights for vk.save: apply directly)
        model = hst.apply(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100), hst.Config())
    D, L = 768, 12
    d = DIMS
    count = (3 * 9 * d[0] + d[0]) + 2 * d[0] + (4 * d[0] * d[0] + d[0])  # stem: conv, BN, conv
    count += sum(9 * a * b + b + 2 * b for a, b in zip(d[:-1], d[1:]))  # downsamples: conv + LN
    for c in d:  # 3 side blocks per stage on ViT-B: bridge + per block (meta LN, 2 LNs, q, kv, proj, MLP 4x)
        count += D * c + c + 3 * (2 * c + 4 * c + (c * c + c) + (2 * c * c + 2 * c) + (c * c + c) + 8 * c * c + 5 * c)
    count += L * D + (L * 4 * D + 2 * D) + (d[-1] * 100 + 100)  # meta-registers, ViT LayerNorms, head
    got = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got == count == 773_212


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model = make_variant("layerscale")
        vk.adapt(model, "hst")
        model.train()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "hst.meta" in grads[0] and "blocks.0.norm1.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_refusals():
    with pytest.raises(NotImplementedError, match="hst: needs at least 4 blocks"):
        vk.adapt(make_variant("plain", depth=3), "hst")
    merged = vk.accelerate(make_variant("plain"), "tome", r=2)
    with pytest.raises(NotImplementedError, match="hst: tome changes the token sequence"):
        vk.adapt(merged, "hst")
    model = vk.accelerate(vk.adapt(make_variant("plain"), "hst"), "tome", r=2)
    with pytest.raises(ValueError, match="hst: .*full grid"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="hst: `dims` and `heads` need 4 entries"):
        vk.adapt(make_variant("plain"), "hst", dims=(32, 64))


def test_composes_with_vpt_deep_in_either_order(images):
    """The meta-register lives inside one block only, so VPT-deep's per-layer prompts keep their positions: both
    orders compute the same function with the same tensors, and it differs from HST alone."""
    first = vk.adapt(vk.adapt(make_variant("registers"), "vpt", num_prompts=3, deep=True), "hst")
    second = vk.adapt(vk.adapt(make_variant("registers"), "hst"), "vpt", num_prompts=3, deep=True)
    alone = vk.adapt(make_variant("registers"), "hst")
    randomize(first)
    second.load_state_dict(first.state_dict())
    alone.load_state_dict({k: v for k, v in first.state_dict().items() if not k.startswith("vpt.")})
    with torch.no_grad():
        out = first(images)
        torch.testing.assert_close(second(images), out, atol=1e-5, rtol=1e-5)
        assert (alone(images) - out).abs().max() > 1e-3


@pytest.mark.parametrize("mutate", [lambda f: f.clone(), lambda f: f.add_(0), lambda f: f[:1]],
                         ids=["copy", "changed-in-place", "slice"])
def test_forward_head_refuses_features_of_another_forward(images, mutate):
    """The read-out uses the side features of the forward that made its input: an earlier batch's features (or a
    copy or changed features) after another forward would silently get that forward's side features."""
    model = vk.adapt(make_variant("plain"), "hst")
    randomize(model)
    other = torch.randn_like(images)
    with torch.no_grad():
        want = model(images)
        feats = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(feats), want)  # right after its forward: exact
        torch.testing.assert_close(model.forward_head(feats.detach()), want)  # an alias of the same data
        model.forward_features(other)
        with pytest.raises(ValueError, match="hst: forward_head reads side results of the forward"):
            model.forward_head(feats)  # before the fix: `other`'s logits, no error
        feats = model.forward_features(images)
        with pytest.raises(ValueError, match="hst: forward_head reads side results"):
            model.forward_head(mutate(feats), pre_logits=True)


def test_forward_head_after_forward_intermediates_and_under_inference_mode(images):
    """The other callers of forward_head: distillation taps (forward_intermediates' final features) and
    vk.evaluate's features (inference mode, whose tensors track no version)."""
    model = vk.adapt(make_variant("registers"), "hst")
    randomize(model)
    with torch.no_grad():
        want = model(images)
        final, _ = model.forward_intermediates(images, indices=[1], output_fmt="NCHW")
        torch.testing.assert_close(model.forward_head(final), want)
    logits, _ = features(model, list(zip(images, [0, 1])), logits=True)  # under inference mode
    torch.testing.assert_close(logits, want)
