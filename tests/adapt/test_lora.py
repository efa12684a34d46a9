"""LoRA on timm ViTs: identity, counts from formulas, q/v slices, merge/unmerge, adapter-only save, PEFT interop,
pass-through options, errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vit_oracle import base_tensors, vit_forward
from vitkit.adapt import lora

D, L, H, R = TINY["embed_dim"], TINY["depth"], 4 * TINY["embed_dim"], 8
HEAD = D * 10 + 10


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_b(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- identity

@pytest.mark.parametrize("targets", [("q", "v"), ("qkv",), ("all-linear",)], ids=["qv", "qkv", "all"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity_at_init(name, targets, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.adapt(model, "lora", targets=targets)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- structure: counts from the spec's formulas

@pytest.mark.parametrize("targets,per_block", [
    (("q", "v"), 4 * R * D),                  # A_q, A_v (r x D) + B_q, B_v (D x r)
    (("qkv",), R * (D + 3 * D)),              # PEFT on the fused layer
    (("proj",), 2 * R * D),
    (("mlp",), 2 * R * (D + H)),              # fc1 + fc2
    (("all-linear",), R * (D + 3 * D) + 2 * R * D + 2 * R * (D + H)),
], ids=["qv", "qkv", "proj", "mlp", "all"])
def test_trainable_count_formula(targets, per_block):
    model = make_variant("plain")
    vk.adapt(model, "lora", rank=R, targets=targets)
    assert trainable(model) == L * per_block + HEAD
    info = vk.info(model)
    assert info.trainable_params - info.trainable_head_params == L * per_block
    fraction = 100 * (L * per_block + HEAD) / info.total_params
    assert f"{L * per_block + HEAD:,} trainable ({fraction:.3f}%)" in str(info)
    assert f"{L * per_block:,} trainable without the head" in str(info)


def test_vit_base_counts_match_paper():
    """ViT-B/16, r = 8: q/v 294,912 (the paper's "0.29 M"); all four targets 1,179,648."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    qv = copy.deepcopy(model)
    vk.adapt(qv, "lora", rank=8, train_head=False)
    assert trainable(qv) == 294_912
    vk.adapt(model, "lora", rank=8, targets=("qkv", "proj", "mlp"), train_head=False)
    assert trainable(model) == 1_179_648


def test_only_factors_and_head_train():
    model = make_variant("plain")
    vk.adapt(model, "lora", targets=("q", "v", "proj"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("head.") for n in names), sorted(names)[:8]


# ---------------------------------------------------------------- q/v slices of the fused qkv

def test_qv_delta_has_exactly_zero_k_rows():
    model = make_variant("plain")
    vk.adapt(model, "lora", targets=("q", "v"))
    randomize_b(model)
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, lora.QKVLoRA)
    before = layer.base_layer.weight.detach().clone()
    lora.merge(model, unload=False)
    delta = layer.base_layer.weight.detach() - before
    assert torch.count_nonzero(delta[D:2 * D]) == 0
    assert delta[:D].abs().max() > 0 and delta[2 * D:].abs().max() > 0


def test_qv_matches_hand_computation():
    model = make_variant("plain")
    vk.adapt(model, "lora", targets=("q", "v"), alpha=16.0)
    randomize_b(model)
    layer = model.blocks[2].attn.qkv
    x = torch.randn(3, 5, D)
    s = 16.0 / R
    expected = layer.base_layer(x)
    expected[..., :D] += s * x @ layer.lora_A["q"].weight.T @ layer.lora_B["q"].weight.T
    expected[..., 2 * D:] += s * x @ layer.lora_A["v"].weight.T @ layer.lora_B["v"].weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- merge / unmerge

@pytest.mark.parametrize("targets", [("q", "v"), ("qkv",), ("all-linear",)], ids=["qv", "qkv", "all"])
@pytest.mark.parametrize("name", ["plain", "reg_no_cls"])
def test_merged_equals_unmerged_and_is_plain_timm(name, targets, images):
    model = make_variant(name)
    vk.adapt(model, "lora", targets=targets)
    randomize_b(model)
    with torch.no_grad():
        unmerged = model(images)
        merged_model = lora.merge(model)
        merged = merged_model(images)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert type(merged_model) is VisionTransformer and not lora.lora_layers(merged_model)
    assert "lora" not in [a.name for a in vk.applied(merged_model)]
    # timm alone runs it: a fresh timm model takes the merged state dict strictly
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **VARIANTS[name]}).eval()
    fresh.load_state_dict(merged_model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [("q", "v"), ("qkv", "mlp")], ids=["qv", "peft"])
