"""Order of application (issue 11.2): a token method applied *before* an adapter computes exactly what it
computes applied after it. The taps (ATS's values from `attn.qkv` in particular) must read what attention
computes even when LoRA / PEFT / SSF wrap the tapped module later."""
from __future__ import annotations

import zlib

import pytest
import torch

import vitkit as vk
from conftest import make_variant

TOKEN = {"tome": dict(r=6), "evit": dict(keep_rate=0.5), "ats": dict(num_samples=24), "gtp": dict(num_prop=6)}
ADAPTERS = {
    "lora_qv": ("lora", dict(rank=2)),
    "lora_qkv": ("lora", dict(rank=2, targets=("qkv",))),
    "loha_qkv": ("lora", dict(rank=2, targets=("qkv",), tuner="loha")),
    "ssf": ("ssf", {}),
    "adaptformer": ("adaptformer", {}),
    "vpt": ("vpt", dict(num_prompts=3)),
}
BASE_NAMES = {n for n, _ in make_variant("plain").named_parameters()}


def _randomise_adapter(model):
    """Give every adapter parameter a visible value, the same in both models (seeded by its name)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in BASE_NAMES or "base_layer" in n:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(n.encode()))
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "scale" in n else 0.3 * noise)


def _build(token: str, adapter: str, token_first: bool):
    model = make_variant("plain")
    name, config = ADAPTERS[adapter]
    steps = [lambda: vk.accelerate(model, token, **TOKEN[token]), lambda: vk.adapt(model, name, **config)]
    for step in (steps if token_first else steps[::-1]):
        step()
    _randomise_adapter(model)
    return model.eval()


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("token", list(TOKEN))
def test_token_method_before_adapter_equals_after(token, adapter, images):
    after = _build(token, adapter, token_first=False)  # the reference order: tapped modules already wrapped
    before = _build(token, adapter, token_first=True)
    plain = make_variant("plain").eval()
    with torch.no_grad():
        expected = after(images)
        expected_source = vk.get_runner(after).state.source
        ours = before(images)
        ours_source = vk.get_runner(before).state.source
        assert (expected - plain(images)).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_source, expected_source)  # the same tokens were merged / kept


@pytest.mark.parametrize("adapter", ["lora_qv", "lora_qkv", "loha_qkv", "ssf"])
def test_ats_value_norms_read_the_adapted_qkv(adapter, monkeypatch):
    """ATS applied first: the V it scores in its first block is the V slice of what the *adapted* qkv returns
    (plain-torch oracle from the block input), not the wrapped Linear's output."""
    from vitkit.tokens import ats as ats_mod

    model = _build("ats", adapter, token_first=True)
    first = min(ats_mod.ats_blocks(model, ats_mod.Config(**TOKEN["ats"])))
    block = model.blocks[first]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    real = ats_mod.algo.significance
    monkeypatch.setattr(ats_mod.algo, "significance", lambda a, v: seen.setdefault("v", v) is not None and real(a, v))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(images)
        x = seen["x"]
        C = x.shape[-1]
        oracle_v = block.attn.qkv(block.norm1(x))[0, 1:, 2 * C:]  # the module attention calls, after wrapping
        base = block.attn.qkv
        while hasattr(base, "base_layer"):
            base = base.base_layer
        unadapted = torch.nn.functional.linear(block.norm1(x), base.weight, base.bias)[0, 1:, 2 * C:]
    assert (oracle_v - unadapted).abs().max() > 1e-3, "the adapter must change V"
    torch.testing.assert_close(seen["v"], oracle_v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("adapter", ["lora_qv", "lora_qkv"])
def test_tap_follows_a_merge_and_a_deep_copy(adapter, images):
    """After `lora.merge` (qkv is a plain Linear again) and in a deep copy, the taps still read attention's qkv."""
    import copy

    from vitkit.adapt import lora

    model = _build("ats", adapter, token_first=True)
    with torch.no_grad():
        expected = model(images)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(images), expected, atol=1e-6, rtol=0)
        lora.merge(model)
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)
