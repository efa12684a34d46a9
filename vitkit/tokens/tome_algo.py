"""ToMe's algorithm on plain tensors: bipartite soft matching, size-weighted merging, source maps, schedules.

Bolya et al., *Token Merging: Your ViT But Faster*, ICLR 2023. Knows nothing about timm: tensors in, tensors
out, so a second integration (another model family) reuses it unchanged. Written from the spec
(../shared/methods/accelerate.md, A1), not from the reference code.

Shapes: `B` batch, `N` tokens including the `P` protected prefix tokens, `C` width, `d` metric width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass
class Match:
    """Which tokens merge where. Indices are positions inside the A / B halves of the non-prefix tokens.

    Attributes:
        num_prefix: P, tokens `0..P-1` that never merge.
        a_idx: (nA,) sequence positions of set A (even positions >= P).
        b_idx: (nB,) sequence positions of set B (odd positions >= P).
        src: (B, r) A tokens that merge away.
        dst: (B, r) their B partners.
        unm: (B, nA - r) A tokens that stay, in position order.
    """

    num_prefix: int
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def max_r(num_tokens: int, num_prefix: int) -> int:
    """The 50 % cap: at most `(N - P) // 2` merges in one block."""
    return max(0, (num_tokens - num_prefix) // 2)


def _halves(t: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the A (even positions >= P) and B (odd positions >= P) tokens of `t` (B, N, ...): no copies."""
    a0 = num_prefix + num_prefix % 2
    b0 = num_prefix + 1 - num_prefix % 2
    return t[:, a0::2], t[:, b0::2]


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Optional[Match]:
    """Match the `r` most similar A->B pairs (cosine similarity of `metric`, (B, N, d)); None if r caps to 0.

    A = even sequence positions >= P, B = odd ones (full-sequence parity). Each A token picks its most similar
    B token; the `r` A tokens with the highest such score merge. Ties are broken by position (stable sort).
    """
    B, N, _ = metric.shape
    r = min(r, max_r(N, num_prefix))
    if r <= 0:
        return None
    pos = torch.arange(num_prefix, N, device=metric.device)
    a_idx, b_idx = pos[pos % 2 == 0], pos[pos % 2 == 1]
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ma, mb = _halves(m, num_prefix)
        scores = ma @ mb.transpose(1, 2)  # (B, nA, nB)
        best, partner = scores.max(dim=-1)  # (B, nA)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]
        unm = order[:, r:].sort(dim=-1).values
        dst = partner.gather(1, src)
    return Match(num_prefix, a_idx, b_idx, src, dst, unm)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, M, C), idx (B, K) -> (B, K, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_weighted(x: torch.Tensor, sizes: Optional[torch.Tensor], match: Match) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: `x_b <- (s_b x_b + sum_{a->b} s_a x_a) / (s_b + sum s_a)`, `s_b <- s_b + sum s_a`.

    Args:
        x: (B, N, C) tokens.
        sizes: (B, N, 1) patches per token (fp32), or None for all ones.
        match: from `bipartite_soft_matching`.

    Returns:
        (B, N - r, C) tokens `[prefix, kept A in position order, B in position order]` and their sizes.
    """
    B, N, C = x.shape
    p = match.num_prefix
    xa, xb = _halves(x, p)
    dst = match.dst.unsqueeze(-1)
    if sizes is None:
        sizes = torch.ones(B, N, 1, device=x.device, dtype=torch.float32)
        sa, sb = _halves(sizes, p)
        new_sb = sb.scatter_add(1, dst, _take(sa, match.src))
        merged = xb.scatter_add(1, dst.expand(-1, -1, C), _take(xa, match.src))
    else:
        sa, sb = _halves(sizes, p)
        s_src = _take(sa, match.src)
        new_sb = sb.scatter_add(1, dst, s_src)
        merged = (xb * sb.to(x.dtype)).scatter_add_(1, dst.expand(-1, -1, C), _take(xa, match.src) * s_src.to(x.dtype))
    merged = merged.div_(new_sb.to(x.dtype))
    out = torch.cat([x[:, :p], _take(xa, match.unm), merged], dim=1)
    out_sizes = torch.cat([sizes[:, :p], _take(sa, match.unm), new_sb], dim=1)
    return out, out_sizes


def new_positions(match: Match, num_tokens: int) -> torch.Tensor:
    """(B, N) position in the merged sequence of every token of the old one (merged A -> its partner)."""
    B = match.src.shape[0]
    p, n_unm = match.num_prefix, match.unm.shape[1]
    device = match.src.device
    new = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    new[:, :p] = torch.arange(p, device=device)
    new[:, match.b_idx] = p + n_unm + torch.arange(len(match.b_idx), device=device)
    a_new = torch.empty(B, len(match.a_idx), dtype=torch.long, device=device)
    a_new.scatter_(1, match.unm, (p + torch.arange(n_unm, device=device)).expand(B, -1))
    a_new.scatter_(1, match.src, p + n_unm + match.dst)
    new[:, match.a_idx] = a_new
    return new


def compose_source(source: Optional[torch.Tensor], new: torch.Tensor, num_prefix: int,
                   num_patches: int) -> torch.Tensor:
    """Source map after a reduction: `source` (B, N_p) old token of each input patch (None: patch i is token
    P + i), `new` (B, N) new position of each old token (-1: dropped). Returns (B, N_p); -1 marks dropped."""
    if source is None:
        source = (num_prefix + torch.arange(num_patches, device=new.device)).expand(new.shape[0], -1)
    valid = source >= 0
    out = new.gather(1, source.clamp_min(0))
    return torch.where(valid, out, torch.full_like(out, -1))


def schedule(num_blocks: int, r: Union[int, Sequence[int]], inflect: float = 0.0) -> list[int]:
    """Per-block merge counts (before the per-block 50 % cap).

    Args:
        num_blocks: depth.
        r: an int (constant, or the mean of a linear ramp) or a per-block list.
        inflect: in [-1, 1]; with an int `r`, values on a ramp from `r(1 - inflect)` at the first block to
            `r(1 + inflect)` at the last, truncated to ints (-1 = the paper's decreasing schedule 2r -> 0).
    """
    if not isinstance(r, int):
        return [int(v) for v in r]
    if num_blocks == 1:
        return [r]
    lo, hi = r * (1 - inflect), r * (1 + inflect)
    step = (hi - lo) / (num_blocks - 1)
    return [int(math.floor(lo + step * i + 1e-9)) for i in range(num_blocks)]


def token_counts(num_tokens: int, num_prefix: int, per_block: Sequence[int]) -> list[int]:
    """Tokens after each block when block l merges `min(r_l, (N_l - P) // 2)` pairs."""
    counts, n = [], num_tokens
    for r in per_block:
        n -= min(r, max_r(n, num_prefix))
        counts.append(n)
    return counts