def test_unmerge_restores_weights(targets, images):
    model = make_variant("plain")
    vk.adapt(model, "lora", targets=targets)
    randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        out = model(images)
        lora.merge(model, unload=False)
        torch.testing.assert_close(model(images), out, atol=1e-5, rtol=1e-5)  # merged layers skip the branch
        lora.unmerge(model)
        torch.testing.assert_close(model(images), out, atol=1e-5, rtol=1e-5)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- save: adapter only; PEFT's own loader

@pytest.fixture(scope="module")
def vit_small_file(tmp_path_factory):
    """Random-weight vit_small_patch16_224 with a 10-class head, as a local weights file (so vk.load fingerprints
    it and vk.save writes only what changed)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("base") / "vit_small.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_rank8_qkv_adapter_of_vit_small_is_small(vit_small_file, tmp_path):
    """r = 8 on qkv + a 10-class head: 147,456 + 3,850 = 151,306 tensors, 608 KB measured; bound 700 KB."""
    model = vk.load(vit_small_file, arch="vit_small_patch16_224").eval()
    vk.adapt(model, "lora", rank=8, targets=("qkv",))
    assert trainable(model) == 12 * 8 * (384 + 3 * 384) + 384 * 10 + 10
    randomize_b(model)
    with torch.no_grad():
        model.head.weight.add_(0.01)
    x = torch.randn(1, 3, 224, 224)
    saved = vk.save(model, tmp_path / "adapter")
    size = (saved / "weights.safetensors").stat().st_size
    assert size < 700_000, f"adapter file {size} bytes >= 700 KB"
    keys = __import__("json").loads((saved / "vitkit.json").read_text())["tensors"]
    assert all("lora_" in k or k.startswith("head.") for k in keys), keys[:5]
    loaded = vk.load(saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_adapter_loads_with_peft_api(vit_small_file, tmp_path):
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = vk.load(vit_small_file, arch="vit_small_patch16_224").eval()
    vk.adapt(model, "lora", rank=8, targets=("qkv",), train_head=False)
    randomize_b(model)
    saved = vk.save(model, tmp_path / "adapter")
    tensors = load_file(str(saved / "weights.safetensors"))
    # PEFT's own path: same base, same LoraConfig, PEFT's state-dict loader (keys without the adapter name)
    base = vk.load(vit_small_file, arch="vit_small_patch16_224").eval()
    names = [f"blocks.{i}.attn.qkv" for i in range(12)]
    inject_adapter_in_model(lora.peft_config(lora.Config(rank=8, targets=("qkv",)), names), base)
    result = set_peft_model_state_dict(base, {k.replace(".default", ""): v for k, v in tensors.items()})
    assert not result.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), atol=0, rtol=0)


# ---------------------------------------------------------------- PEFT options pass through

def test_dora_passes_through(images):
    model = make_variant("plain")
    reference = copy.deepcopy(model)
    vk.adapt(model, "lora", targets=("qkv",), peft_kwargs={"use_dora": True})
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n]
    assert len(names) == L
    assert trainable(model) == L * (R * 4 * D + 3 * D) + HEAD  # + one magnitude per output row
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    model = make_variant("plain")
    vk.adapt(model, "lora", rank=4, alpha=8.0, targets=("proj",), peft_kwargs={"use_rslora": True})
    assert model.blocks[0].attn.proj.scaling["default"] == pytest.approx(8.0 / 4 ** 0.5)


@pytest.mark.parametrize("tuner,per_layer", [
    ("loha", 2 * R * (D + 3 * D)),                 # two Hadamard-multiplied rank-r pairs on qkv (D -> 3D)
    ("lokr", None),                                # Kronecker factors: counted by PEFT, checked > 0
])
def test_other_peft_tuners_pass_through(tuner, per_layer, images):
    model = make_variant("registers")
    reference = copy.deepcopy(model)
    vk.adapt(model, "lora", tuner=tuner, targets=("qkv",))
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    assert adapters == (L * per_layer if per_layer else adapters) and adapters > 0
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)  # identity at init
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(0.05 * torch.randn_like(p))
        out = model(images)
        merged = lora.merge(model)
        torch.testing.assert_close(merged(images), out, atol=1e-5, rtol=1e-5)
    assert type(merged.blocks[0].attn.qkv) is torch.nn.Linear


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=("q", "qkv")), "update the fused qkv twice"),
    (dict(targets=("nope_[",)), "neither a friendly name"),
    (dict(targets=(r"blocks\.99\..*",)), "matches no Linear"),
    (dict(rank=0), "`rank` must be >= 1"),
    (dict(peft_kwargs={"r": 4}), "use rank"),
    (dict(peft_kwargs={"use_dora": True}), "only reach PEFT targets"),
    (dict(tuner="loha"), "q/k/v slice targets are LoRA layers"),
    (dict(tuner="loha", targets=("qkv",), dropout=0.1), "pass peft_kwargs"),
])
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=f"lora: .*{match}"):
        vk.adapt(make_variant("plain"), "lora", **kwargs)


def test_refuses_second_application():
    model = vk.adapt(make_variant("plain"), "lora")
    with pytest.raises(ValueError, match="lora: the model already has LoRA layers"):
        vk.adapt(model, "lora", targets=("proj",))


# ---------------------------------------------------------------- oracle: plain torch from the spec (P1)

def lora_site(sd, scale, slices):
    """`y = Wx + b + s·B A drop(x)` on qkv: per slice (q rows [0, D), k [D, 2D), v [2D, 3D)) for vitkit's fused
    q/v layer (keys `lora_A.q`), on the whole output for PEFT's layer (keys `lora_A.default`)."""
    def site(name, inp, out):
        if not name.endswith("attn.qkv"):
            return out
        out = out.clone()
        for s in slices:
            rows = slice(None) if s == "default" else slice("qkv".index(s) * D, ("qkv".index(s) + 1) * D)
            a, b = sd[f"{name}.lora_A.{s}.weight"], sd[f"{name}.lora_B.{s}.weight"]
            out[..., rows] += scale * inp @ a.T @ b.T
        return out
    return site


