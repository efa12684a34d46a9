"""`points` with `adapters=True`: Any2Point's guided local adapters (../shared/methods/applications.md entry 23).

The oracle walks a registers ViT by hand from the spec written in vitkit/adapt/points.py's docstring: after each
block's MLP, every point token (never a prefix token) adds `up(Σ_v w_v Σ_j a_v[i, j] gelu(down(x_j)))` over its k
nearest tokens in 3-D, `a_v` the softmax over the neighbours of the cosine of the tokens' position embeddings in
view v divided by τ, `w_v` the softmax of the block's view logits. It imports nothing from vitkit; the tokens and
their centres come from the model's own tokenizer (checked against its oracle in test_inputs.py), the per-view
position embeddings are rebuilt here (projection + bilinear by hand).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant

HEADS, PREFIX = 4, 5  # conftest's TINY; the registers variant: class token + 4 registers
CFG = dict(num_groups=16, group_size=8, views=3, hidden=32, adapters=True, adapter_width=8, adapter_k=5,
           adapter_tau=0.2)


def perturb_trainable(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def clouds(n=2, points=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, points, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5]) + 1.0


def view_positions(sd: dict, centres: torch.Tensor, views: int) -> torch.Tensor:
    """(G, 3) centres in the unit ball -> (V, G, D): the 8x8 grid's position embedding at each view's projection
    (yaw π·v/V then 30° pitch, orthographic, bilinear with border clamp, pixel centres at (i + 0.5) / 8)."""
    grid = sd["pos_embed"][0, PREFIX:].reshape(8, 8, -1)
    out = []
    for i in range(views):
        a, e = math.pi * i / views, math.radians(30)
        x, y, z = centres.unbind(1)
        u = x * math.cos(a) - y * math.sin(a)
        v = (x * math.sin(a) + y * math.cos(a)) * math.cos(e) - z * math.sin(e)
        px, py = (((u + 1) * 8 - 1) / 2).clamp(0, 7), (((v + 1) * 8 - 1) / 2).clamp(0, 7)
        x0, y0 = px.floor().long(), py.floor().long()
        x1, y1 = (x0 + 1).clamp(max=7), (y0 + 1).clamp(max=7)
        fx, fy = (px - x0)[:, None], (py - y0)[:, None]
        out.append((1 - fx) * (1 - fy) * grid[y0, x0] + fx * (1 - fy) * grid[y0, x1]
                   + (1 - fx) * fy * grid[y1, x0] + fx * fy * grid[y1, x1])
    return torch.stack(out)


def guided_vit_oracle(model, sd: dict, x: torch.Tensor, k: int, tau: float, views: int) -> torch.Tensor:
    lin = lambda n, t: F.linear(t, sd[f"{n}.weight"], sd.get(f"{n}.bias"))  # noqa: E731
    ln = lambda n, t: F.layer_norm(t, t.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], 1e-6)  # noqa: E731
    tokens, centres = model.patch_embed(x)  # (B, G, D), (B, G, 3)
    out = []
    for b in range(len(x)):
        pe = view_positions(sd, centres[b], views)  # (V, G, D)
        prefix = torch.cat([sd["cls_token"][0], sd["reg_token"][0]]) + sd["pos_embed"][0, :PREFIX]
        t = torch.cat([prefix, tokens[b] + pe.mean(0)])[None]  # (1, P + G, D)
        n, d = t.shape[1:]
        for i in range(sum(1 for key in sd if key.endswith(".norm1.weight"))):
            blk = f"blocks.{i}."
            q, kk, v = lin(blk + "attn.qkv", ln(blk + "norm1", t)).reshape(1, n, 3, HEADS, d // HEADS) \
                .permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1) @ v
            t = t + lin(blk + "attn.proj", att.transpose(1, 2).reshape(1, n, d))
            t = t + lin(blk + "mlp.fc2", F.gelu(lin(blk + "mlp.fc1", ln(blk + "norm2", t))))
            ad = blk + "points_adapter."
            h = F.gelu(lin(ad + "down", t[0, PREFIX:]))  # (G, r)
            w = sd[ad + "view_logits"].softmax(0)
            added = []
            for g in range(len(h)):
                near = (centres[b] - centres[b][g]).norm(dim=1).argsort()[:k]  # itself first
                agg = 0
                for view in range(views):
                    cos = F.cosine_similarity(pe[view, g][None], pe[view, near], dim=1)
                    agg = agg + w[view] * (torch.softmax(cos / tau, 0)[:, None] * h[near]).sum(0)
                added.append(lin(ad + "up", agg))
            t = torch.cat([t[:, :PREFIX], t[:, PREFIX:] + torch.stack(added)[None]], 1)
        out.append(lin("head", ln("norm", t)[:, 0]))
    return torch.cat(out)


def test_guided_adapters_match_oracle_and_keep_permutation_invariance():
    model = vk.adapt(make_variant("registers", seed=3), "points", **CFG)
    perturb_trainable(model)  # up != 0 and view weights unequal, so the adapters change the output
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = clouds()
    with torch.no_grad():
        unguided = copy.deepcopy(model)
        for block in unguided.blocks:
            block.points_adapter.up.weight.zero_()
            block.points_adapter.up.bias.zero_()
        assert (model(x) - unguided(x)).abs().max() > 0.1  # the adapters matter here
        expected = guided_vit_oracle(model, sd, x, CFG["adapter_k"], CFG["adapter_tau"], CFG["views"])
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x[:, torch.randperm(x.shape[1])]), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["registers", "reg_no_cls", "layerscale", "qk_norm"])
@pytest.mark.parametrize("position", ["projection", "learned"])
def test_fresh_adapters_are_an_identity_and_only_they_tokenizer_and_head_train(variant, position, tmp_path):
    base = make_variant(variant, seed=4)
    torch.manual_seed(0)
    plain = vk.adapt(copy.deepcopy(base), "points", **{**CFG, "adapters": False, "position": position})
    torch.manual_seed(0)
    model = vk.adapt(copy.deepcopy(base), "points", **{**CFG, "position": position})
    x = clouds(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if ".points_adapter." in n}
    assert trainable == adapter | {n for n in trainable if n.startswith(("patch_embed.", "head."))}
    view_logits = CFG["views"] if position == "projection" else 0  # one (learned) view needs no weight
    r, d = CFG["adapter_width"], model.embed_dim
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapter) == 6 * (2 * d * r + r + d + view_logits)
    # gradients under gradient checkpointing equal those without, reach only trainable tensors, and the adapters
    perturb_trainable(model, scale=0.05)
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        m.set_grad_checkpointing(ckpt)
        m(x).logsumexp(1).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == trainable
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    # (with class-token pooling the last block's adapter, which changes only point tokens, cannot reach the logits)
    assert all(grads[0][n].abs().sum() > 0 for n in adapter if not n.startswith("blocks.5."))
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-6, rtol=1e-6)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"points: `adapter_k` \(20\) must be <= `num_groups` \(16\) with `adapt"):
        vk.adapt(make_variant("plain"), "points", **{**CFG, "adapter_k": 20})
    vk.adapt(make_variant("plain"), "points", **{**CFG, "adapter_k": 20, "adapters": False})  # k unused: no check
    with pytest.raises(ValueError, match="points: `adapter_tau` must be > 0"):
        vk.adapt(make_variant("plain"), "points", **{**CFG, "adapter_tau": 0.0})
    model = vk.accelerate(vk.adapt(make_variant("plain"), "points", **CFG), "tome", r=2)
    with pytest.raises(ValueError, match="points: the guided adapters need this forward's 16 point tokens after the "
                                         "1 prefix tokens, got 14; token reduction"):
        model(clouds())


def test_composes_with_lora_and_prompts(tmp_path):
    model = vk.adapt(make_variant("registers", seed=13), "points", **CFG)
    vk.adapt(model, "lora", rank=2)
    vk.adapt(model, "vpt", num_prompts=2)  # prompts count as prefix tokens: the adapters skip them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".points_adapter." in n for n in trainable) and any(".lora_" in n for n in trainable)
    perturb_trainable(model, scale=0.1)
    x = clouds(seed=2)
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    assert [a.name for a in vk.applied(loaded)] == ["points", "lora", "vpt"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-6, rtol=1e-6)
