"""PEGO: forward and regulariser against plain-torch oracles written from adapt.md P12, the regulariser exactly 0
(value and gradient) at init and positive after a step of vk.fit, reaching training through add_loss, counts,
merge, save/load."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import TINY, make_variant
from vit_oracle import base_tensors, vit_forward
from vitkit.adapt import pego

D, L, K, R = TINY["embed_dim"], TINY["depth"], 3, 2


def factors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def randomize(model, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in factors(model).items():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def oracle_loss(model) -> torch.Tensor:
    """The spec's regulariser, spelled out: full ΔW_i = B_i A_i, entrywise L1 of W ΔW_iᵀ and ΔW_i ΔW_jᵀ."""
    sd = {n: p for n, p in model.named_parameters()}
    total = torch.zeros(())
    for b in range(L):
        w = sd[f"blocks.{b}.attn.qkv.base_layer.weight"]
        for s, rows in (("q", w[:D]), ("v", w[2 * D:])):
            a, bb = sd[f"blocks.{b}.attn.qkv.lora_A_{s}"], sd[f"blocks.{b}.attn.qkv.lora_B_{s}"]
            deltas = [bb[i] @ a[i] for i in range(a.shape[0])]
            for i, di in enumerate(deltas):
                total = total + (rows @ di.T).abs().sum()
                for dj in deltas[i + 1:]:
                    total = total + (di @ dj.T).abs().sum()
    return total


def test_forward_matches_oracle(images):
    model = make_variant("plain")
    vk.adapt(model, "pego", num_loras=K, rank=R)
    randomize(model)
    sd = base_tensors(model)
    f = factors(model)

    def site(name, inp, out):  # q rows += Σ_i B_i A_i x, v rows likewise, k untouched
        if not name.endswith("attn.qkv"):
            return out
        extra = []
        for s in ("q", "v"):
            a, b = f[f"{name}.lora_A_{s}"], f[f"{name}.lora_B_{s}"]
            extra.append(sum(inp @ a[i].T @ b[i].T for i in range(K)))
        return out + torch.cat([extra[0], torch.zeros_like(extra[0]), extra[1]], dim=-1)

    with torch.no_grad():
        expected = vit_forward(sd, images, heads=TINY["num_heads"], site=site)
        plain = vit_forward(sd, images, heads=TINY["num_heads"])
        got = model(images)
    assert (expected - plain).abs().max() > 1e-2  # the update changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_regulariser_matches_oracle_and_is_permutation_invariant():
    model = make_variant("qk_norm")
    vk.adapt(model, "pego", num_loras=K, rank=R)
    randomize(model)
    got = pego.orthogonality_loss(model)
    expected = oracle_loss(model)
    assert expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for p in factors(model).values():
            p.copy_(p[perm])
    torch.testing.assert_close(pego.orthogonality_loss(model), expected, rtol=1e-5, atol=1e-5)


def test_regulariser_and_gradient_exactly_zero_at_init_positive_after_one_step(tmp_path):
    model = make_variant("registers")
    vk.adapt(model, "pego", num_loras=K, rank=R)
    loss = pego.orthogonality_loss(model)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().max().item() == 0.0 for p in factors(model).values())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    vk.fit(model, data, epochs=1, batch_size=8, warmup_epochs=0, out_dir=tmp_path, progress=False,
           save_model=False)  # one optimizer step: the task loss moves B off zero
    after = pego.orthogonality_loss(model)
    assert after.item() > 0
    torch.testing.assert_close(after, oracle_loss(model), rtol=1e-5, atol=1e-6)


def test_regulariser_reaches_training_through_fit(tmp_path):
    """Same seed, same data: with a large λ the trained group is far more orthogonal than with λ = 0."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    found = {}
    for weight in (0.0, 10.0):
        model = make_variant("plain")
        vk.adapt(model, "pego", num_loras=K, rank=R, weight=weight)
        vk.fit(model, data, epochs=3, batch_size=8, lr=1e-2, warmup_epochs=0, out_dir=tmp_path / str(weight),
               progress=False, save_model=False)
        found[weight] = pego.orthogonality_loss(model).item()
    assert found[10.0] < 0.5 * found[0.0], found


def test_trainable_count_and_only_factors_train():
    model = make_variant("layerscale")
    vk.adapt(model, "pego", num_loras=K, rank=R, train_head=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * 4 * K * R * D


def test_merge_equals_unmerged_and_unwraps(images):
    model = make_variant("reg_no_cls")
    vk.adapt(model, "pego", num_loras=K, rank=R)
    randomize(model)
    with torch.no_grad():
        before = model(images)
        pego.merge(model)
        after = model(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in model.blocks)
    assert vk.applied(model) == [] and not model.__dict__.get("_vitkit_losses")


def test_save_load_keeps_factors_and_loss_term(images, tmp_path):
    model = make_variant("no_cls_avg")
    vk.adapt(model, "pego", num_loras=K, rank=R)
    randomize(model)
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pego.orthogonality_loss(loaded), pego.orthogonality_loss(model))
    assert len(loaded.__dict__["_vitkit_losses"]) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_loras=0), "pego: `num_loras` must be >= 1"),
    (dict(rank=0), "pego: `rank` must be >= 1"),
    (dict(weight=-1.0), "pego: `weight` must be >= 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.adapt(make_variant("plain"), "pego", **kwargs)


def test_refuses_twice_and_a_wrapped_qkv():
    model = make_variant("plain")
    vk.adapt(model, "pego")
    with pytest.raises(ValueError, match="pego: already applied"):
        vk.adapt(model, "pego")
    other = make_variant("plain")
    other.blocks[2].attn.qkv = torch.nn.Sequential(other.blocks[2].attn.qkv)  # as another method's wrapper would
    with pytest.raises(ValueError, match="blocks.2.attn.qkv is a Sequential, not a Linear"):
        vk.adapt(other, "pego")
    assert copy.deepcopy(model) is not None  # the loss term (a partial of a module function) deep-copies
