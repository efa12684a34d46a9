"""Input adapters (channels, spectrogram, paired, video, points): each against a plain-torch oracle written from
../shared/methods/applications.md §2, plus the identities the spec names. The oracles build the expected kernels,
position embeddings and tokens from the *untouched* model's tensors and run the blocks by hand; they import
nothing from vitkit."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant

HEADS = 4  # conftest's TINY


def blocks(sd: dict, t: torch.Tensor, prefix: int, pool: str = "token", eps: float = 1e-6) -> torch.Tensor:
    """Logits of a timm ViT from embedded tokens `t` (B, prefix + N, D) (pre-norm blocks, exact GELU)."""
    lin = lambda n, x: F.linear(x, sd[f"{n}.weight"], sd.get(f"{n}.bias"))  # noqa: E731
    ln = lambda n, x: F.layer_norm(x, x.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], eps)  # noqa: E731
    b, n, d = t.shape
    for i in range(sum(1 for k in sd if k.endswith(".norm1.weight"))):
        blk = f"blocks.{i}."
        q, k, v = lin(blk + "attn.qkv", ln(blk + "norm1", t)).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1) @ v
        t = t + lin(blk + "attn.proj", a.transpose(1, 2).reshape(b, n, d))
        t = t + lin(blk + "mlp.fc2", F.gelu(lin(blk + "mlp.fc1", ln(blk + "norm2", t))))
    t = ln("norm", t)
    pooled = t[:, 0] if pool == "token" else t[:, prefix:].mean(1)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def embed_images(sd: dict, x: torch.Tensor, kernel: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[cls | patches] + pos (a class-token ViT whose pos_embed covers the prefix), patches from `kernel`."""
    t = F.conv2d(x, kernel, sd["patch_embed.proj.bias"], stride=kernel.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + pos


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb_trainable(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def round_trip(model, tmp_path, x):
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)
    return loaded


# ---------------------------------------------------------------------------------------------------- channels

BANDS = ("B02", "B03", "B04", "B08", "B11")  # blue, green, red, NIR, SWIR


def test_channels_zero_extra_bands_leave_outputs_unchanged():
    model = make_variant("plain", seed=3)
    reference = copy.deepcopy(model)
    vk.adapt(model, "channels", bands=BANDS, rgb=("B04", "B03", "B02"), rest="zero")
    rgb = torch.randn(2, 3, 32, 32)
    tile = torch.cat([rgb[:, [2, 1, 0]], 5 * torch.randn(2, 2, 32, 32)], 1)  # NIR, SWIR: anything
    with torch.no_grad():
        torch.testing.assert_close(model(tile), reference(rgb), atol=1e-5, rtol=1e-5)


def test_channels_mean_start_matches_oracle_and_saves(tmp_path):
    model = make_variant("plain", seed=4)
    sd = state(model)
    vk.adapt(model, "channels", bands=BANDS, rgb=("B04", "B03", "B02"), rest="mean")
    w = sd["patch_embed.proj.weight"]  # (D, 3, p, p): R, G, B
    mean = (w[:, 0] + w[:, 1] + w[:, 2]) / 3
    kernel = torch.stack([w[:, 2], w[:, 1], w[:, 0], mean, mean], 1)  # B02=blue, B03=green, B04=red, rest: mean
    tile = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        expected = blocks(sd, embed_images(sd, tile, kernel, sd["pos_embed"]), 1)
        torch.testing.assert_close(model(tile), expected, atol=1e-4, rtol=1e-4)
    assert model.pretrained_cfg["mean"] == (0.5,) * 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"}
    perturb_trainable(model)
    round_trip(model, tmp_path, tile)


def test_channels_refuses_bad_bands_and_wrapped_embedding():
    with pytest.raises(ValueError, match="channels: `rgb` must be up to 3 distinct names"):
        vk.adapt(make_variant("plain"), "channels", bands=("a", "b"), rgb=("a", "c"))
    with pytest.raises(ValueError, match="names \\['a'\\] more than once"):
        vk.adapt(make_variant("plain"), "channels", bands=("a", "a"), rgb=("a",))
    model = vk.adapt(make_variant("plain"), "ssf")
    with pytest.raises(NotImplementedError, match="channels: needs a timm patch embedding whose `proj` is a Conv2d"):
        vk.adapt(model, "channels")


def test_channels_then_ssf_saves_and_loads(tmp_path):
    model = vk.adapt(vk.adapt(make_variant("plain", seed=14), "channels", bands=BANDS), "ssf")
    perturb_trainable(model)
    loaded = round_trip(model.eval(), tmp_path, torch.randn(2, 5, 32, 32))
    assert loaded.pretrained_cfg["mean"] == (0.5,) * 5


# ------------------------------------------------------------------------------------------------- spectrogram

def test_spectrogram_grey_sum_equals_rgb_model_on_replicated_image():
    model = make_variant("plain", seed=5)
    reference = copy.deepcopy(model)
    vk.adapt(model, "spectrogram")
    grey = torch.randn(2, 1, 32, 32)  # normalised with equal per-channel mean/std (0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(grey), reference(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_spectrogram_non_square_grid_matches_oracle(tmp_path):
    model = make_variant("plain", seed=6)
    sd = state(model)
    vk.adapt(model, "spectrogram", img_size=(16, 48))  # 8x8 grid -> 4 mel rows x 12 frames
    w = sd["patch_embed.proj.weight"]
    grid = sd["pos_embed"][:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 12), mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], 1)
    spec = torch.randn(2, 1, 16, 48)
    with torch.no_grad():
        expected = blocks(sd, embed_images(sd, spec, w.sum(1, keepdim=True), pos), 1)
        torch.testing.assert_close(model(spec), expected, atol=1e-4, rtol=1e-4)
    assert vk.token_layout(model).grid_size == (4, 12)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "head.weight", "head.bias"}
    perturb_trainable(model)
    round_trip(model, tmp_path, spec)
    with pytest.raises(ValueError, match="spectrogram: `img_size` 10x48 must be a positive multiple"):
        vk.adapt(make_variant("plain"), "spectrogram", img_size=(10, 48))


