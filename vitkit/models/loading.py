"""`vk.load`: a timm `VisionTransformer` from a timm name, an `hf-hub:` id, a local weights file or a vitkit
save folder.

Hub downloads go through `timm.create_model(pretrained=True)` (the users' normal path). Local files are read
with safetensors or `torch.load(weights_only=True)`, unwrapped, converted to timm keys (`convert.py`) and loaded
strictly: missing or unexpected keys are an error that lists them. When `arch` is not given the architecture
is inferred from the tensors (`infer_arch`) and from a `config.json` beside the weights (Hugging Face or timm
hub format), which states what tensors cannot show: the head count, LayerNorm eps, pooling. Preprocessing
(`mean`, `std`, `interpolation`, `crop_pct`) given at load, or stated by a `preprocessor_config.json` / timm
`config.json` beside the weights, is kept in `model.pretrained_cfg`, which `vk.data.data_config` reads.
Hand-written: the inference and the error messages; timm has `checkpoint_filter_fn` for the layouts it knows,
and it is reused.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import json
import re
import warnings
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
ASSUMED_EPS = {"torch-multihead-attention": 1e-5, "huggingface-vit": 1e-12, "huggingface-vit-v5": 1e-12}
DATA_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # preprocessing kept in pretrained_cfg


class HubUnreachableError(RuntimeError):
    """Pretrained weights could not be downloaded (offline machine, firewall, hub outage)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def load(source: str | os.PathLike, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
         pretrained: bool = True, base: Any = None, mean: Optional[tuple] = None, std: Optional[tuple] = None,
         interpolation: Optional[str] = None, crop_pct: Optional[float] = None, any_model: bool = False,
         **timm_kwargs) -> VisionTransformer:
    """Load a pretrained Vision Transformer as a timm `VisionTransformer`.

    With `any_model=True` a timm name may also build any other timm model (ConViT, GC ViT, TinyViT, a ResNet or
    ConvNeXt, vitkit's CvT): `vk.bench`, `vk.fit` and `vk.evaluate` run it through `forward_features` /
    `forward_head`; methods that need a `VisionTransformer` refuse it (`NotImplementedError` naming its class).
    Without it such a name is refused, so that explainers and methods never meet a model they cannot read.

    Args:
        source: a timm name (`vit_small_patch16_224.augreg_in21k`), an `hf-hub:` id, a local weights file
            (`.safetensors`, `.pth`, `.pt`, `.bin`), a folder written by `vk.save` (either format, or any PEFT
            adapter folder), or an embedded name (`vitkit/...`).
        arch: timm architecture for a local file; inferred from the tensors (and a `config.json` beside them)
            when None.
        num_classes: classifier size; a checkpoint head of another size is dropped and a new head made.
        pretrained: for timm names, download the pretrained weights (False: random initialisation).
        base: for a save or PEFT folder only: the base to load onto instead of the recorded one (a name, a file,
            or an `nn.Module` such as `timm.create_model(...)`, which is copied, not changed); a base whose
            weights differ from the recorded digest is refused.
        mean, std, interpolation, crop_pct: the preprocessing the weights expect (e.g. 0.5/0.5 for many CIFAR
            checkpoints); kept in `model.pretrained_cfg`, saved by `vk.save`, used by `vk.data.transform`.
        any_model: accept a timm name that builds a model other than a `VisionTransformer` (see above).
        **timm_kwargs: passed to `timm.create_model` / `VisionTransformer` (e.g. `dynamic_img_size=True`,
            `num_heads=4` when it cannot be inferred).
    """
    from vitkit import io

    source = str(source)
    path = Path(source).expanduser()
    data = {k: v for k, v in dict(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct).items()
            if v is not None}
    folder_weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
    if path.is_dir() and folder_weights and not (path / io.MANIFEST).is_file() \
            and not (path / "adapter_config.json").is_file():
        path = folder_weights[0]  # a `save_pretrained` folder: the weights, with the config.json beside them
    if base is not None and not path.is_dir():
        raise TypeError(f"vk.load: `base=` is for a vk.save or PEFT adapter folder; `{source}` is not one")
    if source in EMBEDDED:
        entry = EMBEDDED[source]
        check_int_args(timm_kwargs)
        clashes = {k: v for k, v in timm_kwargs.items() if k in entry["model_args"] and v != entry["model_args"][k]}
        if clashes:  # e.g. num_heads=8 on a 4-head checkpoint: the weights would load and compute something else
            given = ", ".join(f"{k}={v!r}" for k, v in clashes.items())
            stated = ", ".join(f"{k}={entry['model_args'][k]!r}" for k in clashes)
            raise ValueError(f"vk.load: the embedded model `{source}` was trained with {stated}; {given} was given. "
                             "Leave that argument out (the embedded entry states it)")
        args = {**entry["model_args"], **timm_kwargs}
        model = load_file(entry["file"], num_classes=num_classes, say_inferred=False, **args)
        if not pretrained:  # the random-initialised twin: the architecture read from the file, fresh weights
            model_args = model.__dict__["_vitkit_base"]["model_args"]
            model = build_vit(model_args)
            _record_base(model, {"kind": "embedded", "name": source, "pretrained": False, "model_args": model_args},
                         fingerprint=False)
        else:
            model.__dict__["_vitkit_base"].update(kind="embedded", name=source, pretrained=True)
            # rebuilt by name: the installed file's path is machine-specific and would make saves differ by checkout
            model.__dict__["_vitkit_base"].pop("path", None)
        set_data_config(model, **{**entry.get("data_config", {}), **data})
        return model
    if path.is_dir():
        return io.load_dir(path, base=base, **({"num_classes": num_classes} if num_classes is not None else {}),
                           **data, **timm_kwargs)
    if path.is_file():
        model = load_file(path, arch=arch, num_classes=num_classes, **timm_kwargs)
    elif source.startswith("vitkit/"):
        raise ValueError(f"unknown embedded model `{source}`; embedded: {', '.join(EMBEDDED) or 'none'}")
    elif source.endswith(WEIGHT_SUFFIXES) or os.sep in source and not source.startswith("hf-hub:"):
        raise FileNotFoundError(f"no such weights file or folder: {source}")
    else:
        model = load_timm(source, num_classes=num_classes, pretrained=pretrained, **timm_kwargs)
    if not any_model and not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"`{source}` builds a {type(model).__name__}, not a timm VisionTransformer: "
                                  "vitkit's methods and explainers need one; vk.bench, vk.fit, vk.evaluate and "
                                  "vk.info take any timm model (vk.load(..., any_model=True))")
    if data:
        set_data_config(model, **data)
    return model


