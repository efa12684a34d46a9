"""Stitch two pretrained timm ViTs into one model with many routes: `vk.stitch(a, b, data)` (SN-Netv2).

Pan et al., "Stitched ViTs are Flexible Vision Backbones" (SN-Netv2, 2023). Claim: two pretrained anchors
joined by stitching layers — least-squares initialised on a calibration batch, then trained low-rank with
FLOPs-aware route sampling — give one model whose routes (the first i blocks of one anchor, a stitching layer,
the other anchor from block j on) fill the accuracy/FLOPs gap between the anchors; least squares alone is
already far above chance. Spec: `../shared/methods/applications.md` entry 2; algorithm in `stitch_algo.py`.

    stitched = vk.stitch(a, b, calibration_data)      # routes "a", "b" and "a3-b3", "b2-a3", ...
    vk.fit(stitched, train, val, epochs=2)            # trains the stitching layers only (anchors frozen)
    rows = stitched.pareto(test)                      # accuracy and FLOPs per route
    stitched.route = "a3-b3"                          # the route model(x) takes in eval mode

A route `"a3-b4"` runs anchor a's embedding and first 3 blocks, the stitching layer, then anchor b's blocks
4.. with b's final norm and head. Both directions are built (a→b and b→a), at block j ≈ i·depth_b/depth_a
± `window`. Inputs are prepared with anchor a's transform (`vk.data.transform(stitched)`); a route entering
through b converts them exactly to b's normalisation. Widths may differ; the token grid, prefix tokens and
classes must match.

Hand-written: no maintained library stitches timm models (the SN-Net code is research code on an old timm).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from .stitch_algo import StitchLayer, flops_bins, sample_route

ROUTE = re.compile(r"^(?P<entry>[ab])(?P<i>\d+)-(?P<exit>[ab])(?P<j>\d+)$")


def _anchor_summary(model: nn.Module) -> tuple:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vk.stitch: anchors must be timm VisionTransformers, got {type(model).__name__}")
    from ..registry import applied

    if applied(model):
        raise ValueError(f"vk.stitch: an anchor has methods applied ({', '.join(a.name for a in applied(model))}); "
                         f"stitch the plain pretrained models")
    return (tuple(model.patch_embed.grid_size), model.num_prefix_tokens, model.num_classes)


class StitchedViT(nn.Module):
    """Two frozen anchors and one trainable stitching layer per route; `route` picks the path in eval mode."""

    vitkit_unsavable = ("a stitched model holds two base models, which `vk.save` cannot describe yet; "
                        "save its stitching layers with torch.save(model.stitches.state_dict(), path)")

    def __init__(self, a: nn.Module, b: nn.Module, routes: list[str], rank: int = 4, bins: int = 4):
        super().__init__()
        if _anchor_summary(a) != _anchor_summary(b):
            raise ValueError(f"vk.stitch: the anchors must share the token grid, prefix tokens and classes; got "
                             f"(grid, prefix, classes) {_anchor_summary(a)} and {_anchor_summary(b)}")
        self.anchors = nn.ModuleDict({"a": a, "b": b})
        self.stitches = nn.ModuleDict()
        for key in routes:
            entry, _, exit_, _ = self.parse(key)
            self.stitches[key] = StitchLayer(self.anchors[entry].embed_dim, self.anchors[exit_].embed_dim, rank)
        for p in self.anchors.parameters():
            p.requires_grad_(False)
        self.pretrained_cfg = dict(getattr(a, "pretrained_cfg", None) or {})
        self.num_classes = a.num_classes
        self.route = "a"
        self.bins = bins
        self.flops: dict[str, float] = {}
        self._exit = self._route_taken = "a"  # the last forward's exit anchor and route
        for name, model in self.anchors.items():  # x_name = x_a * scale + shift turns a's normalisation into name's
            mean_a, std_a = self._norm(a)
            mean, std = self._norm(model)
            self.register_buffer(f"scale_{name}", (std_a / std).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"shift_{name}", ((mean_a - mean) / std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _norm(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        from ..data import data_config

        cfg = data_config(model)
        return torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])

    @property
    def patch_embed(self) -> nn.Module:  # what `vk.data.transform` reads the input size from (anchor a's)
        return self.anchors["a"].patch_embed

    @property
    def routes(self) -> list[str]:
        return ["a", "b", *self.stitches]

    @staticmethod
    def parse(route: str) -> tuple[str, int, str, int]:
        m = ROUTE.match(route)
        if m is None or m["entry"] == m["exit"]:
            raise ValueError(f"stitch: route {route!r} is not 'a', 'b' or '<a|b><i>-<b|a><j>' (e.g. 'a3-b3')")
        return m["entry"], int(m["i"]), m["exit"], int(m["j"])

    def _check(self, route: str) -> str:
        if route not in self.routes:
            raise ValueError(f"stitch: no route {route!r}; routes: {', '.join(self.routes)}")
        return route

    def _input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * getattr(self, f"scale_{name}") + getattr(self, f"shift_{name}")

    def forward_features(self, x: torch.Tensor, route: Optional[str] = None) -> torch.Tensor:
        if route is None:
            if self.training:
                candidates = self._trained_routes
                route = candidates[sample_route(flops_bins([self.flops[r] for r in candidates], self.bins))]
            else:
                route = self.route
        route = self._route_taken = self._check(route)
        if route in ("a", "b"):
            self._exit = route
            return self.anchors[route].forward_features(self._input(x, route))
        entry, i, exit_, j = self.parse(route)
        src, dst = self.anchors[entry], self.anchors[exit_]
        h = src.norm_pre(src.patch_drop(src._pos_embed(src.patch_embed(self._input(x, entry)))))
        for block in src.blocks[:i]:
            h = block(h)
        h = self.stitches[route](h)
        for block in dst.blocks[j:]:
            h = block(h)
        self._exit = exit_
        return dst.norm(h)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.anchors[self._exit].forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, route: Optional[str] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, route))

    @property
    def _trained_routes(self) -> list[str]:
        """The routes training samples: the stitched ones, and the anchors too when their weights train."""
        if not self.flops:
            raise RuntimeError("stitch: route FLOPs are unknown; build the model with vk.stitch")
        anchors_train = any(p.requires_grad for p in self.anchors.parameters())
        return self.routes if anchors_train else list(self.stitches)

    @torch.inference_mode()
    def pareto(self, data, batch_size: int = 256, routes: Optional[list[str]] = None) -> list[dict]:
        """Top-1 and FLOPs of every route (or `routes`) on labelled `data`, sorted by FLOPs."""
        from rich.progress import track

        was_training, route = self.training, self.route
        self.eval()
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        batches = [(x, torch.as_tensor(y)) for x, y in loader]
        rows = []
        for key in track(routes or self.routes, description="stitch routes", transient=True):
            correct = sum(int((self(x, route=self._check(key)).argmax(1) == y).sum()) for x, y in batches)
            rows.append({"route": key, "flops": self.flops[key], "top1": correct / sum(len(y) for _, y in batches)})
        self.train(was_training)
        self.route = route
        return sorted(rows, key=lambda r: (r["flops"], r["route"]))


def candidate_routes(depth_a: int, depth_b: int, window: int = 1) -> list[str]:
    """Both directions: entry blocks i = 1..depth-1, exit block j = round(i·depth_exit/depth_entry) ± window."""
    routes = []
    for entry, exit_, d_in, d_out in (("a", "b", depth_a, depth_b), ("b", "a", depth_b, depth_a)):
        for i in range(1, d_in):
            centre = round(i * d_out / d_in)
            routes += [f"{entry}{i}-{exit_}{j}" for j in range(max(1, centre - window), min(d_out - 1, centre + window) + 1)]
    return routes


def _block_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Tokens entering each block (index k: after k blocks; the last is the output of the final block)."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = [h]
    for block in model.blocks:
        h = block(h)
        out.append(h)
    return out


def _calibration_images(data, count: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[:count]
    images = []
    for item in data:
        images.append(item[0] if isinstance(item, (tuple, list)) else item)
        if len(images) == count:
            break
    if not images:
        raise ValueError("vk.stitch: the calibration data is empty")
    return torch.stack([torch.as_tensor(x) for x in images])


def _route_flops(model: StitchedViT, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one image per route, counted by `vk.info`'s counter (attention on timm's eager path: torch's flop
    counter has no formula for the fused CPU kernel)."""
    from ..info import count_gmacs

    route, flops = model.route, {}
    for key in model.routes:
        model.route = key
        flops[key] = count_gmacs(model, tuple(x.shape[1:])) * 2e9
    model.route = route
    return flops


