"""The method registry: names, config validation, kinds, order of application."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import vitkit as vk
from vitkit import registry
from conftest import make_variant


def test_methods_lists_linear_and_full_with_kinds():
    by_name = {m.name: m for m in vk.methods()}
    assert by_name["linear"].kind == "adapt" and by_name["full"].kind == "adapt"
    assert [f[0] for f in by_name["full"].fields()] == ["freeze_patch_embed", "lr", "weight_decay"]


def test_unknown_method_names_closest():
    with pytest.raises(ValueError, match="did you mean `linear`"):
        vk.apply(make_variant("plain"), "lineer")


def test_unknown_field_lists_valid_fields():
    with pytest.raises(TypeError, match="valid fields: freeze_patch_embed"):
        vk.apply(make_variant("plain"), "full", freeze_patch=True)


def test_ill_typed_field_is_named():
    with pytest.raises(TypeError, match="`freeze_patch_embed` must be bool"):
        vk.apply(make_variant("plain"), "full", freeze_patch_embed="yes")


def test_kind_entry_point_checks_kind():
    model = make_variant("plain")
    with pytest.raises(ValueError, match="is an adapt method"):
        vk.accelerate(model, "linear")


def test_linear_trains_head_only_and_full_everything():
    model = make_variant("plain")
    vk.adapt(model, "linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    vk.adapt(model, "full", freeze_patch_embed=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert [a.name for a in vk.applied(model)] == ["linear", "full"]


def test_register_rejects_bad_names_and_undocumented_fields():
    @dataclass(frozen=True)
    class Undocumented:
        x: int = 1

    @dataclass(frozen=True)
    class Documented:
        x: int = field(default=1, metadata={"help": "x"})

    with pytest.raises(ValueError, match="lower case"):
        registry.register("Bad_Name", kind="adapt", config=Documented, apply=lambda m, c: m)
    with pytest.raises(ValueError, match="need metadata"):
        registry.register("undocumented", kind="adapt", config=Undocumented, apply=lambda m, c: m)
    with pytest.raises(ValueError, match="kind must be"):
        registry.register("weird", kind="paint", config=Documented, apply=lambda m, c: m)


def test_info_counts_and_vit_base_gmacs_match_timm():
    model = vk.load("vit_base_patch16_224", pretrained=False)
    info = vk.info(model)
    assert abs(info.gmacs - 17.6) / 17.6 <= 0.02, f"{info.gmacs:.3f} GMACs, timm publishes 17.6"
    assert info.total_params == sum(p.numel() for p in model.parameters()) == 86_567_656
    assert all(b.attn.fused_attn for b in model.blocks), "counting must restore fused attention"
    vk.adapt(model, "linear")
    info = vk.info(model)
    assert info.trainable_params == info.head_params == 768 * 1000 + 1000
    assert "linear(lr=0.001, weight_decay=0.0001)" in str(info) and f"({100 * 769_000 / 86_567_656:.3f}%)" in str(info)


@pytest.mark.parametrize("name", ["vpt", "ssf"])
def test_info_and_transform_work_after_methods_that_wrap_or_prompt(name):
    model = make_variant("plain")
    vk.adapt(model, name)
    info = vk.info(model)  # FLOP counting with trainable prompts; in_chans behind a wrapped patch projection
    assert info.gmacs > 0 and info.trainable_params < info.total_params
    assert vk.data.data_config(model)["input_size"] == (3, 32, 32)


def test_misspelt_lora_names_lora():
    with pytest.raises(ValueError, match="did you mean `lora`"):
        vk.apply(make_variant("plain"), "lroa")


def test_methods_attacks_objectives_and_distill_methods_share_one_registry():
    """One `Registry` behind the four tables: the same name checks, unknown-name wording and --help listing."""
    from vitkit.distill import base as distill_base
    from vitkit.pretrain import OBJECTIVES
    from vitkit.robust.api import ATTACKS

    @dataclass(frozen=True)
    class Documented:
        x: int = field(default=1, metadata={"help": "the x"})

    table = registry.Registry("widget", (), context="demo: ")
    table.add(registry.Method("knob", "adapt", Documented, _identity), owner=_identity)
    with pytest.raises(ValueError, match="demo: widget `knob` is already registered by test_registry"):
        table.add(registry.Method("knob", "adapt", Documented, _identity), owner=_other)
    with pytest.raises(ValueError, match="demo: widget name `Knob` must be lower case"):
        table.add(registry.Method("Knob", "adapt", Documented, _identity), owner=_identity)
    with pytest.raises(ValueError, match=r"demo: unknown widget `knbo`; did you mean `knob`\? registered: knob"):
        table.get("knbo")
    assert table.help("widgets:").splitlines()[1:] == ["  knob: The method registry: names, config validation, kinds, "
                                                       "order of application.", "      x=1  the x"]
    for table, name, wrong, message in [(registry.METHODS, "lora", "lroa", "unknown method `lroa`; did you mean"),
                                        (ATTACKS, "pgd", "pdg", "attack: unknown method `pdg`; did you mean `pgd`"),
                                        (OBJECTIVES, "mae", "mea", "pretrain: unknown objective `mea`; did you mean"),
                                        (distill_base.METHODS, "kd", "kdd", "unknown distill method `kdd`; did you")]:
        assert isinstance(table, registry.Registry) and table.get(name).name == name
        with pytest.raises(ValueError, match=message):
            table.get(wrong)


def _identity(model, cfg):
    return model


def _other(model, cfg):
    return model