@pytest.mark.parametrize("targets,slices", [(("q", "v"), ("q", "v")), (("qkv",), ("default",))], ids=["qv", "peft"])
def test_matches_plain_torch_oracle(targets, slices, images):
    model = make_variant("plain")
    vk.adapt(model, "lora", rank=4, alpha=12.0, targets=targets)
    randomize_b(model)
    sd = base_tensors(model)
    expected = vit_forward(sd, images, heads=4, site=lora_site(sd, 12.0 / 4, slices))
    with torch.no_grad():
        out = model(images)
    assert (expected - make_variant("plain")(images)).abs().max() > 1e-2  # the update changes the logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [("q", "v"), ("qkv",)], ids=["qv", "peft"])
def test_dropout_is_on_the_branch_input(targets):
    """Train mode, fixed seed: the layer draws one dropout mask on its input x and feeds drop(x) to A only."""
    model = vk.adapt(make_variant("plain"), "lora", rank=4, targets=targets, dropout=0.5).train()
    randomize_b(model)
    layer, x = model.blocks[1].attn.qkv, torch.randn(2, 7, D)
    sd = {k.replace("base_layer.", ""): v.detach() for k, v in layer.state_dict().items()}
    slices = ("q", "v") if targets == ("q", "v") else ("default",)
    with torch.no_grad():
        torch.manual_seed(3)
        out = layer(x)
        torch.manual_seed(3)
        dropped = torch.nn.functional.dropout(x, 0.5, training=True)
        plain = torch.nn.functional.linear(x, sd["weight"], sd["bias"])
        site = lora_site({f"attn.qkv.{k}": v for k, v in sd.items()}, 8.0 / 4, slices)
        expected = site("attn.qkv", dropped, plain)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- save after merging (issue 11.1)

