"""Token layout on the conformance variants and at two dynamic input sizes."""
from __future__ import annotations

import pytest
import torch

import vitkit as vk
from conftest import make_variant

CASES = [
    # variant, extra args, prefix, cls index, register indices, pos_embed covers prefix
    pytest.param("plain", {}, 1, 0, (), True, id="cls"),
    pytest.param("registers", {}, 5, 0, (1, 2, 3, 4), True, id="cls+4reg"),
    pytest.param("no_cls_avg", {}, 0, None, (), False, id="no-cls-avg"),
    pytest.param("registers", dict(no_embed_class=True), 5, 0, (1, 2, 3, 4), False, id="no-embed-class"),
    pytest.param("layerscale", {}, 1, 0, (), True, id="layerscale"),
    pytest.param("qk_norm", {}, 1, 0, (), True, id="qk-norm"),
]


@pytest.mark.parametrize("name,extra,prefix,cls_index,regs,covers", CASES)
def test_layout_matches_the_model(name, extra, prefix, cls_index, regs, covers):
    model = make_variant(name, **extra)
    layout = vk.token_layout(model)
    assert layout.num_prefix_tokens == prefix == model.num_prefix_tokens
    assert layout.cls_index == cls_index
    assert layout.reg_indices == regs
    assert layout.pos_embed_covers_prefix == covers
    assert layout.grid_size == (8, 8) and layout.num_tokens() == prefix + 64
    with torch.no_grad():  # the layout predicts the real sequence length
        tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    assert tokens.shape[1] == layout.num_tokens()


@pytest.mark.parametrize("size,grid", [(32, (8, 8)), ((48, 64), (12, 16))])
def test_dynamic_img_size_grid(size, grid):
    model = make_variant("registers", dynamic_img_size=True)
    layout = vk.token_layout(model)
    assert layout.grid(size) == grid
    hw = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, *hw))
    assert tokens.shape[1] == layout.num_tokens(size) == 5 + grid[0] * grid[1]


def test_wrong_input_size_is_a_clear_error():
    layout = vk.token_layout(make_variant("plain"))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        layout.grid(48)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vk.token_layout(make_variant("plain", dynamic_img_size=True)).grid(30)
