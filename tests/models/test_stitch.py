"""SN-Netv2 stitching: identity of a self-stitch, the least-squares init and a route against a plain-torch oracle,
FLOPs-aware sampling, training only the stitching layers, and clear refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.models.stitch_algo import flops_bins, sample_route


def _pair(widths=(64, 96), depths=(4, 6)):
    torch.manual_seed(0)
    a = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=widths[0],
                depth=depths[0], num_heads=4, num_classes=10).eval()
    b = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=widths[1],
                depth=depths[1], num_heads=4, num_classes=10).eval()
    return a, b


def _tokens(model, x, upto):
    """Plain timm: tokens after the first `upto` blocks."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:upto]:
        h = block(h)
    return h


@pytest.mark.parametrize("name", ["plain", "registers", "reg_no_cls"])
def test_stitching_a_model_to_a_copy_of_itself_is_that_model(name):
    model = make_variant(name)
    x = torch.randn(8, 3, 32, 32)
    stitched = vk.stitch(model, copy.deepcopy(model), x, routes=["a3-b3", "b2-a2"])
    with torch.no_grad():
        want = model(x[:2])
        for route in ("a3-b3", "b2-a2", "a", "b"):
            stitched.route = route
            torch.testing.assert_close(stitched(x[:2]), want, atol=2e-4, rtol=1e-4)


