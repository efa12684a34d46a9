"""CvT as a timm-style model, and a converter from Hugging Face `CvtForImageClassification` checkpoints.

Paper: *CvT: Introducing Convolutions to Vision Transformers* (Wu et al., ICCV 2021), arXiv:2103.15808.
Claim implemented: the architecture, so that published CvT weights (`microsoft/cvt-13`, `-21`, `-w24`) give the
same logits in vitkit as in transformers (tests/models/test_cvt.py). Three stages; each starts with a
*convolutional token embedding* (an overlapping strided Conv2d on the previous stage's token map, then
LayerNorm) and stacks pre-norm transformer blocks whose q / k / v come from a *convolutional projection*
(depthwise k×k Conv2d + BatchNorm on the token map, stride 1 for q and 2 for k / v, then a Linear). There is no
position embedding; a class token joins in the last stage only (it skips the convolutions and is prepended to
each projected sequence). Classification: LayerNorm of the last stage's class token (or of the token mean when
the last stage has none), then a Linear.

*timm-style:* `timm.create_model("cvt_13")` (also `cvt_21`, `cvt_w24`; registered when vitkit is imported),
`forward_features` (last stage's tokens, class token first), `forward_head(x, pre_logits=)`,
`forward_intermediates` (per-stage NCHW maps), `reset_classifier`, `set_grad_checkpointing`.
`vk.load(folder, any_model=True)` of a folder written by transformers' `save_pretrained` (`config.json` with
`model_type: cvt`) converts it (`load_hf`, `convert_hf`). Not a `VisionTransformer`: vitkit's token methods
refuse it; `vk.bench` runs it.

*Hand-written here, and why:* timm 1.0.31 has no CvT (`timm.list_models('cvt*')` is empty) and transformers'
model is not timm-style (no `forward_features` / `forward_head`), so the bench and `vk.fit` could not use it.
*Differs from the reference:* attention scores are scaled by 1/√C of the whole stage width, not of a head's
width, as the released checkpoints were trained (and transformers computes); only the `dw_bn` projection of the
released models is offered. Spec: ../shared/methods/augment-pretrain.md §F, applications.md #31.
Docs: docs/backbones.md.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import register_model

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class ConvEmbed(nn.Module):
    """Convolutional token embedding: (B, C_in, H, W) -> tokens (B, H'·W', C) after LayerNorm, and (H', W')."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class ConvProjection(nn.Module):
    """Depthwise Conv2d + BatchNorm on the token map, back to tokens: (B, H·W, C) -> (B, H'·W', C)."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = self.bn(self.conv(x.transpose(1, 2).reshape(B, C, *hw)))
        return x.flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention on convolutional projections; a class token (first) bypasses the convolutions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, kernel: int, stride_q: int, stride_kv: int,
                 padding_q: int, padding_kv: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim ** -0.5  # whole stage width, as the released models (see the module docstring)
        self.conv_proj_q = ConvProjection(dim, kernel, stride_q, padding_q)
        self.conv_proj_k = ConvProjection(dim, kernel, stride_kv, padding_kv)
        self.conv_proj_v = ConvProjection(dim, kernel, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], num_prefix: int) -> torch.Tensor:
        B, N, C = x.shape
        prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
        q, k, v = (torch.cat([prefix, conv(tokens, hw)], 1) for conv in (self.conv_proj_q, self.conv_proj_k,
                                                                          self.conv_proj_v))
        h = self.num_heads
        q = self.proj_q(q).reshape(B, -1, h, C // h).transpose(1, 2)  # (B, h, Nq, d)
        k = self.proj_k(k).reshape(B, -1, h, C // h).transpose(1, 2)  # (B, h, Nkv, d)
        v = self.proj_v(v).reshape(B, -1, h, C // h).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, -1, C))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float,
                 **conv):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, **conv)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: tuple[int, int], num_prefix: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw, num_prefix))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch: tuple[int, int, int],
                 cls_token: bool, mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float], eps: float, **conv):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, *patch, eps=eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, drop_path[i], eps, **conv)
                                    for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, [1 +] H'·W', C) and (H', W')."""
        x, hw = self.patch_embed(x)
        p = 0
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
            p = 1
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, hw, p, use_reentrant=False)
            else:
                x = block(x, hw, p)
        return x, hw


