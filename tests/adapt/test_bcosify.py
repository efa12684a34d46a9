"""B-cosification (spec: shared/methods/explain.md E4): the 6-channel input conversion is exact, the converted
forward equals a plain-torch oracle written from the formulas (on the original model's weights), and the
contribution maps are complete: Σ pixels + Σ constant tokens + log(1/(C−1)) = the logit, on every variant."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import vitkit as vk
from conftest import VARIANTS, make_variant
from vitkit.cli import main

MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])


# ---------------------------------------------------------------- oracle: a B-cosified timm ViT from the spec
def bcos(x, w, b=2.0, detach=False):
    """B-cos linear, b = 2, unnormalised rows: y = (|wᵀx| / ‖x‖)^(b−1) · wᵀx."""
    lin = x @ w.T
    s = (lin.abs() / (x.norm(dim=-1, keepdim=True) + 1e-6)) ** (b - 1)
    return (s.detach() if detach else s) * lin


def ln(x, w, eps, detach=False):
    """LayerNorm without bias; explanation mode detaches the std (the centring is linear)."""
    xc = x - x.mean(-1, keepdim=True)
    sd = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return xc / (sd.detach() if detach else sd) * w


def oracle(orig, x6, detach=False, consts=None):
    """Logits of `orig` (the untouched timm ViT) B-cosified by hand, on the encoded 6-channel input x6.

    `consts` (dict) receives the class / register tokens and position embeddings as leaves, so that their
    contributions can be read with autograd.
    """
    sd = {k: v.detach().clone() for k, v in orig.state_dict().items()}
    consts = {} if consts is None else consts
    for k in ("cls_token", "reg_token", "pos_embed"):
        if k in sd:
            consts[k] = sd[k].requires_grad_(True)
    p = orig.patch_embed.patch_size[0]
    W = sd["patch_embed.proj.weight"]
    W6 = torch.cat([W / 2, -W / 2], 1)  # [x, 1 − x] encoding: first conv weight -> [W/2, −W/2]
    patches = F.unfold(x6, p, stride=p).transpose(1, 2)  # (B, L, 6·p·p)
    t = bcos(patches, W6.flatten(1), detach=detach)
    prefix = [consts[k].expand(t.shape[0], -1, -1) for k in ("cls_token", "reg_token") if k in consts]
    if orig.no_embed_class:
        t = torch.cat(prefix + [t + consts["pos_embed"]], 1)
    else:
        t = torch.cat(prefix + [t], 1) + consts["pos_embed"]
    eps, h = orig.blocks[0].norm1.eps, orig.blocks[0].attn.num_heads
    B, N, D = t.shape
    for i in range(len(orig.blocks)):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        u = ln(t, g("norm1.weight"), eps, detach)
        q, k, v = (u @ g("attn.qkv.weight").T).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        if f"blocks.{i}.attn.q_norm.weight" in sd:
            q, k = ln(q, g("attn.q_norm.weight"), eps), ln(k, g("attn.k_norm.weight"), eps)
        if detach:
            q, k = q.detach(), k.detach()
        a = (q @ k.transpose(-2, -1) / math.sqrt(D // h)).softmax(-1)
        o = bcos((a @ v).transpose(1, 2).reshape(B, N, D), g("attn.proj.weight"), detach=detach)
        t = t + o * (g("ls1.gamma") if f"blocks.{i}.ls1.gamma" in sd else 1)
        u = bcos(ln(t, g("norm2.weight"), eps, detach), g("mlp.fc1.weight"), detach=detach)
        gate = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
        u = bcos(u * (gate.detach() if detach else gate), g("mlp.fc2.weight"), detach=detach)
        t = t + u * (g("ls2.gamma") if f"blocks.{i}.ls2.gamma" in sd else 1)
    logit_bias = math.log(1 / (orig.num_classes - 1))
    if orig.global_pool == "token":
        return bcos(ln(t[:, 0], sd["norm.weight"], eps, detach), sd["head.weight"], detach=detach) + logit_bias
    # average pooling, gap_reorder: the head on every patch token, then the mean
    per_token = bcos(ln(t[:, orig.num_prefix_tokens:], sd["fc_norm.weight"], eps, detach), sd["head.weight"],
                     detach=detach)
    return per_token.mean(1) + logit_bias


def encode(z):
    return torch.cat([z, -z], 1)


def converted(name, scale=3.0, **cfg):
    """(untouched copy, B-cosified model) of variant `name`, weights scaled so that B-cos outputs matter and
    the class / register tokens (initialised near 0 by timm) redrawn so that their contributions matter too."""
    model = make_variant(name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.5) if n in ("cls_token", "reg_token") else p.mul_(scale)
    orig = copy.deepcopy(model)
    return orig, vk.adapt(model, "bcosify", **cfg).eval()


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(2, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ conversion
def test_patch_encoding_is_exact():
    """[x, 1 − x] normalised with (μ, 1 − μ), (σ, σ) and weight [W/2, −W/2] = the original patch embedding."""
    orig, model = converted("plain", scale=1.0, b=1.0, bias=True, gap_reorder=False, logit_bias=False)
    torch.manual_seed(0)
    u = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    z = (u - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    want = orig.patch_embed.proj(z)
    enc = (torch.cat([u, 1 - u], 1) - torch.cat([MEAN, 1 - MEAN]).view(1, 6, 1, 1)) / torch.cat([STD, STD]).view(
        1, 6, 1, 1)
    W, b = orig.patch_embed.proj.weight, orig.patch_embed.proj.bias
    torch.testing.assert_close(F.conv2d(enc, torch.cat([W / 2, -W / 2], 1), b, stride=4), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.patch_embed.proj.weight, torch.cat([W / 2, -W / 2], 1), atol=0, rtol=0)
    torch.testing.assert_close(model.patch_embed.proj(z), want, atol=1e-5, rtol=0)
    assert vk.token_layout(model).in_chans == 3 and model.patch_embed.proj.weight.shape[1] == 6


def test_biases_removed_and_everything_trains():
    _, model = converted("plain")
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert biases == [], f"biases left: {biases}"
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_equals_oracle(name, x):
    orig, model = converted(name)
    with torch.no_grad():
        got = model(x)
        want = oracle(orig, encode(x))
    assert got.std(-1).min() > 1e-2, "degenerate check: the logits barely depend on the class"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- completeness
@pytest.mark.parametrize("name", list(VARIANTS))
def test_contributions_are_complete_and_match_oracle(name, x):
    orig, model = converted(name)
    e = vk.explain(model, x, method="bcos")  # each image's predicted class
    assert e.logit_bias == pytest.approx(math.log(1 / 9))
    total = e.contributions.flatten(1).sum(1) + e.constant + e.logit_bias
    err = ((total - e.logit).abs() / e.logit.abs().clamp_min(1)).max().item()
    assert err <= 1e-4, f"completeness: relative error {err:.2e} > 1e-4"
    torch.testing.assert_close(e.logit, model(x).detach().amax(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e.patch_map.flatten(1).sum(1), e.contributions.flatten(1).sum(1), atol=1e-5,
                               rtol=1e-5)
    # oracle: x̃ ⊙ ∂y/∂x̃ over the 6 encoded channels, and ⟨t, ∂y/∂t⟩ over the constant tokens, per image
    for i in range(2):
        x6 = encode(x[i:i + 1]).requires_grad_(True)
        consts = {}
        y = oracle(orig, x6, detach=True, consts=consts)[0, e.target[i]]
        grads = torch.autograd.grad(y, [x6, *consts.values()])
        want = (x6 * grads[0]).sum(1)[0].detach()
        torch.testing.assert_close(e.contributions[i], want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
        want_const = sum((t * g).sum() for t, g in zip(consts.values(), grads[1:]))
        torch.testing.assert_close(e.constant[i], want_const.detach(), atol=1e-5, rtol=1e-4)
    assert e.constant.abs().max() > 1e-3, f"degenerate check: the constant tokens carry only {e.constant.tolist()}"


def test_gradient_times_input_without_explanation_mode_is_not_complete(x):
    """The check above can fail: without detaching (plain gradient × input) the sum misses the logit."""
    _, model = converted("plain")
    x = x[:1].clone().requires_grad_(True)
    e = vk.explain(model, x.detach(), method="bcos")  # the predicted class
    y = model(x)[0, e.target[0]]
    (g,) = torch.autograd.grad(y, x)
    gap = ((x * g).sum() + e.constant[0] + e.logit_bias - y).abs()
    assert gap > 0.1 * (y - e.logit_bias).abs(), f"gradient x input misses the logit by only {gap:.2e}"


def test_other_input_size_and_checkpointing():
    torch.manual_seed(0)
    model = make_variant("registers", dynamic_img_size=True)
    vk.adapt(model, "bcosify")
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 48, 40)
    e = vk.explain(model, x, method="bcos")
    assert e.contributions.shape == (1, 48, 40) and e.patch_map.shape == (1, 12, 10)
    total = e.contributions.sum() + e.constant[0] + e.logit_bias
    assert (total - e.logit[0]).abs() <= 1e-4 * max(1.0, e.logit[0].abs().item())
    model.train()  # training under checkpointing: same gradients as without
    model(x).sum().backward()
    with_ckpt = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    for a, p in zip(with_ckpt, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ---------------------------------------------------------------------------------- training, saving, the CLI
def test_fit_uses_the_spec_lr_and_save_load_reproduces(tmp_path, x):
    _, model = converted("plain", scale=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.arange(32) % 10)
    result = vk.fit(model, train, epochs=1, batch_size=16, out_dir=tmp_path / "run", progress=False,
                    save_model=False)
    assert result.config["lr"] == 1e-3 and "bcosify" in result.config["lr_source"]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "patch_embed.proj.weight" in moved and "head.weight" in moved and "blocks.0.attn.qkv.weight" in moved
    model.eval()
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vk.explain(loaded, x, method="bcos").contributions,
                               vk.explain(model, x, method="bcos").contributions)


def test_cli_explain_bcos(tmp_path, capsys):
    model = vk.adapt(make_variant("plain"), "bcosify")
    vk.save(model, tmp_path / "bcos")
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "bcos.png"
    assert main(["explain", str(img), "--model", str(tmp_path / "bcos"), "--method", "bcos", "--target", "2",
                 "--out", str(out), "--display", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["target"] == 2 and Image.open(out).size == (64, 64)
    assert np.load(out.with_suffix(".npy")).shape == (8, 8)
    plain = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-arg", "img_size=32", "--model-arg",
             "patch_size=4", "--model-arg", "depth=1", "--num-classes", "10"]
    assert main(["explain", str(img), *plain, "--method", "bcos"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a B-cosified model" in err[0]


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra,error,match", [
    (dict(global_pool="map"), NotImplementedError, "bcosify: global_pool 'map' is not supported"),
    (dict(act_layer=nn.ReLU), NotImplementedError, r"bcosify: no B-cos conversion for blocks.0.mlp.act \(ReLU\)"),
    (dict(num_classes=1), ValueError, "bcosify: `logit_bias`"),
])
def test_refuses_clearly(extra, error, match):
    with pytest.raises(error, match=match):
        vk.adapt(make_variant("plain", **extra), "bcosify")


def test_refuses_after_other_methods_and_bad_config():
    with pytest.raises(ValueError, match="bcosify: apply it first.*bitfit"):
        vk.adapt(vk.adapt(make_variant("plain"), "bitfit"), "bcosify")
    with pytest.raises(ValueError, match="bcosify: `b` must be >= 1"):
        vk.adapt(make_variant("plain"), "bcosify", b=0.5)