def set_data_config(model: nn.Module, **cfg: Any) -> nn.Module:
    """Keep preprocessing (`mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`) in `model.pretrained_cfg`,
    where timm's `resolve_model_data_config` (and so `vk.data.transform`) reads it. A model without a
    `pretrained_cfg` gets `crop_pct=1.0` (the whole image) unless one is given."""
    unknown = [k for k in cfg if k not in DATA_KEYS]
    if unknown:
        raise TypeError(f"data config: unknown field(s) {unknown}; valid: {', '.join(DATA_KEYS)}")
    if not cfg:
        return model
    chans = next((m.in_channels for m in model.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))),
                 None) if hasattr(getattr(model, "patch_embed", None), "proj") else None  # SSF may wrap proj
    for key in ("mean", "std"):
        if key in cfg:
            cfg[key] = norm_values(key, cfg[key], chans)
    if "interpolation" in cfg and cfg["interpolation"] not in ("bilinear", "bicubic", "nearest", "lanczos"):
        raise ValueError(f"data config: `interpolation` must be bilinear, bicubic, nearest or lanczos, got "
                         f"{cfg['interpolation']!r}")
    if "crop_pct" in cfg and not 0 < float(cfg["crop_pct"]) <= 1:
        raise ValueError(f"data config: `crop_pct` must be in (0, 1], got {cfg['crop_pct']!r}")
    current = dict(getattr(model, "pretrained_cfg", None) or {"crop_pct": 1.0})
    model.pretrained_cfg = {**current, **cfg}
    return model