@torch.no_grad()
def stitch(a: nn.Module, b: nn.Module, data, *, rank: int = 4, window: int = 1, calibration: int = 32,
           bins: int = 4, routes: Optional[list[str]] = None) -> StitchedViT:
    """Join anchors `a` and `b` with least-squares stitching layers fitted on `calibration` images of `data`.

    Args:
        a, b: timm VisionTransformers with the same token grid, prefix tokens and classes (widths and depths
            may differ); they are frozen, not copied.
        data: images prepared for `a` (`vk.data.transform(a)`): a dataset of (image, label) or a tensor (N, C, H, W).
        rank: rank of the trainable update of each stitching layer (0: least squares only, nothing to train).
        window: exit blocks tried around the matching depth (routes per entry block: 2·window + 1).
        calibration: images for the least-squares fit (their tokens must outnumber the entry width).
        bins: FLOPs bins of the route sampler used in training mode.
        routes: explicit route names instead of the candidates (e.g. ["a3-b3"]).
    """
    for name, value in (("rank", rank), ("window", window), ("calibration", calibration), ("bins", bins)):
        if not isinstance(value, int) or value < (0 if name in ("rank", "window") else 1):
            raise ValueError(f"vk.stitch: `{name}` must be a {'non-negative' if name in ('rank', 'window') else 'positive'}"
                             f" integer, got {value!r}")
    routes = candidate_routes(len(a.blocks), len(b.blocks), window) if routes is None else list(routes)
    for key in routes:
        entry, i, exit_, j = StitchedViT.parse(key)
        depth_in, depth_out = len((a if entry == "a" else b).blocks), len((a if exit_ == "a" else b).blocks)
        if not (0 < i <= depth_in and 0 <= j < depth_out):
            raise ValueError(f"vk.stitch: route {key!r} is outside the anchors (depths a={len(a.blocks)}, "
                             f"b={len(b.blocks)})")
    model = StitchedViT(a, b, routes, rank=rank, bins=bins)
    was_training = (a.training, b.training)
    a.eval(), b.eval()
    x = _calibration_images(data, calibration)
    tokens = {name: _block_inputs(m, model._input(x, name)) for name, m in model.anchors.items()}
    for key in routes:
        entry, i, exit_, j = model.parse(key)
        model.stitches[key].init_least_squares(tokens[entry][i], tokens[exit_][j])
    model.flops = _route_flops(model, x)
    a.train(was_training[0]), b.train(was_training[1])
    return model.eval()


def plot_pareto(rows: list[dict], path, title: str = "stitched routes", names: Optional[dict] = None) -> None:
    """Accuracy against FLOPs per route as a PNG: a→b and b→a routes, the anchors (named by `names`, e.g.
    {"a": "embedded"}) and the straight line joining them, the trade-off stitching is meant to fill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"a": "a", "b": "b", **(names or {})}
    fig, ax = plt.subplots(figsize=(6, 4))
    for entry, exit_ in (("a", "b"), ("b", "a")):
        routes = [r for r in rows if r["route"].startswith(entry) and r["route"] not in ("a", "b")]
        ax.scatter([r["flops"] / 1e6 for r in routes], [r["top1"] for r in routes], s=18,
                   label=f"{names[entry]} → {names[exit_]} routes")
    anchors = sorted((r for r in rows if r["route"] in ("a", "b")), key=lambda r: r["flops"])
    ax.plot([r["flops"] / 1e6 for r in anchors], [r["top1"] for r in anchors], "k--", lw=0.8)
    for r in anchors:
        ax.scatter(r["flops"] / 1e6, r["top1"], marker="*", s=160, label=f"anchor {r['route']} ({names[r['route']]})")
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
