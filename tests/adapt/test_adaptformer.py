"""AdaptFormer: identity at init, counts, the branch reads x1 (not norm2(x1)), s = 0, what trains, state dict."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vit_oracle import base_tensors, vit_forward
from vitkit.adapt.adaptformer import Adapter

D, L = TINY["embed_dim"], TINY["depth"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity_at_init(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.adapt(model, "adaptformer")
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bottleneck", [8, 64])
def test_trainable_count_formula(bottleneck):
    model = make_variant("plain")
    vk.adapt(model, "adaptformer", bottleneck=bottleneck)
    per_block = 2 * D * bottleneck + bottleneck + D  # down (D->d, bias) + up (d->D, bias)
    assert trainable(model) == L * per_block + D * 10 + 10
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".adaptformer." in n or n.startswith("head.")}


def test_vit_base_count_is_the_papers_1_26m():
    """ViT-B, d = 64: 12 x 99,136 = 1,189,632, + a 100-class head 76,900 = 1,266,532 (the paper's "1.26 M")."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    vk.adapt(model, "adaptformer")
    assert trainable(model) == 1_266_532
    assert trainable(model) - sum(p.numel() for p in model.head.parameters()) == 1_189_632


def test_branch_reads_residual_stream_not_norm2():
    model = make_variant("layerscale")
    vk.adapt(model, "adaptformer", scale=0.5)
    block = model.blocks[1]
    torch.manual_seed(0)
    with torch.no_grad():
        block.adaptformer.up.weight.normal_()
        block.adaptformer.up.bias.normal_()
        x = torch.randn(2, 65, D)
        x1 = x + block.ls1(block.attn(block.norm1(x)))
        mlp = block.ls2(block.mlp(block.norm2(x1)))
        a = block.adaptformer
        expected = x1 + mlp + 0.5 * a.up(torch.relu(a.down(x1)))
        wrong = x1 + mlp + 0.5 * a.up(torch.relu(a.down(block.norm2(x1))))
        out = block(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - wrong).abs().max() > 1e-2


def test_scale_zero_is_identity_after_training(images):
    model = make_variant("plain")
    reference = copy.deepcopy(model)
    vk.adapt(model, "adaptformer", scale=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adaptformer." in name:
                p.add_(torch.randn_like(p))
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_adapters_are_submodules_in_the_state_dict():
    model = vk.adapt(make_variant("plain"), "adaptformer")
    assert all(isinstance(b.adaptformer, Adapter) for b in model.blocks)
    keys = [k for k in model.state_dict() if ".adaptformer." in k]
    assert len(keys) == 4 * L and "blocks.0.adaptformer.down.weight" in keys


def test_dropout_follows_train_mode(images):
    model = vk.adapt(make_variant("plain"), "adaptformer", dropout=0.5)
    with torch.no_grad():
        for b in model.blocks:
            b.adaptformer.up.weight.normal_()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images))
        model.train()
        assert (model(images) - model(images)).abs().max() > 0


# ---------------------------------------------------------------- oracle: plain torch from the spec (P2)

def adapter_oracle(sd, scale, drop=lambda h: h):
    """x2 = x1 + mlp(norm2(x1)) + s·up(drop(relu(down(x1)))): reads the residual stream x1, outside ls2/dp2."""
    def mlp_parallel(i, x1):
        a = f"blocks.{i}.adaptformer."
        h = drop(torch.relu(torch.nn.functional.linear(x1, sd[a + "down.weight"], sd[a + "down.bias"])))
        return scale * torch.nn.functional.linear(h, sd[a + "up.weight"], sd[a + "up.bias"])
    return mlp_parallel


def test_matches_plain_torch_oracle(images):
    model = vk.adapt(make_variant("plain"), "adaptformer", bottleneck=16, scale=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        for b in model.blocks:  # up starts at zero: give it (and the biases) values that change the logits
            for p in (b.adaptformer.up.weight, b.adaptformer.up.bias, b.adaptformer.down.bias):
                p.normal_(0, 0.2)
        out = model(images)
    sd = base_tensors(model)
    expected = vit_forward(sd, images, heads=4, mlp_parallel=adapter_oracle(sd, 0.5))
    assert (expected - make_variant("plain")(images)).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dropout_sits_between_relu_and_up():
    """Train mode, fixed seed: one dropout mask on relu(down(x1)) (bottleneck width), none elsewhere."""
    model = vk.adapt(make_variant("plain"), "adaptformer", bottleneck=16, dropout=0.5).train()
    adapter, x1 = model.blocks[2].adaptformer, torch.randn(2, 7, D)
    with torch.no_grad():
        adapter.up.weight.normal_()
        torch.manual_seed(4)
        out = adapter(x1)
        sd = {f"blocks.2.adaptformer.{k}": v for k, v in adapter.state_dict().items()}
        torch.manual_seed(4)
        expected = adapter_oracle(sd, 0.1, lambda h: torch.nn.functional.dropout(h, 0.5, True))(2, x1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_refuses_second_application_and_bad_config():
    model = vk.adapt(make_variant("plain"), "adaptformer")
    with pytest.raises(ValueError, match="adaptformer: already applied"):
        vk.adapt(model, "adaptformer")
    with pytest.raises(ValueError, match="adaptformer: `bottleneck` must be >= 1"):
        vk.adapt(make_variant("plain"), "adaptformer", bottleneck=0)
