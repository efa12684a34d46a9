"""Structured pruning: remove whole attention heads and MLP channels, leaving a smaller dense timm ViT.

Paper: *DepGraph: Towards Any Structural Pruning*, Fang et al., CVPR 2023, arXiv:2301.12900 (Torch-Pruning).

Claim: removing the least important heads and MLP hidden channels gives a smaller *dense* model that runs
faster on any device, unlike unstructured sparsity (30 % of heads and channels of ViT-B/16: >= 1.3x CPU speed-up,
`benchmarks/compress_structured.py`); accuracy drops and is recovered by a short fine-tune.

Plugs in at: model surgery of every block's `attn.qkv` (rows of the removed heads in q, k and v), `attn.proj`
(their columns), `attn.norm` when present, `mlp.fc1` (rows), `mlp.norm` when present and `mlp.fc2` (columns);
`attn.num_heads` / `attn.attn_dim` follow. The embedding width, patch embedding, prefix tokens, LayerScale,
qk-norm (per head dim, shared by the heads) and head are untouched, so the result is a plain timm
`VisionTransformer` whose blocks hold timm's own `Attention(dim, num_heads=h_i, attn_head_dim=d)` and
`Mlp(dim, hidden_features=w_i)`: timm alone runs it (docs/compress.md shows the rebuild). Per block, the
`round(heads·H)` heads and about `channels·W` channels (a multiple of `round_to`) of lowest importance go (at
least one of each stays).
Importance: Torch-Pruning's group magnitude (every weight the channel touches: qkv rows, proj columns, ...; a
head scores the mean over its channels, as Torch-Pruning's own head pruning does) or random. The widths kept
are recorded in the config (`kept_heads`, `kept_channels`) so `vk.load` rebuilds the same shapes.

Hand-written here, and why: nothing of the pruning itself: Torch-Pruning's dependency graph finds and cuts
every coupled tensor. Here: which heads / channels to cut per block (exact counts, recorded), keeping qk-norm
out of the graph (Torch-Pruning would cut its per-head-dim weights when a head goes), and updating timm's
`num_heads` / `attn_dim`. Refused: gated attention, non-timm attention or MLP modules (SwiGLU, wrapped Linears:
merge adapters first). Docs: docs/compress.md. Spec: ../shared/methods/compress.md (structural pruning).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.layers.attention import Attention

from vitkit.registry import register

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    heads: float = field(default=0.3, metadata={
        "help": "fraction of attention heads removed in every block, in [0, 1) (round(heads·H) heads; 0: none)"})
    channels: float = field(default=0.3, metadata={
        "help": "fraction of MLP hidden channels removed in every block, in [0, 1)"})
    importance: Literal["l2", "l1", "random"] = field(default="l2", metadata={
        "help": "ranking: Torch-Pruning's group magnitude (L2 or L1 norm of every weight a channel touches), or "
                "random (seeded by `seed`, a baseline)"})
    seed: int = field(default=0, metadata={"help": "seed of the random importance"})
    round_to: int = field(default=8, metadata={
        "help": "MLP channels removed per block: round(channels·W / round_to)·round_to, so that the width stays a "
                "multiple of round_to when W is (CPU matmul kernels are much slower on odd widths: ViT-B's 2150 "
                "vs 2152); 1: exactly round(channels·W)"})
    kept_heads: tuple[int, ...] = field(default=(), metadata={
        "help": "heads kept per block; set by apply and recorded so vk.load rebuilds the same shapes; give it "
                "(one entry per block) to prune to these counts instead of `heads`"})
    kept_channels: tuple[int, ...] = field(default=(), metadata={
        "help": "MLP hidden channels kept per block; set by apply, like kept_heads"})

    def __post_init__(self):
        for name in ("heads", "channels"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"prune-structured: `{name}` must be in [0, 1), got {value}")
        for name in ("kept_heads", "kept_channels"):
            if any(k < 1 for k in getattr(self, name)):
                raise ValueError(f"prune-structured: `{name}` entries must be >= 1, got {getattr(self, name)}")
        if self.round_to < 1:
            raise ValueError(f"prune-structured: `round_to` must be >= 1, got {self.round_to}")


def _check(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"prune-structured: needs a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention or type(mlp) is not Mlp:
            raise NotImplementedError(f"prune-structured: block {i} has {type(attn).__name__} / {type(mlp).__name__};"
                                      " only timm's Attention and Mlp are supported")
        if attn.gate is not None:
            raise NotImplementedError("prune-structured: gated attention (attn.gate) is not supported")
        wrapped = [f"{n} ({type(m).__name__})" for n, m in (("attn.qkv", attn.qkv), ("attn.proj", attn.proj),
                                                            ("mlp.fc1", mlp.fc1), ("mlp.fc2", mlp.fc2))
                   if type(m) is not nn.Linear]
        if wrapped:
            raise ValueError(f"prune-structured: block {i}'s {', '.join(wrapped)} are wrapped by a method; merge "
                             "adapters first (e.g. vitkit.adapt.lora.merge(model)) or prune before adapting")


def _counts(kept: tuple[int, ...], fraction: float, sizes: list[int], what: str, unit: int = 1) -> list[int]:
    """How many to remove in each block: from the recorded kept counts, else round(fraction · size / unit) · unit."""
    if kept:
        if len(kept) != len(sizes):
            raise ValueError(f"prune-structured: `kept_{what}` has {len(kept)} entries, the model {len(sizes)} blocks")
        bad = [(i, k, s) for i, (k, s) in enumerate(zip(kept, sizes)) if k > s]
        if bad:
            raise ValueError(f"prune-structured: `kept_{what}` asks for more than block(s) have: "
                             + ", ".join(f"block {i}: {k} > {s}" for i, k, s in bad))
        return [s - k for k, s in zip(kept, sizes)]
    return [min(int(fraction * s / unit + 0.5) * unit, s - 1) for s in sizes]


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores.float(), stable=True)[:n].tolist())


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    import torch_pruning as tp

    _check(model)
    blocks = list(model.blocks)
    remove_heads = _counts(cfg.kept_heads, cfg.heads, [b.attn.num_heads for b in blocks], "heads")
    remove_channels = _counts(cfg.kept_channels, cfg.channels, [b.mlp.fc1.out_features for b in blocks], "channels",
                              cfg.round_to)
    ref = next(model.parameters())
    size = tuple(model.patch_embed.img_size) if model.patch_embed.img_size is not None else (224, 224)
    example = torch.randn(1, model.patch_embed.proj.in_channels, *size, device=ref.device, dtype=ref.dtype)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    per_head_norms = [n for b in blocks for n in (b.attn.q_norm, b.attn.k_norm) if not isinstance(n, nn.Identity)]
    runner = model.__dict__.get("_vitkit_runner")  # traced without token methods or prompts: they change the
    extensions = runner.extensions if runner is not None else None  # tokens (which Torch-Pruning cannot trace
    if runner is not None:  # through), never the channels
        runner.extensions = {point: [] for point in extensions}
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # "unwrapped parameters" (cls_token, pos_embed): the width is never cut
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                          ignored_layers=per_head_norms, verbose=False)
    finally:
        if runner is not None:
            runner.extensions = extensions
    magnitude = tp.importance.GroupMagnitudeImportance(p=2 if cfg.importance == "l2" else 1)
    rng = torch.Generator().manual_seed(cfg.seed)

    def importance(group, n: int) -> torch.Tensor:  # one score per channel of the group's root
        return torch.rand(n, generator=rng) if cfg.importance == "random" else magnitude(group)

    report = []
    for i, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        was = {"heads": attn.num_heads, "channels": mlp.fc1.out_features}
        heads, channels = [], []
        if remove_heads[i]:  # rooted at proj's input (head h = channels h·d ... (h+1)·d), as Torch-Pruning does
            group = graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs=list(range(attn.attn_dim)))
            scores = importance(group, attn.attn_dim).view(attn.num_heads, attn.head_dim).mean(1)
            heads = _lowest(scores, remove_heads[i])
            idxs = [h * attn.head_dim + j for h in heads for j in range(attn.head_dim)]
            graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs=idxs).prune()
            attn.num_heads -= len(heads)
            attn.attn_dim = attn.num_heads * attn.head_dim
        if remove_channels[i]:
            group = graph.get_pruning_group(mlp.fc1, tp.prune_linear_out_channels,
                                            idxs=list(range(mlp.fc1.out_features)))
            channels = _lowest(importance(group, mlp.fc1.out_features), remove_channels[i])
            graph.get_pruning_group(mlp.fc1, tp.prune_linear_out_channels, idxs=channels).prune()
        assert attn.qkv.out_features == 3 * attn.attn_dim == 3 * attn.proj.in_features
        report.append({"block": i, "heads": was["heads"], "removed_heads": heads, "channels": was["channels"],
                       "removed_channels": channels})
    for n, p in model.named_parameters():  # Torch-Pruning makes new Parameters: keep what trained, what was frozen
        p.requires_grad_(trainable[n])
    model.__dict__["_vitkit_pruned_structure"] = report
    model.__dict__["_vitkit_resolved_config"] = replace(  # recorded instead of cfg (vitkit.registry.apply)
        cfg, kept_heads=tuple(b.attn.num_heads for b in blocks),
        kept_channels=tuple(b.mlp.fc1.out_features for b in blocks))
    _log.info("prune-structured: heads %s, MLP channels %s per block", [b.attn.num_heads for b in blocks],
              [b.mlp.fc1.out_features for b in blocks])
    return model


def pruned_structure(model: nn.Module) -> list[dict]:
    """Per block: heads and channels before pruning and the indices removed (empty lists: none)."""
    return model.__dict__.get("_vitkit_pruned_structure", [])


register("prune-structured", kind="compress", config=Config, apply=apply, identity={"heads": 0.0, "channels": 0.0})
