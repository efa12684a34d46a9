"""Prompt-point zero-shot segmentation (MMC protocol) and attention-capture cost, measured in one run.

    python benchmarks/explain_segmentation.py [--per-class 8] [--img-dir docs/img]

1. Composites: CIFAR-10 test JPEGs (first `per-class` of each class) pasted, patch-aligned, onto crops of
   scikit-image's brick/grass/gravel textures (64 px canvas, exact masks); one prompt at each object's centre.
   mIoU at the best threshold, at τ = 0.5, and the area under IoU(τ) for the shamail checkpoint vs random twins.
2. 2×2 mosaics of the same images: intra- vs inter-object patch similarity (AUROC, histogram overlap).
3. Cost of `vk.attention` (all layers, fused SDPA kept) vs the plain forward and vs timm's eager path
   (`fused_attn=False` + a hook on `attn_drop`), same inputs, same run.
Writes docs/img/explain_composites.png and docs/img/explain_overlap.png.
"""
from __future__ import annotations

import argparse
import copy
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import vitkit as vk
from vitkit.explain import evaluate_segmentation, scenes
from vitkit.explain.image import mask_overlay, upsample
from vitkit.explain.segment import patch_features, similarity

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test-jpeg" / "test"
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"


def twin(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
                             qkv_bias=True, num_classes=10, global_pool="token", dynamic_img_size=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).eval()


def timed(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def eager_capture(model, x):
    out, handles = {}, []
    for i, b in enumerate(model.blocks):
        b.attn.fused_attn = False
        handles.append(b.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for b in model.blocks:
            b.attn.fused_attn = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    classes = sorted(p.name for p in CIFAR.iterdir())
    files = [CIFAR / c / f"{i:04d}.jpg" for i in range(args.per_class) for c in classes]
    objects = scenes.load_images(files, 32)
    trained = vk.load(SHAMAIL, num_heads=4, dynamic_img_size=True).eval()
    models = {"shamail (trained)": trained, **{f"random twin s{s}": twin(s) for s in (0, 1, 2)}}

    images, masks, points = scenes.composites(objects, canvas=64, seed=0)
    x, m = scenes.to_tensor(images), torch.from_numpy(masks)
    print(f"## Composites: {len(images)} CIFAR-10 test objects on textures, 64 px, one centre prompt each")
    print("| model | best mIoU | best τ | mIoU @ τ=0.5 | area under IoU(τ) |\n|---|---|---|---|---|")
    for name, model in models.items():
        s = evaluate_segmentation(model, x, m, points)
        print(f"| {name} | {s.best_miou:.3f} | {s.best_threshold:.2f} | {s.at(0.5):.3f} | {s.area:.3f} |")
    print(f"(all-object baseline: an all-ones mask scores {np.mean(masks.mean((1, 2))):.3f})")

    mi, ml, mp = scenes.mosaics(objects)
    xm, lab = scenes.to_tensor(mi), torch.from_numpy(ml)
    print(f"\n## Mosaics: {len(mi)} 2x2 mosaics, 64 px")
    print("| model | AUROC | overlap | best mIoU (quadrant 0) |\n|---|---|---|---|")
    for name, model in models.items():
        plot = Path(args.img_dir) / "explain_overlap.png" if model is trained else None
        o = vk.similarity_overlap(model, xm, lab, plot=plot)
        s = evaluate_segmentation(model, xm, lab == 0, mp)
        print(f"| {name} | {o.auroc:.3f} | {o.overlap:.3f} | {s.best_miou:.3f} |")

    # figure: 4 composites, trained vs random masks at each model's best τ on this set
    best = {n: evaluate_segmentation(mo, x, m, points).best_threshold for n, mo in models.items()}
    rows = []
    for i in range(4):
        tiles = [Image.fromarray(images[i]).resize((128, 128), Image.BICUBIC)]
        tiles.append(mask_overlay(Image.fromarray(images[i]), masks[i], points[i]).resize((128, 128), Image.NEAREST))
        for name in ("shamail (trained)", "random twin s0"):
            feats = patch_features(models[name], x[i:i + 1])
            gw = feats.shape[-1]
            sim = upsample(similarity(feats, (points[i][1] // 4) * gw + points[i][0] // 4), (64, 64))[0].numpy()
            tiles.append(mask_overlay(Image.fromarray(images[i]), sim >= best[name], points[i])
                         .resize((128, 128), Image.NEAREST))
        rows.append(tiles)
    fig = Image.new("RGB", (4 * 132, 4 * 132), "white")
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            fig.paste(t, (c * 132, r * 132))
    fig.save(Path(args.img_dir) / "explain_composites.png")

    print("\n## Attention capture cost (best of 5, 2 threads)\n| model | batch | forward | vk.attention | eager path |"
          "\n|---|---|---|---|---|")
    cases = [("shamail 32 px", vk.load(SHAMAIL, num_heads=4).eval(), torch.randn(64, 3, 32, 32)),
             ("vit_small_patch16_224 (random)", vk.load("vit_small_patch16_224", pretrained=False).eval(),
              torch.randn(4, 3, 224, 224))]
    for name, model, inp in cases:
        eager = copy.deepcopy(model)
        with torch.no_grad():
            t_fwd = timed(lambda: model(inp))
        t_cap = timed(lambda: vk.attention(model, inp))
        t_eager = timed(lambda: eager_capture(eager, inp))
        print(f"| {name} | {inp.shape[0]} | 1.00 | {t_cap / t_fwd:.2f} | {t_eager / t_fwd:.2f} |")


if __name__ == "__main__":
    main()
