"""dml-proxies: Proxy-Anchor against a loop written from the formula; the whole training loss (image prompts,
class prompts at block 0, GRU memory, bias proxies) against a plain-torch oracle; absent classes get no gradient;
unit norms; retrieval metrics (Recall@K, MAP@R) against a hand-computed example, through vk.evaluate."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import TINY, make_variant
from vit_oracle import base_tensors, vit_forward
from vitkit.adapt.dml_proxies_algo import proxy_anchor_loss


def proxy_anchor_oracle(sim, labels, alpha, delta, mean_over):
    """Loops over classes and samples: the Proxy-Anchor formula of the spec, term by term."""
    B, C = len(sim), len(sim[0])
    pos_total, neg_total, present = 0.0, 0.0, 0
    for c in range(C):
        pos = sum(math.exp(-alpha * (sim[i][c] - delta)) for i in range(B) if labels[i] == c)
        neg = sum(math.exp(alpha * (sim[i][c] + delta)) for i in range(B) if labels[i] != c)
        pos_total += math.log(1 + pos)
        neg_total += math.log(1 + neg)
        present += int(any(labels[i] == c for i in range(B)))
    return pos_total / (C if mean_over == "all" else present) + neg_total / C


@pytest.mark.parametrize("mean_over", ["all", "present"])
def test_proxy_anchor_matches_the_formula(mean_over):
    torch.manual_seed(0)
    sim = torch.empty(7, 5, dtype=torch.float64).uniform_(-1, 1)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 1])  # class 2 and 4 absent
    got = proxy_anchor_loss(sim, labels, alpha=32.0, delta=0.1, mean_over=mean_over)
    expected = proxy_anchor_oracle(sim.tolist(), labels.tolist(), 32.0, 0.1, mean_over)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def gru_oracle(gru, x, h):
    """torch.nn.GRUCell's equations (r, z, n gates) written out."""
    wi, wh, bi, bh = gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh
    gi, gh = x @ wi.T + bi, h @ wh.T + bh
    r = torch.sigmoid(gi[:, :h.shape[1]] + gh[:, :h.shape[1]])
    z = torch.sigmoid(gi[:, h.shape[1]:2 * h.shape[1]] + gh[:, h.shape[1]:2 * h.shape[1]])
    n = torch.tanh(gi[:, 2 * h.shape[1]:] + r * gh[:, 2 * h.shape[1]:])
    return (1 - z) * n + z * h


def loss_oracle(model, x, y, alpha=32.0, delta=0.1, ratio=0.4):
    """The training loss from the spec, walking the ViT by hand (tests/adapt/vit_oracle.py)."""
    head, prompts = model.head, model.vpt.prompts.detach()
    n, D = prompts.shape[1], prompts.shape[2]
    sd = {**base_tensors(model), "head.weight": torch.eye(D), "head.bias": torch.zeros(D)}  # -> normed cls token
    cls_prompts = head.class_prompts.detach()[y]  # (B, m, D): each image's own class prompts

    def before_block(extra):
        def fn(i, t, p):  # image prompts after the prefix (replaced per block), class prompts after them at block 0
            if i == 0:
                return torch.cat([t[:, :p], prompts[0].expand(len(t), -1, -1), *extra, t[:, p:]], dim=1)
            return torch.cat([t[:, :p], prompts[i].expand(len(t), -1, -1), t[:, p + n:]], dim=1)
        return fn

    heads = TINY["num_heads"]
    image = vit_forward(sd, x, heads=heads, before_block=before_block([]), num_prompts=n)
    proxy = vit_forward(sd, x, heads=heads, before_block=before_block([cls_prompts]),
                        num_prompts=n + cls_prompts.shape[1])
    e = F.normalize(head.embed(image), dim=-1)
    f = F.normalize(head.proxy_embed(proxy), dim=-1)
    memory = head.memory.clone()
    for c in y.unique():
        memory[c] = F.normalize(gru_oracle(head.gru, f[y == c].mean(0, keepdim=True), memory[c][None]), dim=-1)[0]
    proxies = F.normalize(ratio * head.bias_proxies + (1 - ratio) * memory, dim=-1)
    sim = (e @ proxies.T).double()
    return proxy_anchor_oracle(sim.tolist(), y.tolist(), alpha, delta, "all"), memory


def test_training_loss_matches_a_plain_torch_oracle():
    model = make_variant("plain")
    vk.adapt(model, "dml-proxies", num_prompts=3, proxy_prompts=2, embed_dim=16)
    torch.manual_seed(2)
    with torch.no_grad():  # a non-zero memory for class 1 (as after earlier steps), so the GRU's h matters
        model.head.memory[1] = F.normalize(torch.randn(16), dim=0)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([1, 1, 4, 4, 7, 7])
    with torch.no_grad():
        expected, memory = loss_oracle(model, x, y)
        _, loss, labels = model(x, y)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(model.head.memory, memory, atol=1e-5, rtol=1e-5)  # batch classes updated, others kept
    assert torch.equal(labels, y)


