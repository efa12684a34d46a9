"""`vk.load`: a timm `VisionTransformer` from a timm name, an `hf-hub:` id, a local weights file or a vitkit
save folder.

Hub downloads go through `timm.create_model(pretrained=True)` (the users' normal path). Local files are read
with safetensors or `torch.load(weights_only=True)`, unwrapped, converted to timm keys (`convert.py`) and loaded
strictly: missing or unexpected keys are an error that lists them. When `arch` is not given the architecture
is inferred from the tensors (`infer_arch`). Hand-written: the inference and the error messages; timm has
`checkpoint_filter_fn` for the layouts it knows, and it is reused.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from . import convert

_log = logging.getLogger("vitkit")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
EMBEDDED: dict[str, dict] = {}  # name -> {"file": packaged path, "model_args": {...}}; filled by vitkit.assets


class HubUnreachableError(RuntimeError):
    """Pretrained weights could not be downloaded (offline machine, firewall, hub outage)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def load(source: str | os.PathLike, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
         pretrained: bool = True, **timm_kwargs) -> VisionTransformer:
    """Load a pretrained Vision Transformer as a timm `VisionTransformer`.

    Args:
        source: a timm name (`vit_small_patch16_224.augreg_in21k`), an `hf-hub:` id, a local weights file
            (`.safetensors`, `.pth`, `.pt`, `.bin`), a folder written by `vk.save`, or an embedded name
            (`vitkit/...`).
        arch: timm architecture for a local file; inferred from the tensors when None.
        num_classes: classifier size; a checkpoint head of another size is dropped and a new head made.
        pretrained: for timm names, download the pretrained weights (False: random initialisation).
        **timm_kwargs: passed to `timm.create_model` / `VisionTransformer` (e.g. `dynamic_img_size=True`,
            `num_heads=4` when it cannot be inferred).
    """
    from vitkit import io

    source = str(source)
    path = Path(source).expanduser()
    if source in EMBEDDED:
        entry = EMBEDDED[source]
        args = {**entry["model_args"], **timm_kwargs}
        model = load_file(entry["file"], num_classes=num_classes, say_inferred=False, **args)
        if not pretrained:  # the random-initialised twin: the architecture read from the file, fresh weights
            model = build_vit(model.__dict__["_vitkit_base"]["model_args"])
            _record_base(model, {"kind": "embedded", "name": source, "pretrained": False, "model_args": args},
                         fingerprint=False)
            return model
        model.__dict__["_vitkit_base"].update(kind="embedded", name=source, pretrained=True)
        return model
    if path.is_dir():
        return io.load_dir(path, **({"num_classes": num_classes} if num_classes is not None else {}))
    if path.is_file():
        return load_file(path, arch=arch, num_classes=num_classes, **timm_kwargs)
    if source.startswith("vitkit/"):
        raise ValueError(f"unknown embedded model `{source}`; embedded: {', '.join(EMBEDDED) or 'none'}")
    if source.endswith(WEIGHT_SUFFIXES) or os.sep in source and not source.startswith("hf-hub:"):
        raise FileNotFoundError(f"no such weights file or folder: {source}")
    return load_timm(source, num_classes=num_classes, pretrained=pretrained, **timm_kwargs)


def load_timm(name: str, *, num_classes: Optional[int] = None, pretrained: bool = True, **timm_kwargs):
    """`timm.create_model` with a clear error for unknown names and for an unreachable hub."""
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model `{name}`" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; name the cause once
        if pretrained and _is_network_error(err):
            raise HubUnreachableError(
                f"could not download the pretrained weights of `{name}`: the model hub is unreachable "
                f"({type(err).__name__}). Load a local copy instead, e.g. "
                f"vk.load('path/to/model.safetensors', arch='{name.removeprefix('hf-hub:').split('.')[0]}'), "
                "or pass pretrained=False for random weights.") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"`{name}` builds a {type(model).__name__}; vitkit works on timm VisionTransformer")
    base = {"kind": "timm", "name": name, "pretrained": pretrained, "model_args": kwargs}
    fresh_head = num_classes is not None and num_classes != model.pretrained_cfg.get("num_classes", num_classes)
    _record_base(model, base, fingerprint=pretrained, fresh_head=fresh_head)
    return model