def norm_values(key: str, value: Any, chans: Optional[int]) -> tuple[float, ...]:
    """`mean` or `std` (`key`) as one float per channel, checked: a number (repeated), or `chans` numbers; `std`
    > 0. A ValueError / TypeError names the field and the value."""
    value = (value,) * (chans or 1) if isinstance(value, (int, float)) else value
    try:
        value = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"data config: `{key}` must be a number or a sequence of numbers, got {value!r}") from None
    if chans is not None and len(value) != chans:
        raise ValueError(f"data config: `{key}` has {len(value)} values but the model takes {chans} "
                         f"channel(s): {value}")
    if key == "std" and not all(v > 0 for v in value):
        raise ValueError(f"data config: `std` must be > 0, got {value}")
    return value


def data_config_of(model: nn.Module) -> dict:
    """The preprocessing fields of `model.pretrained_cfg` (what `vk.save` records), JSON-friendly."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in DATA_KEYS if cfg.get(k) is not None}


def load_timm(name: str, *, num_classes: Optional[int] = None, pretrained: bool = True, **timm_kwargs):
    """`timm.create_model` with a clear error for unknown names and for an unreachable hub (any timm model,
    not only `VisionTransformer`s: see `load`)."""
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


_INT_ARGS = ("num_heads", "depth", "embed_dim", "patch_size", "num_classes", "reg_tokens", "in_chans")


def check_int_args(args: dict[str, Any]) -> None:
    """A string from `--model-arg num_heads=four` would fail deep inside timm, unnamed: name it here."""
    for key in _INT_ARGS:
        if key in args and (isinstance(args[key], bool) or not isinstance(args[key], int) or args[key] < 0):
            raise ValueError(f"model argument `{key}` must be a whole number >= 0, got {args[key]!r}")


def build_vit(model_args: dict[str, Any]) -> VisionTransformer:
    """A `VisionTransformer` from JSON-friendly args (`norm_eps` becomes a LayerNorm partial)."""
    args = dict(model_args)
    check_int_args(args)
    eps = args.pop("norm_eps", None)
    if eps is not None and "norm_layer" not in args:
        args["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    return VisionTransformer(**args)


def load_file(path: str | os.PathLike, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
              say_inferred: bool = True, **timm_kwargs) -> VisionTransformer:
    """Load a local weights file strictly into a timm ViT (see `load`); `say_inferred` logs the inferred
    architecture at INFO (off for vitkit's embedded checkpoints, whose architecture is recorded)."""
    path = Path(path).expanduser().resolve()
    from .cvt import is_hf_cvt

    if is_hf_cvt(path.parent):  # a transformers CvT folder: not a ViT, its own converter
        return _load_hf_cvt(path, num_classes, timm_kwargs)
    sd, layout = convert.to_timm(read_state_dict(path))
    side = side_config(path)
    ckpt_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    if side["num_classes"] is not None and ckpt_classes and side["num_classes"] != ckpt_classes:
        raise ValueError(f"{path.name}: {side['source']} states {side['num_classes']} classes but the checkpoint "
                         f"head has {ckpt_classes}; the config file does not describe these weights")
    for key, value in side["model_args"].items():
        if key in timm_kwargs and timm_kwargs[key] != value:
            warnings.warn(f"{path.name}: `{key}={timm_kwargs[key]!r}` given, but {side['source']} states "
                          f"{value!r}; using the given value", stacklevel=3)
    given = {**side["model_args"], **timm_kwargs}
    classes = ckpt_classes if num_classes is None else num_classes
    arch = arch or side["arch"]
    if arch is not None:
        kwargs = dict(given)
        if kwargs.get("norm_eps") is not None:
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=kwargs.pop("norm_eps"))
        model = timm.create_model(arch, pretrained=False, num_classes=classes, **kwargs)
        model_args = {"num_classes": classes, **given}
    else:
        try:
            model_args, notes = infer_arch(sd, layout, given=given, stated=side["model_args"])
        except ValueError as err:
            raise type(err)(f"{path.name}: {err}") from None
        model_args.update(given, num_classes=classes)
        if layout.startswith("huggingface") and "norm_eps" not in given:  # (MHA: torch's own LayerNorm default)
            warnings.warn(f"{path.name}: LayerNorm eps assumed {ASSUMED_EPS[layout]:g} (the {layout} default); "
                          "pass norm_eps= or keep the model's config.json beside the weights if it differs",
                          stacklevel=3)
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
    if side["data"]:
        set_data_config(model, **side["data"])
    return model