class CvT(nn.Module):
    """CvT (see the module docstring). Per-stage arguments are sequences of length 3."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token",
                 embed_dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 num_heads: Sequence[int] = (1, 3, 6), patch_sizes: Sequence[int] = (7, 3, 3),
                 patch_strides: Sequence[int] = (4, 2, 2), patch_paddings: Sequence[int] = (2, 1, 1),
                 mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0), qkv_bias: bool = True, kernel_qkv: int = 3,
                 stride_q: int = 1, stride_kv: int = 2, padding_q: int = 1, padding_kv: int = 1,
                 norm_eps: float = 1e-5, drop_rate: float = 0.0, drop_path_rate: float = 0.1, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"CvT: unknown arguments {sorted(kwargs)}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"CvT: `global_pool` must be 'token' or 'avg', got {global_pool!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        conv = dict(kernel=kernel_qkv, stride_q=stride_q, stride_kv=stride_kv, padding_q=padding_q,
                    padding_kv=padding_kv)
        self.stages = nn.ModuleList()
        chans, start = in_chans, 0
        for s, dim in enumerate(embed_dims):
            self.stages.append(Stage(chans, dim, depths[s], num_heads[s], (patch_sizes[s], patch_strides[s],
                                     patch_paddings[s]), global_pool == "token" and s == len(embed_dims) - 1,
                                     mlp_ratios[s], qkv_bias, rates[start:start + depths[s]], norm_eps, **conv))
            chans, start = dim, start + depths[s]
        self.feature_info = [{"num_chs": d, "reduction": 4 * 2 ** s, "module": f"stages.{s}"}
                             for s, d in enumerate(embed_dims)]
        self.fc_norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(_init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
        self.pretrained_cfg = {"architecture": "cvt", "input_size": (in_chans, 224, 224), "crop_pct": 0.875,
                               "interpolation": "bicubic", **IMAGENET}

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.stages[-1].cls_token is not None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError("CvT: the pooling is fixed at construction (the class token exists or not)")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last stage's tokens (B, [1 +] N, C), class token first; not normalised (the
        head's LayerNorm follows pooling, as in the paper's classifier)."""
        for stage in self.stages[:-1]:
            x, hw = stage(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *hw)
        return self.stages[-1](x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x.mean(1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Per-stage patch-token maps (B, C_s, H_s, W_s) (class token left out), timm's convention: `indices`
        an int (the last n stages) or a list of stage indices; `norm` is accepted for timm compatibility (CvT
        has no final norm over patch tokens)."""
        if output_fmt != "NCHW":
            raise ValueError(f"CvT: forward_intermediates supports output_fmt='NCHW' only, got {output_fmt!r}")
        n = len(self.stages)
        take = list(range(n)) if indices is None else list(range(n - indices, n)) if isinstance(indices, int) \
            else [i % n for i in indices]
        out = []
        for s, stage in enumerate(self.stages):
            tokens, hw = stage(x)
            p = int(stage.cls_token is not None)
            x = tokens[:, p:].transpose(1, 2).reshape(tokens.shape[0], -1, *hw)
            if s in take:
                out.append(x)
            if stop_early and s >= max(take):
                break
        if intermediates_only:
            return out
        return tokens, out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- timm registry
CONFIGS = {  # the three released models (paper Table 2); HF ids for `pretrained=True`
    "cvt_13": dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    "cvt_21": dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)),
    "cvt_w24": dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
}
HF_IDS = {"cvt_13": "microsoft/cvt-13", "cvt_21": "microsoft/cvt-21", "cvt_w24": "microsoft/cvt-w24-384-22k"}


def _create(name: str, pretrained: bool, **kwargs) -> CvT:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model = CvT(**{**CONFIGS[name], **kwargs})  # timm's own arguments above are not the model's
    if pretrained:  # transformers' checkpoint from the hub (offline, the hub client raises; vk.load names it)
        from huggingface_hub import hf_hub_download

        sd = convert_hf(_read(Path(hf_hub_download(HF_IDS[name], "pytorch_model.bin"))))
        if sd["head.weight"].shape[0] != model.num_classes:  # another class count: a fresh head
            sd.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        model.load_state_dict(sd, strict=True)
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name, "num_classes": 1000,  # the released heads
                            **({"input_size": (3, 384, 384)} if name == "cvt_w24" else {})}  # its name: 384 px
    return model


@register_model
def cvt_13(pretrained: bool = False, **kwargs) -> CvT:
    return _create("cvt_13", pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs) -> CvT:
    return _create("cvt_21", pretrained, **kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs) -> CvT:
    return _create("cvt_w24", pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------- Hugging Face
_HF_KEYS = [  # (pattern on the part after `cvt.encoder.stages.S.`, replacement)
    (r"embedding\.convolution_embeddings\.projection\.", "patch_embed.proj."),
    (r"embedding\.convolution_embeddings\.normalization\.", "patch_embed.norm."),
    (r"layers\.(\d+)\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\."
     r"convolution\.", lambda m: f"blocks.{m[1]}.attn.conv_proj_{m[2][0]}.conv."),
    (r"layers\.(\d+)\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\."
     r"normalization\.", lambda m: f"blocks.{m[1]}.attn.conv_proj_{m[2][0]}.bn."),
    (r"layers\.(\d+)\.attention\.attention\.projection_(query|key|value)\.",
     lambda m: f"blocks.{m[1]}.attn.proj_{m[2][0]}."),
    (r"layers\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"layers\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"layers\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"cls_token$", "cls_token"),
]


def convert_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CvtForImageClassification` (or `CvtModel`) state dict -> `CvT` keys (pure; one
    tensor per key, values untouched). Unknown keys are an error naming them."""
    out, unknown = {}, []
    for key, value in sd.items():
        key = key.removeprefix("cvt.")
        if key in ("layernorm.weight", "layernorm.bias"):
            out[key.replace("layernorm", "fc_norm")] = value
            continue
        if key.startswith("classifier."):
            out[key.replace("classifier", "head")] = value
            continue
        m = re.match(r"encoder\.stages\.(\d+)\.(.*)$", key)
        new = None
        if m:
            for pattern, repl in _HF_KEYS:
                rest, n = re.subn("^" + pattern, repl, m[2])
                if n:
                    new = f"stages.{m[1]}.{rest}"
                    break
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        from .convert import UnsupportedCheckpoint

        raise UnsupportedCheckpoint(f"CvT: {len(unknown)} keys of the Hugging Face checkpoint have no CvT "
                                    f"counterpart: {unknown[:5]}")
    return out


def hf_args(cfg: dict) -> dict:
    """`CvT` arguments from a transformers `CvtConfig` (config.json); a setting CvT does not offer is refused."""
    from .convert import UnsupportedCheckpoint

    def same(key: str):
        values = cfg[key]
        if len(set(values)) != 1:
            raise UnsupportedCheckpoint(f"CvT: config.json `{key}` differs per stage ({values}); vitkit's CvT "
                                        "takes one value for all stages")
        return values[0]

    cls = list(cfg.get("cls_token", [False, False, True]))
    if cls[-1] is not True or any(cls[:-1]):
        raise UnsupportedCheckpoint(f"CvT: config.json `cls_token` is {cls}; the paper's CvT (and transformers', "
                                    "which fails without it) has a class token in the last stage only")
    if set(cfg.get("qkv_projection_method", ["dw_bn"])) != {"dw_bn"}:
        raise UnsupportedCheckpoint(f"CvT: qkv_projection_method {cfg['qkv_projection_method']} is not offered "
                                    "(only 'dw_bn', the released models' projection)")
    labels = cfg.get("id2label")
    return dict(embed_dims=tuple(cfg["embed_dim"]), depths=tuple(cfg["depth"]), num_heads=tuple(cfg["num_heads"]),
                patch_sizes=tuple(cfg["patch_sizes"]), patch_strides=tuple(cfg["patch_stride"]),
                patch_paddings=tuple(cfg["patch_padding"]), mlp_ratios=tuple(cfg["mlp_ratio"]),
                qkv_bias=same("qkv_bias"), kernel_qkv=same("kernel_qkv"), stride_q=same("stride_q"),
                stride_kv=same("stride_kv"), padding_q=same("padding_q"), padding_kv=same("padding_kv"),
                in_chans=cfg.get("num_channels", 3),
                num_classes=len(labels) if labels else cfg.get("num_labels", 1000))


def is_hf_cvt(folder: Path) -> bool:
    """Whether `folder` holds a transformers `config.json` of a CvT."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "cvt"
    except (OSError, ValueError):
        return False


def _read(path: Path) -> dict[str, torch.Tensor]:
    from .loading import read_state_dict

    return read_state_dict(path)


def load_hf(path: Path, num_classes: Optional[int] = None) -> tuple[CvT, int, Optional[dict]]:
    """A `CvT` from a transformers folder's weights file `path` (config.json beside it), strictly, with a fresh
    head when `num_classes` differs from the checkpoint's. Returns (model, the checkpoint's class count,
    preprocessing stated by `preprocessor_config.json` or None)."""
    from .loading import check_keys

    args = hf_args(json.loads((path.parent / "config.json").read_text()))
    model = CvT(**{**args, "drop_path_rate": 0.0})
    sd = convert_hf(_read(path))
    check_keys(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    if num_classes is not None and num_classes != args["num_classes"]:
        model.reset_classifier(num_classes)
    data = None
    pre = path.parent / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        data = {"mean": tuple(p["image_mean"]), "std": tuple(p["image_std"])} if p.get("image_mean") else {}
        if p.get("crop_pct"):
            data["crop_pct"] = float(p["crop_pct"])
        if p.get("resample") in (2, 3):
            data["interpolation"] = {2: "bilinear", 3: "bicubic"}[p["resample"]]
    return model, args["num_classes"], data