def _is_network_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    network = {"LocalEntryNotFoundError", "ConnectionError", "URLError", "OfflineModeIsEnabled",
               "HTTPError", "Timeout", "ConnectError", "MaxRetryError", "gaierror"}
    text = str(err).lower()
    return bool(names & network) or any(s in text for s in ("connection", "offline", "resolve", "internet"))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (safetensors, or a torch file with `weights_only=True`) with clear errors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unsupported weights file type `{suffix}`; expected one of {WEIGHT_SUFFIXES}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError and OS errors alike
            raise ValueError(f"cannot read {path}: the safetensors file is truncated or corrupt ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise ValueError(f"cannot read {path}: it holds Python objects besides tensors, which vitkit refuses "
                             "to unpickle (weights_only=True); re-save its state_dict") from None
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({err})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({str(err).splitlines()[0]})") from None
    return convert.unwrap(obj)


def build_vit(model_args: dict[str, Any]) -> VisionTransformer:
    """A `VisionTransformer` from JSON-friendly args (`norm_eps` becomes a LayerNorm partial)."""
    args = dict(model_args)
    eps = args.pop("norm_eps", None)
    if eps is not None and "norm_layer" not in args:
        args["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    return VisionTransformer(**args)


def load_file(path: str | os.PathLike, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
              say_inferred: bool = True, **timm_kwargs) -> VisionTransformer:
    """Load a local weights file strictly into a timm ViT (see `load`); `say_inferred` logs the inferred
    architecture at INFO (off for vitkit's embedded checkpoints, whose architecture is recorded)."""
    path = Path(path).expanduser().resolve()
    sd, layout = convert.to_timm(read_state_dict(path))
    ckpt_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    classes = ckpt_classes if num_classes is None else num_classes
    if arch is not None:
        model = timm.create_model(arch, pretrained=False, num_classes=classes, **timm_kwargs)
        model_args = {"num_classes": classes, **timm_kwargs}
    else:
        model_args, notes = infer_arch(sd, layout, given=timm_kwargs)
        model_args.update(timm_kwargs, num_classes=classes)
        _log.log(logging.INFO if say_inferred else logging.DEBUG, "%s: %s layout; inferred %s", path.name, layout,
                 ", ".join(notes))
        model = build_vit(model_args)
    sd = checkpoint_filter_fn(sd, model)
    if classes != ckpt_classes:
        _log.info("%s: checkpoint head has %d classes, new %d-class head initialised", path.name, ckpt_classes, classes)
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith(("head.", "head_dist."))})
    check_keys(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    base = {"kind": "file", "path": str(path), "sha256": sha256_file(path), "arch": arch, "layout": layout,
            "model_args": model_args}
    _record_base(model, base, fingerprint=True, fresh_head=classes != ckpt_classes)
    return model


def infer_arch(sd: dict[str, torch.Tensor], layout: str = "timm", given: Optional[dict] = None) -> tuple[dict, list[str]]:
    """Infer `VisionTransformer` arguments from timm-keyed tensors; returns (model_args, human notes).

    `given` arguments (e.g. `num_heads`, which plain weights do not reveal) are reported instead of guessed.
    """
    given = given or {}
    if "patch_embed.proj.weight" not in sd:
        raise convert.UnsupportedCheckpoint("cannot infer a ViT: no `patch_embed.proj.weight` in the checkpoint "
                                            f"(first keys: {list(sd)[:6]}); pass arch=...")
    if "dist_token" in sd:
        raise convert.UnsupportedCheckpoint("a distilled DeiT checkpoint (dist_token): pass "
                                            "arch='deit_*_distilled_patch16_224' to load it")
    D, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    class_token = "cls_token" in sd
    reg = sd["reg_token"].shape[1] if "reg_token" in sd else (sd["register_tokens"].shape[1] if "register_tokens" in sd else 0)
    prefix = int(class_token) + reg
    args: dict[str, Any] = dict(embed_dim=D, depth=depth, in_chans=in_chans, patch_size=(ph, pw) if ph != pw else ph,
                                mlp_ratio=hidden / D, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                                class_token=class_token, reg_tokens=reg)
    notes = [f"width {D}", f"depth {depth}", f"patch {ph}x{pw}", f"mlp ratio {hidden / D:g}"]
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
        args["num_heads"] = D // sd["blocks.0.attn.q_norm.weight"].shape[0]
        notes.append(f"{args['num_heads']} heads (from qk-norm)")
    elif "num_heads" not in given:
        args["num_heads"] = max(1, D // 64)
        notes.append(f"{args['num_heads']} heads ASSUMED (head dim 64; not inferable, pass num_heads= if different)")
    if "blocks.0.ls1.gamma" in sd:
        args["init_values"] = 1e-5
        notes.append("LayerScale")
    pos = sd.get("pos_embed")
    if pos is None:
        args["pos_embed"] = "none"
        grid = None
    else:
        n = pos.shape[1]
        if prefix and _is_square(n - prefix):
            grid = math.isqrt(n - prefix)
        elif _is_square(n):
            grid = math.isqrt(n)
            args["no_embed_class"] = prefix > 0
        else:
            raise convert.UnsupportedCheckpoint(f"pos_embed has {n} positions, which is not a square grid plus "
                                                f"{prefix} prefix tokens; pass arch=... and img_size=...")
    if grid is not None:
        args["img_size"] = grid * ph
        notes.append(f"{grid}x{grid} grid ({grid * ph}px)")
    notes.append(f"{'cls' if class_token else 'no cls'}" + (f" + {reg} registers" if reg else ""))
    if "fc_norm.weight" in sd or not class_token:
        args["global_pool"] = "avg"
        args["fc_norm"] = "fc_norm.weight" in sd
    else:
        args["global_pool"] = "token"
    notes.append(f"pool {args['global_pool']}")
    eps = {"torch-multihead-attention": 1e-5, "huggingface-vit": 1e-12}.get(layout)
    if eps is not None:
        args["norm_eps"] = eps
        notes.append(f"LayerNorm eps {eps:g} ({layout} default)")
    notes += [f"{k}={v} (given)" for k, v in given.items()]
    return args, notes


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def check_keys(model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Raise `CheckpointMismatchError` listing missing, unexpected and mis-shaped keys (first few and counts)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}" + (" ..." if len(items) > 5 else ""))
        raise CheckpointMismatchError(f"{name} does not match the model: " + "; ".join(parts))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.blake2b(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", digest_size=16).hexdigest() \
        + f":{tuple(t.shape)}:{t.dtype}"


def _record_base(model: nn.Module, base: dict, fingerprint: bool, fresh_head: bool = False) -> None:
    """Remember where the model came from, and (for pretrained weights) a digest of every base tensor, so
    that `vk.save` can write only what changed. A freshly initialised head is not part of the base: it is
    random, so it is always saved (even untrained) and reloads identically."""
    hashes = {k: tensor_digest(v) for k, v in model.state_dict().items()
              if not (fresh_head and k.startswith(("head.", "head_dist.")))} if fingerprint else None
    if hashes is not None:
        base["digest"] = hashlib.blake2b("".join(f"{k}={h};" for k, h in sorted(hashes.items())).encode(),
                                         digest_size=16).hexdigest()
    model.__dict__["_vitkit_base"] = base
    model.__dict__["_vitkit_base_hashes"] = hashes