def _load_hf_cvt(path: Path, num_classes: Optional[int], timm_kwargs: dict) -> nn.Module:
    from .cvt import load_hf

    if timm_kwargs:
        raise TypeError(f"{path.name}: a Hugging Face CvT takes its architecture from config.json; "
                        f"{sorted(timm_kwargs)} cannot be given")
    model, ckpt_classes, data = load_hf(path, num_classes)
    base = {"kind": "file", "path": str(path), "sha256": sha256_file(path), "arch": "cvt", "layout": "huggingface-cvt",
            "model_args": {"num_classes": model.num_classes}}
    _record_base(model, base, fingerprint=True, fresh_head=model.num_classes != ckpt_classes)
    if data:
        set_data_config(model, **data)
    return model


HF_ACT = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def side_config(path: Path) -> dict:
    """What the files beside a weights file state: a Hugging Face `config.json` (+ `preprocessor_config.json`)
    or a timm hub `config.json`. Returns {"source", "arch", "model_args", "num_classes", "data"}; every field
    a file states is used (an unsupported one is refused), so that nothing it says is silently ignored."""
    out: dict[str, Any] = {"source": None, "arch": None, "model_args": {}, "num_classes": None, "data": {}}
    folder = path.parent
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text())
        except (ValueError, OSError) as err:
            raise ValueError(f"{config_file}: not valid JSON ({err}); fix or remove it") from None
        if "num_attention_heads" in cfg or "hidden_size" in cfg:  # Hugging Face (transformers) config
            out["source"] = f"{config_file.name} (Hugging Face, model_type {cfg.get('model_type')!r})"
            if cfg.get("model_type", "vit") not in ("vit", "deit"):
                raise convert.UnsupportedCheckpoint(f"{config_file}: model_type {cfg.get('model_type')!r} is not a "
                                                    "ViT that vitkit can load (expected 'vit'); pass arch=...")
            act = cfg.get("hidden_act", "gelu")
            if act not in HF_ACT:
                raise convert.UnsupportedCheckpoint(f"{config_file}: hidden_act {act!r} has no timm equivalent "
                                                    f"here (supported: {', '.join(HF_ACT)})")
            args = out["model_args"]
            for hf_key, key in (("num_attention_heads", "num_heads"), ("layer_norm_eps", "norm_eps"),
                                ("image_size", "img_size"), ("patch_size", "patch_size"), ("qkv_bias", "qkv_bias"),
                                ("num_channels", "in_chans"), ("hidden_size", "embed_dim"),
                                ("num_hidden_layers", "depth")):
                if cfg.get(hf_key) is not None:
                    args[key] = cfg[hf_key]
            if cfg.get("intermediate_size") and cfg.get("hidden_size"):
                args["mlp_ratio"] = cfg["intermediate_size"] / cfg["hidden_size"]
            if HF_ACT[act] is not None:
                args["act_layer"] = HF_ACT[act]
            args["global_pool"] = "token"  # ViTForImageClassification classifies the class token after the norm
            labels = cfg.get("id2label")
            out["num_classes"] = len(labels) if labels else cfg.get("num_labels")
        elif "architecture" in cfg:  # timm hub config
            out["source"] = f"{config_file.name} (timm)"
            out["arch"] = cfg["architecture"]
            out["model_args"] = dict(cfg.get("model_args") or {})
            if cfg.get("global_pool") is not None:
                out["model_args"].setdefault("global_pool", cfg["global_pool"])
            out["num_classes"] = cfg.get("num_classes")
            pcfg = cfg.get("pretrained_cfg") or {}
            out["data"] = {k: tuple(v) if isinstance(v, list) else v for k, v in pcfg.items() if k in DATA_KEYS}
    pre_file = folder / "preprocessor_config.json"
    if pre_file.is_file():
        try:
            pre = json.loads(pre_file.read_text())
        except (ValueError, OSError) as err:
            raise ValueError(f"{pre_file}: not valid JSON ({err}); fix or remove it") from None
        if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
            out["data"].update(mean=tuple(pre["image_mean"]), std=tuple(pre["image_std"]))
        if pre.get("resample") in HF_RESAMPLE:
            out["data"]["interpolation"] = HF_RESAMPLE[pre["resample"]]
        if not pre.get("do_center_crop"):
            out["data"]["crop_pct"] = 1.0  # ViTImageProcessor resizes to `size`, no crop
    return out


