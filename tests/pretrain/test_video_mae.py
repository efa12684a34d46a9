"""Video MAE (tube masking) against a plain-torch oracle from the VideoMAE spec; imports no vitkit code in the
oracle: it takes the model's and the decoder's own weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.pretrain import get_objective
from vitkit.pretrain.video_mae_algo import tube_mask


def test_tube_mask_masks_the_same_patches_in_every_time_slot():
    keep, masked = tube_mask(3, 4, 64, 0.9, None)
    assert keep.shape == (3, 4 * 6) and masked.shape == (3, 4 * 58)
    for b in range(3):
        assert sorted(keep[b].tolist() + masked[b].tolist()) == list(range(256))
        spatial = [set((masked[b][masked[b] // 64 == s] % 64).tolist()) for s in range(4)]
        assert all(s == spatial[0] for s in spatial) and len(spatial[0]) == 58
    assert not torch.equal(masked[0], masked[1])


def encode_oracle(sd, tokens, eps=1e-6, heads=4):
    """Pre-norm blocks + final norm on tokens (B, n, D), by hand."""
    lin = lambda n, x: F.linear(x, sd[f"{n}.weight"], sd.get(f"{n}.bias"))  # noqa: E731
    ln = lambda n, x: F.layer_norm(x, x.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], eps)  # noqa: E731
    t = tokens
    b, n, d = t.shape
    for i in range(sum(1 for k in sd if k.endswith(".norm1.weight"))):
        blk = f"blocks.{i}."
        q, k, v = lin(blk + "attn.qkv", ln(blk + "norm1", t)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        t = t + lin(blk + "attn.proj", a.transpose(1, 2).reshape(b, n, d))
        t = t + lin(blk + "mlp.fc2", F.gelu(lin(blk + "mlp.fc1", ln(blk + "norm2", t))))
    return ln("norm", t)


def test_video_mae_loss_matches_oracle():
    model = make_variant("plain", seed=20)
    vk.adapt(model, "video", num_frames=4, tubelet=2)
    with torch.no_grad():
        model.patch_embed.time_embed.normal_(0, 0.3)
    entry = get_objective("video-mae")
    torch.manual_seed(0)
    obj = entry.objective(model, entry.config(mask_ratio=0.75))
    clips = torch.randn(2, 3, 4, 32, 32)
    keep, masked = tube_mask(2, 2, 64, 0.75, None)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w3 = sd["patch_embed.proj.weight"]  # (D, 3, 2, 4, 4)
    with torch.no_grad():
        got = obj.loss(clips, keep, masked)
        toks, pix = [], []
        for s in range(2):  # time slot s: frames 2s, 2s+1
            y = sum(F.conv2d(clips[:, :, 2 * s + k], w3[:, :, k], stride=4) for k in range(2))
            y = y + sd["patch_embed.proj.bias"][:, None, None]
            toks.append(y.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:] + sd["patch_embed.time_embed"][:, s])
            for r in range(8):
                for c in range(8):  # tubelet pixels ordered (frame, row, col, channel)
                    cube = clips[:, :, 2 * s:2 * s + 2, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
                    pix.append(cube.permute(0, 2, 3, 4, 1).reshape(2, -1))
        toks, pix = torch.cat(toks, 1), torch.stack(pix, 1)  # (B, 128, D), (B, 128, 96)
        cls = sd["cls_token"] + sd["pos_embed"][:, :1]
        losses = []
        for b in range(2):
            enc = encode_oracle(sd, torch.cat([cls[0], toks[b, keep[b]]])[None])[0]
            y = obj.decoder_embed(enc)
            seq = obj.mask_token[0].expand(128, -1).clone()
            seq[keep[b]] = y[1:]
            z = obj.decoder_norm(obj.decoder(torch.cat([y[:1], seq])[None] + obj.decoder_pos))[0, 1:]
            pred = obj.decoder_pred(z[masked[b]])
            t = pix[b, masked[b]]
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
            losses.append(((pred - t) ** 2).mean())
        torch.testing.assert_close(got, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_video_mae_trains_and_refuses_images(tmp_path):
    model = make_variant("plain", seed=21)
    with pytest.raises(NotImplementedError, match="video-mae: needs a model adapted to clips"):
        vk.pretrain(model, vk.data.tensors(torch.randn(4, 3, 32, 32), [0] * 4), objective="video-mae")
    vk.adapt(model, "video", num_frames=4)
    vk.adapt(model, "full")
    before, head = model.blocks[0].attn.qkv.weight.detach().clone(), model.head.weight.detach().clone()
    torch.manual_seed(0)
    clips = torch.randn(8, 3, 1, 32, 32).expand(-1, -1, 4, -1, -1).contiguous()
    vk.pretrain(model, vk.data.tensors(clips, [0] * 8), objective="video-mae", epochs=1, batch_size=4,
                out_dir=tmp_path / "run", progress=False)
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)  # what vk.fit fine-tunes next, in place
    assert torch.equal(head, model.head.weight) and all(p.requires_grad for p in model.parameters())  # as before
    assert not hasattr(model, "decoder_embed") and [a.name for a in vk.applied(model)] == ["video", "full"]
    with pytest.raises(ValueError, match="video-mae: clips must have the model's 4 frames of 32x32"):
        get_objective("video-mae").objective(model, get_objective("video-mae").config())(torch.randn(2, 3, 2, 32, 32))


@pytest.mark.parametrize("ratio", [0.005, 0.995])
def test_video_mae_refuses_a_ratio_that_masks_nothing_or_everything(ratio):
    """64 positions per time slot: 0.005 masks round(0.32) = 0 (an empty loss, NaN), 0.995 masks all 64."""
    model = make_variant("plain", seed=22)
    vk.adapt(model, "video", num_frames=4, tubelet=2)
    entry = get_objective("video-mae")
    with pytest.raises(ValueError, match=f"video-mae: `mask_ratio` {ratio} masks"):
        entry.objective(model, entry.config(mask_ratio=ratio))


def test_video_mae_uses_gradient_checkpointing_with_the_same_gradients():
    """With `set_grad_checkpointing()`, every block runs again in the backward pass; the gradients are unchanged."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model = make_variant("plain", seed=23)
        vk.adapt(model, "video", num_frames=4, tubelet=2)
        vk.adapt(model, "full")
        model.set_grad_checkpointing(checkpointing)
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(checkpointing))
        entry = get_objective("video-mae")
        torch.manual_seed(0)
        obj = entry.objective(model, entry.config())
        keep, masked = tube_mask(2, 2, 64, 0.9, None)
        obj.loss(torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)), keep, masked).backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert calls.count(False) == 1 and calls.count(True) == 2, f"block 0 forwards: {calls}"
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
