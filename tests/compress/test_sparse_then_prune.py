"""sparse-then-prune: the attention penalty against a plain-torch oracle (value and gradient, all blocks / last
block), its closed forms (uniform vs one-hot rows), weight 0 = plain training step for step, and finish(): exact
global sparsity, regulariser gone, save / load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.compress import sparse_then_prune as stp
from vitkit.compress.sparse_then_prune_algo import attention_log_penalty


def oracle_penalty(model, x, regularised):
    """Blocks walked by hand (timm's pre-norm block, eager attention); mean of mean log(1 + A²) over `regularised`."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    terms = []
    for i, blk in enumerate(model.blocks):
        a, h = blk.norm1(t), blk.attn
        B, N, C = a.shape
        q, k, v = F.linear(a, h.qkv.weight, h.qkv.bias).reshape(B, N, 3, h.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = h.q_norm(q), h.k_norm(k)
        attn = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        if i in regularised:
            terms.append(torch.log(1 + attn ** 2).mean())
        t = t + blk.ls1(h.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return torch.stack(terms).mean()


def penalty_of(model):
    return model.__dict__["_vitkit_losses"][-1]


@pytest.mark.parametrize("blocks,regularised", [("all", range(6)), ("last", [5])])
def test_penalty_value_and_gradient_against_oracle(blocks, regularised, images):
    model = make_variant("qk_norm")
    with torch.no_grad():  # sharper, non-uniform attention
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    vk.compress(model, "sparse-then-prune", weight=0.5, blocks=blocks)
    logits = model(images)
    got = penalty_of(model)(model, images, logits, None)
    (grad,) = torch.autograd.grad(got, model.blocks[0].attn.qkv.weight, allow_unused=True)
    want = 0.5 * oracle_penalty(model, images, list(regularised))
    (want_grad,) = torch.autograd.grad(want, model.blocks[0].attn.qkv.weight, allow_unused=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-9, rtol=1e-4)
    other = 0.5 * oracle_penalty(model, images, [5] if blocks == "all" else list(range(6)))
    assert abs(other.item() - got.item()) > 1e-3 * got.item()  # the choice of blocks matters here


def test_closed_forms():
    N = 197
    q = torch.zeros(1, 1, N, 8)
    assert math.isclose(attention_log_penalty(q, torch.randn(1, 1, N, 8), 1.0).item(), math.log1p(1 / N ** 2),
                        rel_tol=1e-5)
    k = torch.zeros(1, 1, N, 8)
    k[..., 0, 0] = 1e4  # every row one-hot on key 0
    one_hot = attention_log_penalty(torch.ones(1, 1, N, 8), k, 1.0).item()
    assert math.isclose(one_hot, math.log(2) / N, rel_tol=1e-4)  # 3.5e-3 vs 2.6e-5: uniform is lower
    assert math.log1p(1 / N ** 2) < one_hot


def fit_copy(model, data, tmp_path, name):
    vk.fit(model, data, epochs=1, batch_size=4, lr=1e-3, warmup_epochs=0, out_dir=tmp_path / name, progress=False,
           save_model=False)
    return model


def test_weight_zero_is_plain_training(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    plain, regularised, strong = (make_variant("plain") for _ in range(3))
    for m in (plain, regularised, strong):
        vk.adapt(m, "full")
    vk.compress(regularised, "sparse-then-prune", weight=0.0)
    vk.compress(strong, "sparse-then-prune", weight=10.0)
    for name, m in (("a", plain), ("b", regularised), ("c", strong)):
        fit_copy(m, data, tmp_path, name)
    for (name, p), q, r in zip(plain.named_parameters(), regularised.parameters(), strong.parameters()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=name)
    assert (strong.blocks[0].attn.qkv.weight - plain.blocks[0].attn.qkv.weight).abs().max() > 1e-5


def test_finish_prunes_exactly_and_saves(tmp_path, images):
    model = vk.load("vitkit/vit-tiny-cifar")
    vk.compress(model, "sparse-then-prune", sparsity=0.3)
    stp.finish(model)
    assert not any(isinstance(f, stp._Penalty) for f in model.__dict__["_vitkit_losses"])
    weights = [m.weight for n, m in model.named_modules()
               if n.startswith("blocks") and n.endswith(("qkv", "proj", "fc1", "fc2"))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.3 * sum(w.numel() for w in weights))
    assert [(a.name, getattr(a.config, "finished", None)) for a in vk.applied(model)] == [
        ("sparse-then-prune", True), ("prune", None)]
    vk.save(model, tmp_path / "s")
    loaded = vk.load(tmp_path / "s").eval()
    assert "_vitkit_losses" not in loaded.__dict__
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="finish\\(model\\) needs a model with sparse-then-prune applied"):
        stp.finish(model)


def test_refuses_after_token_methods():
    model = make_variant("plain")
    vk.accelerate(model, "tome", r=2)
    with pytest.raises(ValueError, match="sparse-then-prune: tome changes attention"):
        vk.compress(model, "sparse-then-prune")
