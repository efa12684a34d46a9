"""MMC-lite (not a reproduction of MMC): each part alone equals its objective (MAE, DINO) or a plain-torch
oracle (the global contrast of a masked student against the clean teacher view); weights add; no gradient to the
teachers; sit and mmc-lite run through vk.pretrain and leave a plain timm model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit import data
from vitkit.pretrain import dino, get_objective, mae, mmc_lite

SMALL = dict(output_dim=32, proj_dim=16)


def build(name="plain", **cfg):
    torch.manual_seed(0)
    model = make_variant(name)
    obj = mmc_lite.Objective(model, mmc_lite.Config(**{**SMALL, **cfg}))
    with torch.no_grad():  # teacher != student
        for p in obj.dino.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, obj


def views(seed=1):
    return torch.randn(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_docstring_says_not_a_reproduction():
    assert "not a reproduction of MMC" in mmc_lite.__doc__.splitlines()[0]
    assert "not a reproduction of MMC" in get_objective("mmc-lite").doc


def test_mim_alone_is_the_mae_objective():
    model, obj = build(distill_weight=0.0, contrast_weight=0.0)
    ref = mae.Objective(model, mae.Config(mask_ratio=0.75))
    ref.load_state_dict(obj.mae.state_dict())
    v = views()
    torch.manual_seed(5)
    loss, stats = obj(v)
    torch.manual_seed(5)
    expected, _ = ref(v[:, 0])
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert set(stats) == {"mim"}


def test_distill_alone_is_the_dino_objective():
    model, obj = build("registers", mim_weight=0.0, contrast_weight=0.0)
    ref = dino.Objective(model, dino.Config(output_dim=32, global_views=2, local_views=0))
    ref.load_state_dict(obj.dino.state_dict())
    v = views()
    loss, _ = obj(v)
    expected, _ = ref(v)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def oracle_contrast(model, obj, v1, v2, keep, tau):
    """Masked student by hand: embed, add positions, keep prefix + visible tokens, blocks, norm, pool, head;
    teacher: clean second view; NT-Xent over 2B anchors."""
    x = model.patch_embed(v1)  # (B, 64, D)
    x = model._pos_embed(x)  # prefix tokens + positions
    x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    x = model.norm(model.blocks(model.norm_pre(x)))
    p = model.num_prefix_tokens
    pooled = x[:, 0] if model.global_pool == "token" else x[:, p:].mean(1)
    z = obj.head(model.fc_norm(pooled))
    t = obj.teacher_head(obj.dino.teacher.forward_head(obj.dino.teacher.forward_features(v2), pre_logits=True))
    e = F.normalize(torch.cat([z, t]), dim=1)
    sim = e @ e.T / tau
    sim.fill_diagonal_(float("-inf"))
    n = z.shape[0]
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


@pytest.mark.parametrize("name", ["plain", "registers", "no_cls_avg"])
def test_contrast_alone_matches_the_oracle(name):
    model, obj = build(name, mim_weight=0.0, distill_weight=0.0, temperature=0.3, mask_ratio=0.5)
    v = views()
    torch.manual_seed(7)
    loss, _ = obj(v)
    torch.manual_seed(7)
    keep, _ = obj.mae.sample_mask(3)
    assert (keep[:, :model.num_prefix_tokens] == torch.arange(model.num_prefix_tokens)).all()  # prefix kept
    with torch.no_grad():
        expected = oracle_contrast(model, obj, v[:, 0], v[:, 1], keep, 0.3)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_weights_add_and_no_gradient_reaches_the_teachers():
    model, obj = build(mim_weight=0.5, distill_weight=2.0, contrast_weight=3.0)
    loss, stats = obj(views())
    assert loss.item() == pytest.approx(0.5 * stats["mim"] + 2 * stats["distill"] + 3 * stats["contrast"], rel=1e-5)
    loss.backward()
    teachers = [*obj.dino.teacher.parameters(), *obj.dino.teacher_head.parameters(), *obj.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teachers)
    assert obj.head[0].weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        obj.head[0].weight.add_(1.0)
    before = obj.teacher_head[0].weight.clone()
    obj.after_step(1, 5)  # i = 0: m = the start momentum 0.996
    torch.testing.assert_close(obj.teacher_head[0].weight, 0.996 * before + 0.004 * obj.head[0].weight)


def test_bad_weights_refused():
    with pytest.raises(ValueError, match="mmc-lite: the weights"):
        mmc_lite.Config(mim_weight=0.0, distill_weight=0.0, contrast_weight=0.0)


FAST = {"sit": dict(proj_dim=16, hidden_dim=16), "mmc-lite": SMALL}


@pytest.mark.parametrize("objective", ["sit", "mmc-lite"])
def test_pretrain_runs_and_leaves_a_plain_timm_model(objective, tmp_path):
    model = make_variant("registers")
    keys = list(model.state_dict())
    before = model.blocks[0].attn.qkv.weight.clone()
    rng = np.random.default_rng(0)
    images = data.arrays(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), [i % 2 for i in range(8)])
    vk.pretrain(model, images, objective, epochs=1, batch_size=4, out_dir=tmp_path, progress=False,
                **FAST[objective])
    assert list(model.state_dict()) == keys and not torch.equal(model.blocks[0].attn.qkv.weight, before)
    assert vk.load(tmp_path / "model") is not None