def infer_arch(sd: dict[str, torch.Tensor], layout: str = "timm", given: Optional[dict] = None,
               stated: Optional[dict] = None) -> tuple[dict, list[str]]:
    """Infer `VisionTransformer` arguments from timm-keyed tensors; returns (model_args, human notes).

    `given` arguments (e.g. `num_heads`, which plain weights do not reveal) are reported instead of guessed;
    `stated` ones (from a config file beside the weights) are checked against the tensors. The head count is
    inferable only from qk-norm weights: without it and without `num_heads`, a `ValueError` asks for it.
    """
    given = given or {}
    stated = stated or {}
    if "patch_embed.proj.weight" not in sd:
        raise convert.UnsupportedCheckpoint(f"cannot infer a ViT from the {layout} layout: no "
                                            f"`patch_embed.proj.weight` (first keys: {list(sd)[:6]}); pass arch=...")
    if "dist_token" in sd:
        raise convert.UnsupportedCheckpoint("a distilled DeiT checkpoint (dist_token): pass "
                                            "arch='deit_*_distilled_patch16_224' to load it")
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks or "blocks.0.mlp.fc1.weight" not in sd:
        raise convert.UnsupportedCheckpoint(
            f"cannot infer a ViT from the {layout} layout: no `blocks.N.` transformer blocks after conversion "
            f"(block keys look like: {[k for k in sd if '.0.' in k][:4] or list(sd)[:4]}); this layout is not "
            "one vitkit converts; pass arch=... with timm-keyed weights")
    D, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(blocks)
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    class_token = "cls_token" in sd
    reg = sd["reg_token"].shape[1] if "reg_token" in sd else (sd["register_tokens"].shape[1] if "register_tokens" in sd else 0)
    prefix = int(class_token) + reg
    args: dict[str, Any] = dict(embed_dim=D, depth=depth, in_chans=in_chans, patch_size=(ph, pw) if ph != pw else ph,
                                mlp_ratio=hidden / D, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                                class_token=class_token, reg_tokens=reg)
    for key in ("embed_dim", "depth", "in_chans", "patch_size", "qkv_bias"):
        if key in stated and stated[key] != args[key]:
            raise convert.UnsupportedCheckpoint(f"the config file states {key}={stated[key]!r} but the tensors "
                                                f"have {args[key]!r}: it does not describe these weights")
    if "mlp_ratio" in stated and abs(stated["mlp_ratio"] - args["mlp_ratio"]) > 1e-6:
        raise convert.UnsupportedCheckpoint(f"the config file states an MLP ratio of {stated['mlp_ratio']:g} but "
                                            f"the tensors have {args['mlp_ratio']:g}")
    notes = [f"width {D}", f"depth {depth}", f"patch {ph}x{pw}", f"mlp ratio {hidden / D:g}"]
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
        args["num_heads"] = D // sd["blocks.0.attn.q_norm.weight"].shape[0]
        notes.append(f"{args['num_heads']} heads (from qk-norm)")
        if given.get("num_heads", args["num_heads"]) != args["num_heads"]:
            raise ValueError(f"num_heads={given['num_heads']} given, but the qk-norm weights have head dim "
                             f"{D // args['num_heads']}, i.e. {args['num_heads']} heads")
    elif "num_heads" not in given:
        raise ValueError(f"the head count cannot be inferred from these tensors (width {D}, no qk-norm): pass "
                         f"num_heads= (e.g. num_heads={max(1, D // 64)} if the head dim is 64, as in ViT-S/B/L; "
                         "CLI: --model-arg num_heads=N), or arch=..., or put the model's config.json beside the "
                         "weights")
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
        if "img_size" in stated and stated["img_size"] not in (grid * ph, [grid * ph] * 2):
            raise convert.UnsupportedCheckpoint(f"the config file states image size {stated['img_size']} but "
                                                f"pos_embed is a {grid}x{grid} grid of {ph}px patches "
                                                f"({grid * ph}px): it does not describe these weights")
        args["img_size"] = grid * ph
        notes.append(f"{grid}x{grid} grid ({grid * ph}px)")
    notes.append(f"{'cls' if class_token else 'no cls'}" + (f" + {reg} registers" if reg else ""))
    if "fc_norm.weight" in sd or not class_token:
        args["global_pool"] = "avg"
        args["fc_norm"] = "fc_norm.weight" in sd
    else:
        args["global_pool"] = "token"
    notes.append(f"pool {args['global_pool']}")
    eps = ASSUMED_EPS.get(layout)
    if eps is not None and "norm_eps" not in given:
        args["norm_eps"] = eps
        notes.append(f"LayerNorm eps {eps:g} ({layout} default)")
    notes += [f"{k}={v} ({'config file' if k in stated and stated[k] == v else 'given'})" for k, v in given.items()]
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
    flat = t.reshape(-1).view(torch.uint8)  # reshape first: a 0-dim tensor (BatchNorm's counter) cannot be viewed
    return hashlib.blake2b(flat.numpy().tobytes() if t.numel() else b"", digest_size=16).hexdigest() \
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


