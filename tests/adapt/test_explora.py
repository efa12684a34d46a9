"""ExPLoRA: the exact trainable set (count formula), what moves in each phase of the recipe, phase 2 starting from
phase 1's merged weights (checked against a plain-torch merge of the phase-1 factors), the CLI's errors."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import TINY, make_variant
from vitkit.adapt import explora

D, L, R = TINY["embed_dim"], TINY["depth"], 4
HEAD = D * 10 + 10
BLOCK = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + 4 * D  # qkv, proj, fc1, fc2, norms


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,extra", [("plain", 0), ("qk_norm", 4 * (D // TINY["num_heads"]))],
                         ids=["plain", "qk_norm"])
def test_trainable_count_formula(name, extra):
    """One block in full; on the other L-1: norm1, norm2 (+ qk-norms) and q/v LoRA 4rD; the final norm; head."""
    model = make_variant(name)
    vk.adapt(model, "explora", rank=R)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == (BLOCK + extra) + (L - 1) * (4 * D + extra + 4 * R * D) + 2 * D + HEAD
    assert not {"cls_token", "pos_embed", "patch_embed.proj.weight"} & trainable(model)


def test_registers_and_layerscale_stay_frozen_outside_the_unfrozen_blocks():
    model = make_variant("registers")
    vk.adapt(model, "explora", rank=R, unfreeze_blocks=(0, -1))
    names = trainable(model)
    assert "reg_token" not in names and "blocks.0.attn.qkv.weight" in names and "blocks.5.mlp.fc1.weight" in names
    assert "blocks.2.attn.qkv.weight" not in names and "blocks.2.attn.qkv.lora_B.v.weight" in names
    ls = make_variant("layerscale")
    vk.adapt(ls, "explora", rank=R)
    assert "blocks.0.ls1.gamma" not in trainable(ls) and "blocks.5.ls1.gamma" in trainable(ls)


def test_recipe_phases(tmp_path):
    """Phase 1 moves only the unfrozen block, norms and LoRA factors (never the head); phase 2 starts from the
    phase-1 weights with the factors merged (W + s·BA on q and v rows, computed here) and moves only its fresh
    factors and the head."""
    model = make_variant("registers")
    start = copy.deepcopy(model.state_dict())
    snaps = {}

    def on_phase_end(phase, m):
        snaps[phase] = ({k: v.clone() for k, v in m.state_dict().items()}, trainable(m))

    parts = vk.data.split(vk.data.digits(), seed=0, train=2)
    tf = vk.data.transform(model)
    train = parts["train"].with_transform(tf)
    explora.recipe(model, parts["train"], train, objective="mae", pretrain_epochs=1, epochs=1, batch_size=10,
                   out_dir=tmp_path, progress=False, on_phase_end=on_phase_end, rank=R,
                   pretrain_config={"backbone_lr": 1e-2})
    p1, _ = snaps["pretrain"]
    moved = {k for k in p1 if k in start and not torch.equal(p1[k], start[k])}
    new = set(p1) - set(start)
    expected = {k for k in start if k.startswith("blocks.5.")} | {
        k for k in start if k.rpartition(".")[0].split(".")[-1] in ("norm1", "norm2", "norm")}
    assert moved and moved <= expected, sorted(moved - expected)[:5]
    assert any(k.startswith("blocks.5.") for k in moved) and any(".norm1." in k for k in moved)
    lora_b = [k for k in new if "lora_B" in k]
    assert lora_b and all(p1[k].abs().max() > 0 for k in lora_b)
    # the merged phase-1 weights, computed by hand from the phase-1 factors (alpha = rank: scale 1)
    merged = {k.replace(".base_layer.", "."): v for k, v in p1.items() if ".lora_" not in k}
    for b in range(L - 1):
        w = merged[f"blocks.{b}.attn.qkv.weight"].clone()
        f = {s: p1[f"blocks.{b}.attn.qkv.lora_B.{s}.weight"] @ p1[f"blocks.{b}.attn.qkv.lora_A.{s}.weight"]
             for s in ("q", "v")}
        w[:D] += f["q"]
        w[2 * D:] += f["v"]
        merged[f"blocks.{b}.attn.qkv.weight"] = w
    p2, names2 = snaps["finetune"]
    assert names2 == {k for k in p2 if ".lora_" in k or k.startswith("head.")}
    for key, value in merged.items():
        if not key.startswith("head."):
            torch.testing.assert_close(p2[key.replace("attn.qkv.", "attn.qkv.base_layer.") if
                                          key.endswith(("qkv.weight", "qkv.bias")) else key], value,
                                       atol=1e-6, rtol=0)
    assert not torch.equal(p2["head.weight"], start["head.weight"])


def test_merge_unwraps_and_keeps_outputs(images):
    model = make_variant("no_cls_avg")
    vk.adapt(model, "explora", rank=R)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        before = model(images)
        explora.merge(model)
        torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)
    assert vk.applied(model) == [] and all(type(b.attn.qkv) is torch.nn.Linear for b in model.blocks)


@pytest.mark.parametrize("kwargs,match", [
    (dict(unfreeze_blocks=(6,)), r"explora: `unfreeze_blocks` \[6\] out of range for a model with 6 blocks"),
    (dict(rank=0), "explora: `rank` must be >= 1"),
    (dict(unfreeze_blocks=(-1, -1)), "repeats a block"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.adapt(make_variant("plain"), "explora", **kwargs)


def test_cli_bad_input_one_line(capsys):
    from vitkit.cli import main

    code = main(["explora", "vitkit/vit-tiny-cifar", "--data", "digits", "--split", "train=2,val=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "needs target-domain images" in err, err
    code = main(["explora", "vitkit/vit-tiny-cifar", "--data", "digits", "--split", "train=2", "--unlabelled-part",
                 "nope"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--unlabelled-part 'nope' is not a split part" in err, err