def mel_oracle(n_freqs, n_mels, sr):
    """Triangular HTK-mel filters, one bin at a time (python floats)."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    top = mel(sr / 2)
    edges = [hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = torch.zeros(n_freqs, n_mels)
    for j in range(n_freqs):
        f = j * (sr / 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            if lo < f <= mid:
                fb[j, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[j, m] = (hi - f) / (hi - mid)
    return fb


def test_mel_filterbank_and_log_mel_match_oracle():
    from vitkit.adapt.spectrogram import log_mel
    from vitkit.adapt.spectrogram_algo import mel_filterbank

    fb = mel_oracle(201, 40, 16000)
    torch.testing.assert_close(mel_filterbank(201, 40, 16000), fb, atol=1e-5, rtol=1e-5)
    wave = torch.sin(2 * math.pi * 440 * torch.arange(4000) / 16000) + 0.1 * torch.randn(4000)
    n_fft, hop = 400, 160
    padded = np.pad(wave.double().numpy(), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i * hop:i * hop + n_fft] * window for i in range(1 + len(wave) // hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, 201)
    expected = torch.from_numpy(np.log(power @ fb.double().numpy() + 1e-6).T).float()
    got = log_mel(wave, 16000, n_fft, hop, n_mels=40)
    assert got.shape == (1, 1, 40, 26)
    torch.testing.assert_close(got[0, 0], expected, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------------ paired

@pytest.mark.parametrize("variant", ["plain", "reg_no_cls"])
def test_paired_zero_second_image_equals_single_image_model(variant):
    model = make_variant(variant, seed=7)
    reference = copy.deepcopy(model)
    vk.adapt(model, "paired")
    perturb_trainable(model)  # the second image's kernels move with training; a zero image still adds nothing
    with torch.no_grad():
        model.patch_embed.proj.weight[:, :3] = reference.patch_embed.proj.weight
        model.patch_embed.proj.bias.copy_(reference.patch_embed.proj.bias)
        model.head.load_state_dict(reference.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([x, torch.zeros_like(x)], 1)), reference(x), atol=1e-5, rtol=1e-5)


def test_paired_early_fusion_matches_oracle(tmp_path):
    model = make_variant("plain", seed=8)
    sd = state(model)
    vk.adapt(model, "paired")
    assert torch.equal(model.patch_embed.proj.weight[:, 3:], torch.zeros_like(model.patch_embed.proj.weight[:, 3:]))
    perturb_trainable(model)
    w2 = model.patch_embed.proj.weight.detach()[:, 3:]
    sd_now = state(model)
    pair = torch.randn(2, 6, 32, 32)
    kernel = torch.cat([sd_now["patch_embed.proj.weight"][:, :3], w2], 1)
    with torch.no_grad():
        expected = blocks(sd_now, embed_images(sd_now, pair, kernel, sd["pos_embed"]), 1)
        torch.testing.assert_close(model(pair), expected, atol=1e-4, rtol=1e-4)
    round_trip(model, tmp_path, pair)


def test_paired_token_streams_match_oracle(tmp_path):
    model = make_variant("plain", seed=9)
    sd = state(model)
    vk.adapt(model, "paired", mode="tokens")
    seg = model.patch_embed.segment.detach()
    pair = torch.randn(2, 6, 32, 32)
    w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    streams = [F.conv2d(img, w, b, stride=4).flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:] + seg[i]
               for i, img in enumerate(pair.chunk(2, 1))]
    cls = sd["cls_token"] + sd["pos_embed"][:, :1]
    with torch.no_grad():
        expected = blocks(sd, torch.cat([cls.expand(2, -1, -1), *streams], 1), 1)
        torch.testing.assert_close(model(pair), expected, atol=1e-4, rtol=1e-4)
    assert vk.token_layout(model).grid_size == (16, 8)
    perturb_trainable(model)
    round_trip(model, tmp_path, pair)
    with pytest.raises(ValueError, match="paired: expected image pairs \\(B, 6, H, W\\)"):
        model(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------------- video

def tubelet_tokens(sd: dict, clip: torch.Tensor, kernel2d: torch.Tensor, t: int, init: str) -> torch.Tensor:
    """(B, T'·N, D) tubelet tokens as sums of 2-D convolutions of single frames with the spec's kernels."""
    per_frame = [kernel2d / t] * t if init == "replicate" else [kernel2d if k == t // 2 else 0 * kernel2d
                                                                 for k in range(t)]
    slots = []
    for s in range(clip.shape[2] // t):
        y = sum(F.conv2d(clip[:, :, s * t + k], per_frame[k], stride=kernel2d.shape[-1]) for k in range(t))
        slots.append((y + sd["patch_embed.proj.bias"][:, None, None]).flatten(2).transpose(1, 2))
    return torch.stack(slots, 1)  # (B, T', N, D)


@pytest.mark.parametrize("init", ["replicate", "centre"])
def test_video_tubelets_match_oracle(init, tmp_path):
    model = make_variant("plain", seed=10)
    sd = state(model)
    vk.adapt(model, "video", num_frames=6, tubelet=3, init=init)
    with torch.no_grad():
        model.patch_embed.time_embed.normal_(0, 0.5)  # as if trained: each time slot its own position
    time = model.patch_embed.time_embed.detach()
    clip = torch.randn(2, 3, 6, 32, 32)  # moving content: the frames differ
    tokens = tubelet_tokens(sd, clip, sd["patch_embed.proj.weight"], 3, init)
    tokens = (tokens + sd["pos_embed"][:, None, 1:] + time[:, :, None]).flatten(1, 2)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(2, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), blocks(sd, torch.cat([cls, tokens], 1), 1), atol=1e-4, rtol=1e-4)
    assert vk.token_layout(model).grid_size == (16, 8)
    round_trip(model, tmp_path, clip)


def test_video_static_clip_equals_image_model():
    """Replicated tubelets on a static clip: one time slot = the 2-D model (class token); four time slots = the
    2-D model when no prefix token sees itself once among copies (average pooling)."""
    image = torch.randn(2, 3, 32, 32)
    for variant, frames in (("registers", 2), ("no_cls_avg", 8)):
        model = make_variant(variant, seed=11)
        reference = copy.deepcopy(model)
        vk.adapt(model, "video", num_frames=frames, tubelet=2)
        clip = image.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        with torch.no_grad():
            torch.testing.assert_close(model(clip), reference(image), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="video: expected clips \\(B, 3, T, H, W\\)"):
        model(image)
    with pytest.raises(ValueError, match="video: `num_frames` \\(5\\) must be a positive multiple"):
        vk.adapt(make_variant("plain"), "video", num_frames=5)


# ------------------------------------------------------------------------------------------------------ points

def point_tokens_oracle(tok, sd: dict, cloud: torch.Tensor, g: int, k: int, views: int) -> torch.Tensor:
    """One cloud (N, 3) -> (G, D) tokens + projected positions, with loops over points (spec: FPS from the point
    farthest from the centroid, kNN, shared MLP + max, yaw i·π/V at 30° pitch, bilinear, border, mean of views)."""
    p = cloud - cloud.mean(0)
    p = p / p.norm(dim=1).max()
    chosen = [int(p.norm(dim=1).argmax())]
    while len(chosen) < g:
        d = torch.stack([(p - p[c]).norm(dim=1) for c in chosen]).min(0).values
        chosen.append(int(d.argmax()))
    centres = p[chosen]
    pos_grid = sd["pos_embed"][0, 1:].reshape(8, 8, -1)  # (gh, gw, D)
    tokens = []
    for c in centres:
        near = (p - c).norm(dim=1).argsort()[:k]
        f = tok.mlp1(p[near] - c)
        f = torch.cat([f, f.max(0).values.expand_as(f)], 1)
        token = tok.mlp2(f).max(0).values
        pos = 0
        for i in range(views):
            a, e = math.pi * i / views, math.radians(30)
            x1, y1, z1 = c[0] * math.cos(a) - c[1] * math.sin(a), c[0] * math.sin(a) + c[1] * math.cos(a), c[2]
            u, v = x1, y1 * math.cos(e) - z1 * math.sin(e)
            px = min(max(((u + 1) * 8 - 1) / 2, 0), 7)
            py = min(max(((v + 1) * 8 - 1) / 2, 0), 7)
            x0, y0 = int(math.floor(px)), int(math.floor(py))
            x1_, y1_ = min(x0 + 1, 7), min(y0 + 1, 7)
            fx, fy = px - x0, py - y0
            pos = pos + ((1 - fx) * (1 - fy) * pos_grid[y0, x0] + fx * (1 - fy) * pos_grid[y0, x1_]
                         + (1 - fx) * fy * pos_grid[y1_, x0] + fx * fy * pos_grid[y1_, x1_])
        tokens.append(token + pos / views)
    return torch.stack(tokens)


def test_points_match_oracle_and_are_permutation_invariant(tmp_path):
    model = make_variant("plain", seed=12)
    sd = state(model)
    vk.adapt(model, "points", num_groups=16, group_size=8, views=3, hidden=32)
    torch.manual_seed(0)
    clouds = torch.randn(2, 200, 3) * torch.tensor([2.0, 1.0, 0.5]) + 3.0  # off-centre, anisotropic
    tok = model.patch_embed
    with torch.no_grad():
        tokens = torch.stack([point_tokens_oracle(tok, sd, c, 16, 8, 3) for c in clouds])
        cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(2, -1, -1)
        expected = blocks(sd, torch.cat([cls, tokens], 1), 1)
        torch.testing.assert_close(model(clouds), expected, atol=1e-4, rtol=1e-4)
        shuffled = clouds[:, torch.randperm(200)]
        torch.testing.assert_close(model(shuffled), model(clouds), atol=1e-5, rtol=1e-5)
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("patch_embed")} \
        == {"mlp1", "mlp2"}
    assert not model.pos_embed.requires_grad
    perturb_trainable(model)
    round_trip(model, tmp_path, clouds)
    with pytest.raises(ValueError, match="points: expected point clouds \\(B, N, 3\\) with N >= 16"):
        model(torch.randn(1, 10, 3))


# ------------------------------------------------------------------------------------------------- composition

ADAPTERS = [
    pytest.param("channels", dict(bands=BANDS, rgb=("B04", "B03", "B02")), lambda: torch.randn(2, 5, 32, 32),
                 id="channels"),
    pytest.param("spectrogram", dict(img_size=(16, 48)), lambda: torch.randn(2, 1, 16, 48), id="spectrogram"),
    pytest.param("paired", dict(mode="tokens"), lambda: torch.randn(2, 6, 32, 32), id="paired-tokens"),
    pytest.param("video", dict(num_frames=4), lambda: torch.randn(2, 3, 4, 32, 32), id="video"),
    pytest.param("points", dict(num_groups=32, group_size=8), lambda: torch.randn(2, 128, 3), id="points"),
]


@pytest.mark.parametrize("name,cfg,make_input", ADAPTERS)
def test_adapter_composes_with_lora_vpt_tome_and_checkpointing(name, cfg, make_input, tmp_path):
    model = make_variant("registers", seed=13)
    vk.adapt(model, name, **cfg)
    vk.adapt(model, "lora", rank=2)
    vk.adapt(model, "vpt", num_prompts=2)
    vk.accelerate(model, "tome", r=4)
    x = make_input()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"patch_embed", "vpt", "head"} <= trainable and any(".lora_" in n for n, p in model.named_parameters()
                                                             if p.requires_grad)
    perturb_trainable(model)
    model.eval()
    loaded = round_trip(model, tmp_path, x)
    assert [a.name for a in vk.applied(loaded)] == [name, "lora", "vpt", "tome"]
    assert vk.info(loaded).gmacs > 0  # FLOPs counted on a blank input of the adapter's kind
    model.train().set_grad_checkpointing(True)
    model(x).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("patch_embed") and p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bench_takes_input_adapters_in_chains_one_input_at_a_time():
    """The bench runs them on their procedural task (tests/bench/test_bench_inputs.py); a chain has one input."""
    from vitkit.bench.recipe import all_registered_chains, check_chain

    for name in ("channels", "spectrogram", "paired", "video", "points"):
        assert check_chain(f"lora+{name}") is None and name in all_registered_chains()
    assert "a chain takes one kind of input" in check_chain("channels+video")
