"""`vitkit explain` and `vitkit segment`: heatmaps and prompt-point masks as PNG (+ the raw arrays as .npy);
`vitkit segment-volume`: 3-D masks from clicked voxels (PNG of three planes + .npy).

    vitkit explain cat.jpg --model best_vit.pth --model-arg num_heads=4 --mean 0.5 --std 0.5 --method rollout \
        --out heat.png            # attention | rollout | grad_rollout | gradcam | bcos (a B-cosified model)
    vitkit segment cat.jpg --model best_vit.pth --model-arg num_heads=4 --mean 0.5 --std 0.5 --point 16,12
    vitkit segment-volume anatomical.nii --model vitkit/vit-tiny-cifar --model-arg dynamic_img_size=true \
        --voxel 16,22,12 --patches 16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .maps import METHODS


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _size(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm name, hf-hub: id, weights file, save folder or embedded name")
    p.add_argument("--arch", help="timm architecture for a weights file (inferred when omitted)")
    p.add_argument("--num-classes", type=int, help="classifier size (new head when it differs)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights for timm names")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm/VisionTransformer argument, e.g. num_heads=4 (repeatable)")


def _norm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="normalisation mean (default: the model's data config, as vk.data.transform)")
    p.add_argument("--std", type=_floats, metavar="S[,S,S]", help="normalisation std")
    p.add_argument("--layer", type=int, help="block index, negative from the end (default -1; explain: attention and "
                   "gradcam only)")


def _last(layer):
    return -1 if layer is None else layer


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (any format PIL reads)")
    _model_options(p)
    p.add_argument("--size", type=_size, metavar="H[xW]",
                   help="model input size (default the model's; other sizes need --model-arg dynamic_img_size=true)")
    _norm_options(p)
    p.add_argument("--display", type=_pixels, default=256, metavar="PX",
                   help="height of the written PNG in pixels (the array keeps the model's resolution)")


def _stats(v):
    return None if v is None else (v[0] if len(v) == 1 else v)  # one number: every channel


def _pixels(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {text}")
    return value


def _display_size(image_size: tuple[int, int], height: int) -> tuple[int, int]:
    h, w = image_size
    return (height, max(1, round(w * height / h)))


def _run_explain(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit.cli import load_model

    model = load_model(args).eval()
    head = int(args.head) if args.head.lstrip("-").isdigit() else args.head
    e = vk.explain(model, args.image, method=args.method, target=args.target, layer=args.layer, head=head,
                   head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, size=args.size,
                   mean=_stats(args.mean), std=_stats(args.std))
    out = Path(args.out or f"{Path(args.image).stem}_{args.method}.png")
    png, npy = e.save(out, size=_display_size(tuple(e.heatmap.shape[-2:]), args.display))
    result = {"method": args.method, "png": str(png), "npy": str(npy), "patch_grid": list(e.patch_map.shape[-2:])}
    if e.target is not None:
        result["target"] = e.target[0]
    if e.logits is not None:
        result["predicted"] = int(e.logits[0].argmax())
    if getattr(e, "constant", None) is not None:  # bcos: the explained logit = pixels + constant tokens + bias
        result.update(logit=round(float(e.logit[0]), 5), pixels=round(float(e.contributions[0].sum()), 5),
                      tokens=round(float(e.constant[0]), 5), logit_bias=round(e.logit_bias, 5))
    print(json.dumps(result))


def _run_segment(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit.cli import load_model

    try:
        x, y = (float(v) for v in args.point.split(","))
    except ValueError:
        raise ValueError(f"segment: --point must be x,y in image pixels, got {args.point!r}") from None
    model = load_model(args).eval()
    seg = vk.segment(model, args.image, point=(x, y), layer=_last(args.layer), threshold=args.threshold, size=args.size,
                     feature=args.feature, mean=_stats(args.mean), std=_stats(args.std))
    out = Path(args.out or f"{Path(args.image).stem}_segment.png")
    png, npy = seg.save(out, size=_display_size(seg.mask.shape, args.display))
    print(json.dumps({"png": str(png), "npy": str(npy), "patch": list(seg.patch), "threshold": round(seg.threshold, 4),
                      "mask_fraction": round(float(seg.mask.mean()), 4)}))


def _voxel(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X voxel indices, got {text!r}") from None
    return z, y, x


def _run_segment_volume(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit.cli import load_model

    model = load_model(args).eval()
    seg = vk.segment_volume(model, args.volume, args.voxel, patches=args.patches, layer=_last(args.layer),
                            feature=args.feature, floor=args.floor, power=args.power, reduce=args.reduce,
                            threshold=args.threshold, mean=_stats(args.mean), std=_stats(args.std),
                            batch_size=args.batch_size, progress=not args.no_progress)
    name = Path(args.volume).name.split(".")[0]
    png, npy = seg.save(Path(args.out or f"{name}_segment_volume.png"))
    print(json.dumps({"png": str(png), "npy": str(npy), "shape": list(seg.mask.shape),
                      "grid": list(seg.grid_similarity.shape), "voxels": [list(v) for v in seg.voxels],
                      "threshold": seg.threshold, "mask_fraction": round(float(seg.mask.mean()), 4)}))


def add_commands(subparsers) -> None:
    """Add `explain`, `segment` and `segment-volume` to the `vitkit` command line."""
    p = subparsers.add_parser("explain", help="attention / rollout / Grad-CAM heatmap of an image (PNG + .npy)")
    _common(p)
    p.add_argument("--method", choices=METHODS, default="rollout", help="explanation method")
    p.add_argument("--target", type=int, help="class to explain (gradcam, grad_rollout, bcos; default the prediction)")
    p.add_argument("--head", default="mean", help="attention: 'mean', 'max', 'min' or a head index")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean", help="rollout head fusion")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: lowest attention fraction set to 0")
    p.add_argument("--out", help="output PNG (default IMAGE_METHOD.png); the raw patch map goes next to it as .npy")
    p.set_defaults(func=_run_explain)

    p = subparsers.add_parser("segment", help="zero-shot mask of the object under a point (MMC protocol)")
    _common(p)
    p.add_argument("--point", required=True, metavar="X,Y", help="prompt pixel in the image as given")
    p.add_argument("--threshold", type=float, help="cosine threshold (default: Otsu's on the similarity map)")
    p.add_argument("--feature", choices=("x", "q", "k", "v"), default="x",
                   help="block tokens compared: final-normed outputs, or the attention's queries, keys, values")
    p.add_argument("--out", help="output PNG (default IMAGE_segment.png); the similarity map goes next to it (.npy)")
    p.set_defaults(func=_run_segment)

    p = subparsers.add_parser("segment-volume", help="3-D mask of the structure under clicked voxels from patch "
                              "similarity over the volume's three slicing axes (PNG of three planes + .npy)")
    p.add_argument("volume", help="3-D volume: NIfTI or any file nibabel reads, or a .npy array")
    _model_options(p)
    _norm_options(p)
    p.add_argument("--voxel", type=_voxel, action="append", required=True, metavar="Z,Y,X",
                   help="clicked voxel (indices along axes 0, 1, 2); repeat for several clicks of one structure")
    p.add_argument("--patches", type=int, default=64,
                   help="patches along the middle-sized axis (the paper's 64; fewer is faster); slices of another "
                        "size than the model's need --model-arg dynamic_img_size=true")
    p.add_argument("--feature", choices=("k", "q", "v", "x"), default="k",
                   help="block tokens compared: keys (the paper's), queries, values, or final-normed outputs")
    p.add_argument("--floor", type=float, default=0.25, help="cosine below it counts 0 (0.1 for interactive use)")
    p.add_argument("--power", type=float, default=2.5, help="exponent on the floored cosine")
    p.add_argument("--reduce", choices=("mean", "max"), default="mean", help="combine several clicks")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = similarity >= threshold")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="output PNG (default VOLUME_segment_volume.png); the similarity volume goes next "
                   "to it as .npy")
    p.set_defaults(func=_run_segment_volume)