MEAN_A, STD_A = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])
MEAN_B, STD_B = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.mark.parametrize("route", ["a2-b3", "b4-a1"])  # 64 -> 96 wide and 96 -> 64 wide, other depths
def test_least_squares_init_and_route_equal_a_plain_torch_oracle(route):
    a, b = _pair()
    vk.models.loading.set_data_config(a, mean=tuple(MEAN_A.tolist()), std=tuple(STD_A.tolist()))
    vk.models.loading.set_data_config(b, mean=tuple(MEAN_B.tolist()), std=tuple(STD_B.tolist()))
    x = torch.randn(6, 3, 32, 32)  # prepared for a; b sees the same pixels in its own normalisation
    x_b = ((x * STD_A.view(1, 3, 1, 1) + MEAN_A.view(1, 3, 1, 1)) - MEAN_B.view(1, 3, 1, 1)) / STD_B.view(1, 3, 1, 1)
    src, i, dst, j = (a, 2, b, 3) if route == "a2-b3" else (b, 4, a, 1)
    x_src, x_dst = (x, x_b) if src is a else (x_b, x)
    stitched = vk.stitch(a, b, x, routes=[route], rank=2)
    layer = stitched.stitches[route]
    with torch.no_grad():
        xs, yd = _tokens(src, x_src, i), _tokens(dst, x_dst, j)
        xs, yd = xs.reshape(-1, xs.shape[-1]), yd.reshape(-1, yd.shape[-1])
        design = torch.cat([xs, torch.ones(len(xs), 1)], 1).double()
        solution = torch.linalg.pinv(design) @ yd.double()  # normal-equation minimiser, another route than lstsq
        w, bias = solution[:-1].float(), solution[-1].float()
        torch.testing.assert_close(layer.weight, w, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(layer.bias, bias, atol=1e-4, rtol=1e-3)
        layer.up.normal_()  # a trained low-rank update: W_ls + down @ up
        h = _tokens(src, x_src[:2], i) @ (w + layer.down @ layer.up) + bias
        for block in dst.blocks[j:]:
            h = block(h)
        want = dst.head(dst.norm(h)[:, 0])
        torch.testing.assert_close(stitched(x[:2], route=route), want, atol=1e-4, rtol=1e-3)


def test_a_route_entering_the_other_anchor_converts_the_normalisation_exactly():
    a, b = _pair(widths=(64, 64), depths=(4, 4))
    vk.models.loading.set_data_config(a, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    vk.models.loading.set_data_config(b, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    raw = torch.rand(2, 3, 32, 32)
    xa = (raw - 0.5) / 0.5
    xb = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    stitched = vk.stitch(a, b, torch.randn(8, 3, 32, 32), routes=["a2-b2"])
    with torch.no_grad():
        torch.testing.assert_close(stitched(xa, route="b"), b(xb), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stitched(xa, route="a"), a(xa))


def test_routes_cover_both_directions_and_flops_order_the_anchors():
    a, b = _pair()
    stitched = vk.stitch(a, b, torch.randn(8, 3, 32, 32))
    routes = stitched.routes
    assert "a2-b3" in routes and "b3-a2" in routes and all(r in routes for r in ("a", "b"))
    assert all(k.startswith(("a", "b")) for k in stitched.stitches)
    assert stitched.flops["a"] < stitched.flops["b"]  # 64 x 4 blocks costs less than 96 x 6
    assert stitched.flops["a1-b1"] > stitched.flops["b1-a1"]  # 1 small + 5 big blocks vs 1 big + 3 small


def test_flops_aware_sampling_draws_bins_uniformly():
    flops = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 10.0]  # six cheap routes crowd one bin, one expensive route alone
    groups = flops_bins(flops, bins=2)
    assert groups == [[0, 1, 2, 3, 4, 5], [6]]
    g = torch.Generator().manual_seed(0)
    draws = [sample_route(groups, g) for _ in range(4000)]
    assert abs(draws.count(6) / 4000 - 0.5) < 0.03  # uniform over routes would give 1/7


def test_training_moves_only_the_stitching_layers_and_lowers_the_loss():
    a, b = _pair()
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    stitched = vk.stitch(a, b, x, routes=["a2-b3"], rank=4)
    frozen = {k: v.clone() for k, v in stitched.anchors.state_dict().items()}
    trainable = [n for n, p in stitched.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("stitches.") for n in trainable)
    stitched.train()
    opt = torch.optim.AdamW([p for p in stitched.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(stitched(x, route="a2-b3"), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, stitched.anchors.state_dict()[k]) for k, v in frozen.items())


def test_pareto_rows_and_training_mode_sampling():
    a, b = _pair()
    x = torch.randn(16, 3, 32, 32)
    stitched = vk.stitch(a, b, x, window=0)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (16,)))
    rows = stitched.pareto(data)
    assert [r["flops"] for r in rows] == sorted(r["flops"] for r in rows)
    assert {r["route"] for r in rows} == set(stitched.routes) and all(0 <= r["top1"] <= 1 for r in rows)
    stitched.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        stitched(x[:1])
        seen.add(stitched._exit)
    assert seen == {"a", "b"}  # routes of both exits are sampled in training mode
    sampled = set()
    for _ in range(40):
        with torch.no_grad():
            stitched(x[:1])
        sampled.add(stitched._route_taken)
    assert sampled <= set(stitched.stitches)  # frozen anchors: only stitched routes train
    assert len(sampled) > 3


def test_bad_anchors_and_routes_are_refused():
    a, b = _pair()
    x = torch.randn(8, 3, 32, 32)
    other = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=4,
                    num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match="token grid"):
        vk.stitch(a, other, x)
    with pytest.raises(ValueError, match="outside the anchors"):
        vk.stitch(a, b, x, routes=["a9-b1"])
    with pytest.raises(ValueError, match="not 'a', 'b'"):
        vk.stitch(a, b, x, routes=["a2-a3"])
    with pytest.raises(ValueError, match="calibration"):
        vk.stitch(a, b, x[:1], routes=["b2-a2"])  # 65 token rows for a 96-wide fit
    stitched = vk.stitch(a, b, x, routes=["a2-b2"])
    with pytest.raises(ValueError, match="no route"):
        stitched(x, route="a1-b1")
    with pytest.raises(ValueError, match="cannot describe"):
        vk.save(stitched, "unused")
    vk.adapt(a, "lora", rank=2)
    with pytest.raises(ValueError, match="methods applied"):
        vk.stitch(a, b, x)
