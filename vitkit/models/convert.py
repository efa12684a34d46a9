"""Checkpoint key converters: other people's ViT state dicts to timm `VisionTransformer` keys.

Each converter is pure (state dict in, state dict out) and handles one layout; `to_timm` picks one by sniffing
keys. timm's own `checkpoint_filter_fn` is reused for the layouts it knows (timm, DeiT, DINO/DINOv2, OpenAI
CLIP, OpenCLIP-timm), so only the Hugging Face `ViTModel` (transformers 4 files and transformers 5 `state_dict()`
names) and `nn.MultiheadAttention` layouts are written here.
"""
from __future__ import annotations

import logging
import re

import torch

_log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class UnsupportedCheckpoint(ValueError):
    """The checkpoint describes a network that a timm pre-norm `VisionTransformer` cannot represent."""


def unwrap(obj) -> State:
    """Return the tensor dict inside common wrappers: {'model': ...}, {'state_dict': ...}, DINO's
    {'teacher': ...}, DDP's `module.` and torch.compile's `_orig_mod.` prefixes, DINO's `backbone.` prefix."""
    for key in ("model", "state_dict", "model_state_dict", "model_ema", "teacher", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            return unwrap(obj[key])
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"expected a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"the checkpoint holds no tensors (top-level keys: {list(obj)[:8]})")
    for prefix in ("module.", "_orig_mod.", "backbone.", "encoder."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def refuse_torch_encoder_layer(sd: State) -> None:
    """`nn.TransformerEncoderLayer` blocks are post-norm with a ReLU MLP by default (`norm_first=False`):
    a timm pre-norm GELU `Block` computes something else, so loading them would be silently wrong."""
    if any(re.search(r"\.self_attn\.in_proj_weight$", k) for k in sd) and any(k.endswith(".linear1.weight") for k in sd):
        raise UnsupportedCheckpoint(
            "the checkpoint's blocks are torch.nn.TransformerEncoderLayer (keys `self_attn.in_proj_weight`, "
            "`linear1`, `linear2`): that layer is post-norm with a ReLU MLP by default (norm_first=False, "
            "activation='relu'), which a timm pre-norm VisionTransformer Block cannot represent; vitkit "
            "refuses to load it rather than compute something else. Rebuild the original network in torch.nn "
            "to use these weights.")


# Hugging Face ViT keys outside the encoder blocks (the same in transformers 4 and 5) -> timm
_HF_VIT_OUTSIDE_BLOCKS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def is_hf_vit(sd: State) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def from_hf_vit(sd: State) -> State:
    """Hugging Face `ViTModel` / `ViTForImageClassification` -> timm (separate q, k, v fused into `qkv`)."""
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    out: State = {}
    simple = _HF_VIT_OUTSIDE_BLOCKS
    layer = {
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            if key.startswith("pooler."):
                _log.info("dropping HF ViT pooler weight %s (timm ViTs have no tanh pooler)", key)
                continue
            if key == "embeddings.mask_token":
                continue
            out[key] = value
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        qm = re.match(r"attention\.attention\.(query|key|value)$", name)
        if qm:
            qkv.setdefault((i, kind), {})[qm.group(1)] = value
        elif name in layer:
            out[f"blocks.{i}.{layer[name]}.{kind}"] = value
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def is_hf_vit_v5(sd: State) -> bool:
    """transformers 5 in-memory names: `vit.layers.N.attention.q_proj`, `mlp.fc1` (files keep the 4.x names)."""
    return is_hf_vit(sd) and any(re.search(r"(^|\.)layers\.\d+\.attention\.q_proj\.weight$", k) for k in sd)


def from_hf_vit_v5(sd: State) -> State:
    """transformers 5 `ViTModel` / `ViTForImageClassification.state_dict()` -> timm (q, k, v fused into `qkv`)."""
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    out: State = {}
    simple = _HF_VIT_OUTSIDE_BLOCKS
    layer = {"attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "layernorm_before": "norm1", "layernorm_after": "norm2"}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
            continue
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            if key.startswith("pooler.") or key == "embeddings.mask_token":
                continue  # timm ViTs have no tanh pooler; the mask token is for masked pre-training only
            out[key] = value
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        qm = re.match(r"attention\.(q|k|v)_proj$", name)
        if qm:
            qkv.setdefault((i, kind), {})[qm.group(1)] = value
        else:
            out[f"blocks.{i}.{layer.get(name, name)}.{kind}"] = value
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def is_mha(sd: State) -> bool:
    return any(k.endswith(".in_proj_weight") for k in sd)


def from_mha(sd: State) -> State:
    """Pre-norm ViTs written with `nn.MultiheadAttention` (`in_proj_weight` is already [q; k; v]).

    Blocks live under `transformer.` / `blocks.` / `layers.` / `encoder.layers.`; the MLP is a Sequential
    whose first and last Linear become `fc1` and `fc2`.
    """
    out: State = {}
    mlp_linears: dict[int, list[int]] = {}
    pattern = re.compile(r"^(?:transformer\.layers|transformer|encoder\.layers|layers|blocks)\.(\d+)\.(.+)$")
    for key, value in sd.items():
        m = pattern.match(key)
        if m is None:
            key = {"pos_embed.pos_embedding": "pos_embed", "pos_embedding": "pos_embed"}.get(key, key)
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        rest = re.sub(r"^(attn|self_attn|attention)\.in_proj_(weight|bias)$", r"attn.qkv.\2", rest)
        rest = re.sub(r"^(attn|self_attn|attention)\.out_proj\.(weight|bias)$", r"attn.proj.\2", rest)
        rest = re.sub(r"^(ln_?1|norm_?1)\.", "norm1.", rest)
        rest = re.sub(r"^(ln_?2|norm_?2)\.", "norm2.", rest)
        mm = re.match(r"^(mlp|ffn|ff)\.(\d+)\.(weight|bias)$", rest)
        if mm:
            mlp_linears.setdefault(i, [])
            idx = int(mm.group(2))
            if idx not in mlp_linears[i]:
                mlp_linears[i].append(idx)
            rest = f"mlp.@{idx}.{mm.group(3)}"
        out[f"blocks.{i}.{rest}"] = value
    for i, indices in mlp_linears.items():
        if len(indices) != 2:
            raise UnsupportedCheckpoint(f"block {i}: expected an MLP of two Linear layers, found indices {indices}")
        first, last = sorted(indices)
        for kind in ("weight", "bias"):
            for idx, name in ((first, "fc1"), (last, "fc2")):
                key = f"blocks.{i}.mlp.@{idx}.{kind}"
                if key in out:
                    out[f"blocks.{i}.mlp.{name}.{kind}"] = out.pop(key)
    return out


def to_timm(sd: State) -> tuple[State, str]:
    """Convert a state dict to timm keys; returns (state dict, name of the layout detected)."""
    refuse_torch_encoder_layer(sd)
    if is_hf_vit_v5(sd):
        return from_hf_vit_v5(sd), "huggingface-vit-v5"
    if is_hf_vit(sd):
        return from_hf_vit(sd), "huggingface-vit"
    if is_mha(sd) and not any(k.startswith("visual.") for k in sd):  # OpenAI CLIP is timm's to convert
        return from_mha(sd), "torch-multihead-attention"
    return dict(sd), "timm"