def test_absent_classes_get_no_gradient_and_norms_are_one():
    model = vk.adapt(make_variant("registers"), "dml-proxies", num_prompts=2, embed_dim=8)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([2, 2, 5, 5])
    _, loss, _ = model.train()(x, y)
    loss.backward()
    grad = model.head.class_prompts.grad
    absent = [c for c in range(10) if c not in (2, 5)]
    assert grad[absent].abs().max().item() == 0.0
    assert grad[[2, 5]].abs().min().item() > 0  # every present class's prompt entries move
    assert model.vpt.prompts.grad.abs().sum() > 0 and not model.head.memory.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("weight") and "blocks" in n)
    with torch.no_grad():
        emb = model.head.embedding(model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(model.head.proxies().norm(dim=-1), torch.ones(10))


def test_ratio_one_is_plain_proxy_anchor():
    model = vk.adapt(make_variant("plain"), "dml-proxies", num_prompts=1, embed_dim=8, proxy_bias_ratio=1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 3, 3])
    with torch.no_grad():
        _, loss, _ = model(x, y)
        e = F.normalize(model.head.embed(model.forward_head(model.forward_features(x), pre_logits=True)), dim=-1)
        sim = e @ F.normalize(model.head.bias_proxies, dim=-1).T
    assert loss.item() == pytest.approx(proxy_anchor_oracle(sim.double().tolist(), y.tolist(), 32.0, 0.1, "all"),
                                        rel=1e-5)
    assert model.head.memory.abs().sum() == 0 and model.head.gru is None  # no proxy branch, none built
    assert sum(p.numel() for p in model.head.parameters() if p.requires_grad) == 2 * 64 + 64 * 8 + 8 + 10 * 8


def test_fit_trains_with_proxy_anchor(tmp_path):
    model = vk.adapt(make_variant("no_cls_avg"), "dml-proxies", num_prompts=2, embed_dim=8)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    before = model.vpt.prompts.detach().clone()
    result = vk.fit(model, data, epochs=1, batch_size=8, out_dir=tmp_path, progress=False, save_model=False)
    assert result.config["lr"] == 1e-3 and not torch.equal(before, model.vpt.prompts)
    assert model.head.memory[:4].abs().sum() > 0 and model.head.memory[4:].abs().sum() == 0


class _Points(torch.nn.Module):
    """A stand-in model whose feature for image i is the i-th of the given 2-D points."""

    def __init__(self, points):
        super().__init__()
        self.points = torch.nn.Parameter(points)

    def forward_features(self, x):
        return self.points[x[:, 0].long()]

    def forward_head(self, x, pre_logits=False):
        return x


def test_retrieval_metrics_against_a_hand_computed_example():
    """Six unit vectors at angles 0, 10, 30, 100, 115, 210 degrees, classes 0, 0, 1, 1, 0, 1. Leave-one-out
    rankings (nearest angle first) and relevance (same class):
        p0: p1 p2 p3 p4 p5 -> 1 0 0 1 0   R=2  AP@R = (1/1)/2            = 0.5
        p1: p0 p2 p3 p4 p5 -> 1 0 0 1 0   R=2  AP@R                      = 0.5
        p2: p1 p0 p3 p4 p5 -> 0 0 1 0 1   R=2  AP@R = 0
        p3: p4 p2 p1 p0 p5 -> 0 1 0 0 1   R=2  AP@R = (1/2)/2            = 0.25
        p4: p3 p2 p5 p1 p0 -> 0 0 0 1 1   R=2  AP@R = 0
        p5: p4 p3 p0 p1 p2 -> 0 1 0 0 1   R=2  AP@R = 0.25
    Recall@1 = 2/6, Recall@2 = 4/6, Recall@4 = 6/6, MAP@R = 1.5/6 = 0.25."""
    angles = torch.tensor([0.0, 10.0, 30.0, 100.0, 115.0, 210.0]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    data = torch.utils.data.TensorDataset(torch.arange(6.0)[:, None], torch.tensor([0, 0, 1, 1, 0, 1]))
    out = vk.evaluate(_Points(points), data, protocol="retrieval", ks=(1, 2, 4))
    assert out["recall@1"] == pytest.approx(2 / 6) and out["recall@2"] == pytest.approx(4 / 6)
    assert out["recall@4"] == pytest.approx(1.0) and out["map@r"] == pytest.approx(0.25)
    assert out["top1"] == out["recall@1"] and out["n"] == 6 and out["gallery"] == "leave-one-out"


def test_retrieval_uses_the_dml_embedding():
    model = vk.adapt(make_variant("plain"), "dml-proxies", num_prompts=1, embed_dim=8).eval()
    torch.manual_seed(4)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    out = vk.evaluate(model, torch.utils.data.TensorDataset(x, y), protocol="retrieval", ks=(1,))
    with torch.no_grad():
        e = model.head.embedding(model.forward_head(model.forward_features(x), pre_logits=True))
    sim = (e @ e.T).fill_diagonal_(-2)
    assert out["recall@1"] == pytest.approx((y[sim.argmax(1)] == y).float().mean().item())


def test_refuses_a_model_without_classes():
    with pytest.raises(ValueError, match="dml-proxies: the model has no classifier"):
        vk.adapt(make_variant("plain", num_classes=0), "dml-proxies")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = vk.adapt(make_variant("layerscale"), "dml-proxies", num_prompts=2, embed_dim=8)
    other = copy.deepcopy(model)
    other.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 1, 6, 6])
    losses = []
    for m in (model, other):
        _, loss, _ = m.train()(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(model.vpt.prompts.grad, other.vpt.prompts.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.head.class_prompts.grad, other.head.class_prompts.grad, atol=1e-6, rtol=1e-5)