def module_base(model: nn.Module) -> dict:
    """A base reference for a model vitkit did not load (e.g. `timm.create_model(...)`): the timm name and tag
    its `pretrained_cfg` states (a hint: timm cannot say whether the weights are pretrained) and the arguments
    that commonly differ from the architecture's defaults. The weights digest is what identifies it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    args: dict[str, Any] = {}
    if isinstance(model, VisionTransformer):
        args = {"num_classes": model.num_classes, "img_size": list(model.patch_embed.img_size),
                "global_pool": model.global_pool,
                # where the final norm sits follows global_pool at construction only (reset_classifier keeps it)
                "fc_norm": not isinstance(model.fc_norm, nn.Identity)}
        if getattr(model, "dynamic_img_size", False):
            args["dynamic_img_size"] = True
    return {"kind": "module", "name": f"{arch}.{tag}" if arch and tag else arch, "pretrained": None,
            "model_args": args}


def record_module_base(model: nn.Module) -> None:
    """Fingerprint a model vitkit did not load, before a method changes it, so that `vk.save` can write only
    what the methods add or training changes (called by `vk.apply` when the model has no base reference)."""
    if "_vitkit_base" not in model.__dict__:
        _record_base(model, module_base(model), fingerprint=True)


def unsaved_hashes(state: dict[str, torch.Tensor], saved: set[str]) -> dict[str, str]:
    """Digest of every tensor of `state` (keyed as in the base) that is not among the `saved` keys: what a
    base must hold for the saved tensors to rebuild the model."""
    from vitkit.io import base_key

    saved_base = {base_key(k) for k in saved}
    return {base_key(k): tensor_digest(v) for k, v in state.items() if k not in saved and base_key(k) not in saved_base}


def hashes_digest(hashes: dict[str, str]) -> str:
    return hashlib.blake2b("".join(f"{k}={h};" for k, h in sorted(hashes.items())).encode(),
                           digest_size=16).hexdigest()