@pytest.fixture
def tiny_file(tmp_path):
    """A tiny random ViT as a local weights file: vk.load fingerprints it, vk.save writes changed tensors only."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).state_dict(), str(path))
    return path


def randomize_factors(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


MERGE_CASES = [
    pytest.param(dict(), False, id="qv-kept"),
    pytest.param(dict(targets=("qkv",)), False, id="qkv-kept"),
    pytest.param(dict(tuner="loha", targets=("qkv", "mlp")), False, id="loha-kept"),
    pytest.param(dict(), True, id="qv-unload"),
    pytest.param(dict(targets=("qkv",)), True, id="qkv-unload"),
]


@pytest.mark.parametrize("base", ["full", "file"])
@pytest.mark.parametrize("kwargs,unload", MERGE_CASES)
def test_save_after_merge_reproduces_logits(kwargs, unload, base, tiny_file, images, tmp_path):
    """merge(unload=False) keeps merged layers: the save records it, so loading does not add the update twice."""
    model = make_variant("plain") if base == "full" else vk.load(tiny_file, arch="vit_tiny_patch16_224", **TINY)
    model.eval()
    vk.adapt(model, "lora", **kwargs)
    randomize_factors(model)
    with torch.no_grad():
        unmerged = model(images)
        lora.merge(model, unload=unload)
        merged = model(images)
        loaded = vk.load(vk.save(model, tmp_path / "merged")).eval()
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(images), merged, atol=0, rtol=0)
    assert [a.name for a in vk.applied(loaded)] == ([] if unload else ["lora"])
    if not unload:  # and the loaded layers unmerge to the trained, unmerged model
        with torch.no_grad():
            torch.testing.assert_close(lora.unmerge(loaded)(images), unmerged, atol=1e-5, rtol=1e-5)
            saved = vk.load(vk.save(loaded, tmp_path / "unmerged")).eval()
            torch.testing.assert_close(saved(images), loaded(images), atol=0, rtol=0)


# ---------------------------------------------------------------- merge is all or nothing (issue 11.7)

@pytest.mark.parametrize("targets", [("q", "v"), ("qkv",)], ids=["qv", "peft"])
def test_failed_merge_changes_nothing(targets, images):
    model = vk.adapt(make_variant("plain"), "lora", targets=targets)
    randomize_b(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("blocks.5.") and "lora_B" in n).fill_(float("nan"))
        model.blocks[0].attn.qkv(torch.randn(1, 2, D))  # block 0 is fine: merged first, so it must be rolled back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        lora.merge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) or torch.isnan(v).any() for k, v in before.items())
    assert len(lora.lora_layers(model)) == L and not any(m.merged for _, m in lora.lora_layers(model))


@pytest.mark.parametrize("targets", [("q", "v"), ("qkv", "proj", "mlp")], ids=["qv", "peft"])
def test_merged_keys_are_the_timm_architectures(targets, images):
    """qkv_bias=False: merging adds no key, so the state dict loads strictly into the same timm architecture."""
    model = vk.adapt(make_variant("plain", qkv_bias=False), "lora", targets=targets)
    randomize_b(model)
    merged = lora.merge(model)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, qkv_bias=False, **TINY)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(merged.state_dict(), strict=True)


def test_dora_loaded_merged_reproduces_logits_and_refuses_unmerge(images, tmp_path):
    """DoRA's unmerge needs the pre-merge weight norm, which no save holds: the loaded model refuses it."""
    model = vk.adapt(make_variant("plain"), "lora", targets=("qkv",), peft_kwargs={"use_dora": True})
    randomize_factors(model)
    with torch.no_grad():
        merged = lora.merge(model, unload=False)(images)
        loaded = vk.load(vk.save(model, tmp_path / "dora")).eval()
        torch.testing.assert_close(loaded(images), merged, atol=0, rtol=0)
    with pytest.raises(ValueError, match="lora: cannot unmerge blocks.0.attn.qkv: a DoRA layer loaded merged"):
        lora.unmerge(loaded)
