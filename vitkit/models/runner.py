"""The block runner: vitkit's one override of timm's `Block.forward`, with named extension points.

Methods change a ViT in three ways: wrap a Linear (no runner needed), add a branch inside a block, or change
the token sequence per block. If each method patched `Block.forward` itself, no two could share a model, so
every method that needs the inside of a block registers a function at one of these points (DESIGN §4):

    before_block   fn(x, ctx) -> x | None       insert / replace tokens (VPT-deep)
    attn_bias      fn(x, ctx) -> bias | None    additive mask handed to fused SDPA as `attn_mask`
    after_attn     fn(x, ctx) -> x | None       merge / drop / sample tokens after the attention residual
    mlp_parallel   fn(x, ctx) -> branch | None  added beside the MLP; sees the residual stream x
    after_block    fn(x, ctx) -> x | None       read or replace the block output (taps)

One block then computes, calling only timm's own sub-modules in timm's order:

    x = before_block(x)
    x = x + drop_path1(ls1(attn(norm1(x), attn_mask=user_mask + sum(attn_bias))))
    x = after_attn(x)
    branches = [f(x) for f in mlp_parallel]
    x = x + drop_path2(ls2(mlp(norm2(x)))) + sum(branches)
    x = after_block(x)

Composition order: within a point, functions run in registration order (the order methods were applied);
across points, the order above. So prompts inserted `before_block` exist before any merging `after_attn`, and
token methods protect them because they count as prefix tokens in the token state.

A per-call `TokenState` (prefix count including prompts, token sizes, source map back to the patch grid)
is created when the model embeds its input and is read by pooling and `forward_intermediates`. It belongs to
one call, not to the model: `model(x)`, `forward_features` and `forward_intermediates` each open a call frame
(a `contextvars` stack, so two threads, or a forward run from inside another forward's hook, never share one)
that lives until the pooling of the same `model(x)`. A block called on its own gets a fresh state. Under
gradient checkpointing each block runs on a snapshot of the state it first saw, so the recomputation in the
backward pass sees exactly that state (and writes nothing back). Prompt tokens are stripped before the final
norm. With nothing registered a block is exactly timm's block.

Hand-written here because no library offers composable extension points inside timm's blocks; timm's own
forward code is not copied, its sub-modules are called.
"""
from __future__ import annotations

import contextvars
import dataclasses
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .layout import TokenLayout, token_layout

POINTS = ("before_block", "attn_bias", "after_attn", "mlp_parallel", "after_block")
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class TokenState:
    """What a forward pass knows about its tokens, shared by every block of that pass.

    Attributes:
        layout: the model's static token layout.
        grid: patch grid (gh, gw) of this input.
        num_prompts: prompt tokens inserted right after the layout's prefix tokens.
        sizes: (B, N, 1) number of input patches each token stands for, or None while all are 1.
        source: (B, gh*gw) index, into the current sequence, of the token each input patch went to (-1: the
            patch was dropped); None while every patch is its own token at position prefix + patch index.
        patch_index: (B, n) grid index of each patch token right after embedding, when timm's patch dropout
            (`patch_drop_rate`, training) kept only some patches (in random order); None when all are present.
        extra: per-method scratch space, keyed by method name.
        output: which tensor this call's `forward_features` / `forward_intermediates` returned (a weak reference
            and its data's address, shape, strides and version), so read-outs that use this call's side results
            (HST, Prompt-CAM) can refuse the features of another call (`check_output`).

    Extensions replace these attributes (never modify their tensors in place): a snapshot (`copy`) is then
    an exact record of the state a block started from.
    """

    layout: TokenLayout
    grid: tuple[int, int]
    num_prompts: int = 0
    sizes: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    patch_index: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    output: Optional[tuple] = None

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens that token-reduction methods must never touch: class, registers, distillation, prompts."""
        return self.layout.num_prefix_tokens + self.num_prompts

    def copy(self) -> "TokenState":
        """A snapshot: the same tensors, a new `extra` dict (so popping a tap from one leaves the other)."""
        return dataclasses.replace(self, extra=dict(self.extra))

    def record_output(self, x: torch.Tensor) -> torch.Tensor:
        """Remember `x` as this call's final features (see `check_output`); returns `x`."""
        self.output = (weakref.ref(x), _data_key(x))
        return x

    def update(self, other: "TokenState") -> None:
        """Take over every attribute of `other` (keeps this object, which callers may hold)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))


def _data_key(x: torch.Tensor) -> tuple:
    """What identifies a tensor's values: a `detach()`ed alias has the same key, a copy or an in-place change not."""
    try:
        version = x._version
    except RuntimeError:  # an inference-mode tensor tracks no version (and cannot be changed outside that mode)
        version = None
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, version


def check_output(model: nn.Module, x: torch.Tensor, method: str) -> TokenState:
    """The token state of the call whose `forward_features` / `forward_intermediates` returned `x` (the same
    tensor, or an alias with the same data, still alive), for a read-out that combines `x` with that call's side
    results. Raises a ValueError naming `method` when `x` came from another call (an earlier batch, another
    thread), was copied or changed in place, or no forward ran: the read-out would mix two batches."""
    state = get_runner(model).state
    ref, key = (None, None) if state is None or state.output is None else state.output
    if ref is None or ref() is None or _data_key(x) != key:
        raise ValueError(f"{method}: forward_head reads side results of the forward that made its features, and "
                         "these features are not the output of this model's latest forward_features in this "
                         "thread (an earlier batch, a copy, or changed in place); call "
                         "model.forward_head(model.forward_features(x)) with no forward in between, or model(x)")
    return state


@dataclass
class BlockContext:
    """Handed to every extension function: which block runs, in which model, with which token state."""

    index: int
    block: nn.Module
    model: nn.Module
    state: TokenState


@dataclass
class _Extension:
    owner: str
    fn: Callable
    blocks: Optional[frozenset[int]]


class _Bound:
    """`functools.partial` that binds a module as first argument; deep-copies and pickles with the model."""

    def __init__(self, fn: Callable, module: nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


class _Frame:
    """One call of a model (`model(x)`, `forward_features`, `forward_intermediates`) or one checkpointed block.

    `state` is the call's token state (None until the input is embedded); `block` is the index of the block the
    runner is about to call (so that the block, and only it, takes this frame's state); `claimed` marks a frame
    opened by `model(x)` once its `forward_features` has taken it.
    """

    __slots__ = ("runner", "state", "block", "claimed")

    def __init__(self, runner: "Runner", state: Optional[TokenState] = None, block: Optional[int] = None):
        self.runner, self.state, self.block, self.claimed = runner, state, block, False


# The frames of the calls running in this context (thread / task), innermost last. A ContextVar, not an
# attribute of the runner: two threads, or a forward started inside another forward's hook, each see their own.
_FRAMES: contextvars.ContextVar[tuple] = contextvars.ContextVar("vitkit_runner_frames", default=())
_LOCAL = threading.local()
_NO_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("vitkit_no_checkpoint", default=False)


@contextmanager
def no_checkpointing(model: Optional[nn.Module] = None) -> Iterator[None]:
    """Forwards run inside (in this thread / task) skip gradient checkpointing.

    `model`: a timm ViT with `set_grad_checkpointing(True)` but no runner yet gets one installed (with nothing
    registered it computes exactly timm's blocks), since timm's own forward would checkpoint regardless.

    For readers that add autograd operations inside the blocks with hooks and take gradients after removing
    them (explainers: `vitkit.explain.capture`): the recomputation would run without those operations, which
    `torch.utils.checkpoint` rightly refuses. Explaining is eval-mode work on a few images, so the memory saving
    is not needed there.
    """
    if (model is not None and isinstance(model, VisionTransformer) and getattr(model, "grad_checkpointing", False)
            and not has_runner(model)):
        get_runner(model)
    token = _NO_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _NO_CHECKPOINT.reset(token)


def _last_states() -> "weakref.WeakKeyDictionary[Runner, TokenState]":
    """The token state of the last completed call of each runner, in this thread."""
    last = getattr(_LOCAL, "last", None)
    if last is None:
        last = _LOCAL.last = weakref.WeakKeyDictionary()
    return last


class Runner:
    """Extension points of one model. Get it with `get_runner(model)`.

    `state` is the token state of the call running now in this thread (inside a forward, its hooks and its
    extensions), or else of the last call that completed in this thread, or None.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.extensions: dict[str, list[_Extension]] = {p: [] for p in POINTS}

    def __getstate__(self):  # pickling / deep copies carry the extensions, never a call's state
        return {"model": self.model, "extensions": self.extensions}

    def __setstate__(self, d):
        self.__dict__.update(d)

    def _frame(self) -> Optional[_Frame]:
        for frame in reversed(_FRAMES.get()):
            if frame.runner is self:
                return frame
        return None

    @property
    def state(self) -> Optional[TokenState]:
        frame = self._frame()
        if frame is not None and frame.state is not None:
            return frame.state
        return _last_states().get(self)

    @state.setter
    def state(self, value: Optional[TokenState]) -> None:
        frame = self._frame()
        if frame is not None:
            frame.state = value
        elif value is None:
            _last_states().pop(self, None)
        else:
            _last_states()[self] = value

    @contextmanager
    def call(self, state: Optional[TokenState] = None, block: Optional[int] = None,
             record: bool = True) -> Iterator[_Frame]:
        """Open a call frame for this context; on exit it is closed and (if `record`) its state becomes the
        thread's last completed state."""
        frame = _Frame(self, state, block)
        token = _FRAMES.set(_FRAMES.get() + (frame,))
        try:
            yield frame
        finally:
            _FRAMES.reset(token)
            if record and frame.state is not None:
                _last_states()[self] = frame.state

    @contextmanager
    def _forward_call(self) -> Iterator[_Frame]:
        """The frame for `forward_features` / `forward_intermediates`: the one `model(x)` opened for this call if
        it is still unclaimed, else a new one."""
        frame = self._frame()
        if frame is not None and frame.state is None and frame.block is None and not frame.claimed:
            frame.claimed = True
            yield frame
            return
        with self.call() as frame:
            frame.claimed = True
            yield frame

    def add(self, point: str, fn: Callable, owner: str, blocks=None) -> None:
        """Register `fn` at `point` for the blocks `blocks` (all when None), on behalf of method `owner`.

        Use module-level functions (or `functools.partial` of them): the runner is deep-copied with the model.
        """
        if point not in POINTS:
            raise ValueError(f"unknown extension point `{point}`; valid points: {', '.join(POINTS)}")
        self.extensions[point].append(_Extension(owner, fn, None if blocks is None else frozenset(blocks)))

    def remove(self, owner: str) -> None:
        """Remove every extension registered by `owner`."""
        for point in POINTS:
            self.extensions[point] = [e for e in self.extensions[point] if e.owner != owner]

    def owners(self) -> list[str]:
        return sorted({e.owner for exts in self.extensions.values() for e in exts})

    def _active(self, point: str, index: int):
        return [e.fn for e in self.extensions[point] if e.blocks is None or index in e.blocks]

    def new_state(self, grid: tuple[int, int]) -> TokenState:
        """A fresh token state for the current call (the thread's last state outside any call)."""
        state = TokenState(layout=token_layout(self.model), grid=grid)
        self.state = state
        return state

    def _block_state(self, index: int) -> TokenState:
        """The state block `index` runs on: its call's, if the runner is calling exactly this block now; else a
        fresh one (a block called on its own, or from inside another block's hook)."""
        frame = self._frame()
        if frame is not None and frame.block == index and frame.state is not None:
            frame.block = None  # taken: a nested call of the same block gets a fresh state
            return frame.state
        return TokenState(layout=token_layout(self.model), grid=token_layout(self.model).grid_size)

    def run_block(self, block: nn.Module, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False) -> torch.Tensor:
        """One timm block with the registered extensions (see the module docstring for the order)."""
        state = self._block_state(index)
        with self.call(state, record=False):  # taps and hooks inside this block read this state
            return self._run_block(block, index, x, state, attn_mask, is_causal)

    def _run_block(self, block, index, x, state, attn_mask, is_causal) -> torch.Tensor:
        ctx = BlockContext(index, block, self.model, state)
        for fn in self._active("before_block", index):
            x = _replace(x, fn(x, ctx))
        mask = attn_mask
        for fn in self._active("attn_bias", index):
            mask = _add_bias(mask, fn(x, ctx))
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask, is_causal=is_causal)))
        for fn in self._active("after_attn", index):
            x = _replace(x, fn(x, ctx))
        branches = [fn(x, ctx) for fn in self._active("mlp_parallel", index)]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        for branch in branches:
            if branch is not None:
                x = x + branch
        for fn in self._active("after_block", index):
            x = _replace(x, fn(x, ctx))
        return x


def prompts_at_input(model: nn.Module, input_size: Optional[tuple[int, int]] = None) -> int:
    """Prompt tokens the methods on `model` insert before block 0, for an input of `input_size` (H, W) pixels.

    Runs only block 0's `before_block` extensions, on zeros and on a state of its own (no forward, the model is
    not changed); what token counts, schedules and budgets must add to the layout's tokens.
    """
    if not has_runner(model):
        return 0
    runner = get_runner(model)
    layout = token_layout(model)
    grid = layout.grid(input_size)
    state = TokenState(layout=layout, grid=grid)
    ref = next(model.parameters())
    x = torch.zeros(1, layout.num_prefix_tokens + grid[0] * grid[1], layout.embed_dim, device=ref.device,
                    dtype=ref.dtype)
    ctx = BlockContext(0, model.blocks[0], model, state)
    with torch.no_grad(), runner.call(state, record=False):
        for fn in runner._active("before_block", 0):
            x = _replace(x, fn(x, ctx))
    return state.num_prompts


def _replace(x: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return x if out is None else out


def _add_bias(mask: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:  # SDPA convention: True = attend
        mask = torch.zeros_like(bias).masked_fill(~mask, float("-inf"))
    return mask + bias


class _BlockForward:
    """Replaces one block's `forward` so that `block(x)` (and hooks on the block) go through the runner."""

    def __init__(self, runner: Runner, index: int, block: nn.Module):
        self.runner, self.index, self.block = runner, index, block

    def __call__(self, x, attn_mask=None, is_causal=False):
        return self.runner.run_block(self.block, self.index, x, attn_mask=attn_mask, is_causal=is_causal)


def get_runner(model: nn.Module) -> Runner:
    """The model's runner, installed on first use (idempotent).

    Raises:
        NotImplementedError: the model is not a timm `VisionTransformer` with pre-norm `Block`s.
    """
    runner = model.__dict__.get("_vitkit_runner")
    if runner is not None:
        return runner
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"vitkit methods need a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
        if missing:
            raise NotImplementedError(
                f"block {i} ({type(block).__name__}) lacks {missing}: vitkit's block runner supports timm's "
                "pre-norm `Block` only")
    runner = Runner(model)
    model.__dict__["_vitkit_runner"] = runner
    for i, block in enumerate(model.blocks):
        block.forward = _BlockForward(runner, i, block)
    model.forward = _Bound(forward, model)
    model.forward_features = _Bound(forward_features, model)
    model.forward_intermediates = _Bound(forward_intermediates, model)
    model.pool = _Bound(pool, model)
    return runner


def has_runner(model: nn.Module) -> bool:
    return "_vitkit_runner" in model.__dict__


def forward(model: VisionTransformer, *args, **kwargs) -> torch.Tensor:
    """`model(x)`: timm's own forward inside one call frame, so pooling reads this call's token state."""
    with get_runner(model).call():
        return type(model).forward(model, *args, **kwargs)


def _patch_drop(model: VisionTransformer, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """timm's patch dropout, keeping which patches survived in the token state (source map, patch index)."""
    from timm.layers import PatchDropout
    from timm.layers.patch_dropout import patch_dropout_forward

    drop = model.patch_drop
    if not isinstance(drop, PatchDropout) or not drop.training or drop.prob == 0:
        return drop(x)
    x, keep = patch_dropout_forward(x, drop.prob, drop.num_prefix_tokens, drop.ordered, drop.training)
    if keep is not None:
        B, n = keep.shape
        p = state.layout.num_prefix_tokens
        gh, gw = state.grid
        source = torch.full((B, gh * gw), -1, dtype=torch.long, device=keep.device)
        state.source = source.scatter(1, keep, (p + torch.arange(n, device=keep.device)).expand(B, -1))
        state.patch_index = keep
    return x


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch-embed, add positions and prefix tokens, and start a fresh token state for this call."""
    runner = get_runner(model)
    token_grid = getattr(model.patch_embed, "token_grid", None)  # input adapters (models/inflate.py): clips, points
    if token_grid is not None:
        grid = token_grid(x)
    elif x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    else:
        grid = token_layout(model).grid(tuple(x.shape[-2:]))  # clear error on a wrong input size
    state = runner.new_state(grid)
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = _patch_drop(model, x, state)
    return model.norm_pre(x)


def _checkpointed_block(runner: Runner, block: nn.Module, index: int, snapshot: TokenState, out: list,
                        x: torch.Tensor) -> torch.Tensor:
    """Run one block on a copy of `snapshot`; `out[0]` receives the state it leaves. Called once in the forward
    and again, in whatever thread autograd uses, to recompute the block in the backward pass: both runs start
    from the same snapshot, so the extensions make the same choices (the RNG is restored by `checkpoint`)."""
    state = snapshot.copy()
    with runner.call(state, block=index, record=False):
        y = block(x)
    out[0] = state
    return y


def run_blocks(model: VisionTransformer, x: torch.Tensor, attn_mask=None, is_causal=False, upto=None):
    """Run the blocks (through the runner) on the current call's state, yielding (index, tokens) after each."""
    runner = get_runner(model)
    frame = runner._frame()
    blocks = model.blocks if upto is None else model.blocks[:upto + 1]
    for i, block in enumerate(blocks):
        if (model.grad_checkpointing and torch.is_grad_enabled() and attn_mask is None and not is_causal
                and not _NO_CHECKPOINT.get()):
            out = [None]
            x = checkpoint(_checkpointed_block, runner, block, i, frame.state.copy(), out, x, use_reentrant=False)
            frame.state.update(out[0])  # the first pass's result; the recomputation writes only its own copy
        else:
            frame.block = i
            try:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            finally:
                frame.block = None
        yield i, x


def strip_prompts(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop prompt tokens (kept right after the layout's prefix) from a sequence of the current forward."""
    state = get_runner(model).state
    if state is None or state.num_prompts == 0:
        return x
    p, n = state.layout.num_prefix_tokens, state.num_prompts
    return torch.cat([x[:, :p], x[:, p + n:]], dim=1)


def _strip_state_prompts(state: TokenState) -> None:
    if state.num_prompts == 0:
        return
    p, n = state.layout.num_prefix_tokens, state.num_prompts
    if state.sizes is not None:
        state.sizes = torch.cat([state.sizes[:, :p], state.sizes[:, p + n:]], dim=1)
    if state.source is not None:
        state.source = torch.where(state.source >= p + n, state.source - n, state.source)
    state.num_prompts = 0


def forward_features(model: VisionTransformer, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
    """timm's `forward_features` through the block runner: embed, blocks, strip prompts, final norm."""
    with get_runner(model)._forward_call() as frame:
        x = embed(model, x)
        for _, x in run_blocks(model, x, attn_mask, is_causal):
            pass
        x = strip_prompts(model, x)
        _strip_state_prompts(frame.state)
        return frame.state.record_output(model.norm(x))


def pool(model: VisionTransformer, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """timm's pooling, weighted by token sizes when tokens stand for several patches (merged tokens).

    Over the tokens timm pools (the prefix too with `pool_include_prefix=True`): 'avg' is the size-weighted
    mean, 'max' and 'avgmax' ignore padding slots (size 0, ATS), 'map' attention pooling gets the `log s` bias.
    With all sizes 1 each equals timm's pooling.
    """
    state = get_runner(model).state
    pool_type = model.global_pool if pool_type is None else pool_type
    sizes = None if state is None else state.sizes
    if sizes is None or sizes.shape[:2] != x.shape[:2]:
        return VisionTransformer.pool(model, x, pool_type)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if model.attn_pool is not None:
        # 'map' pooling: merged tokens weigh by their size (log s bias), padded ones (size 0) are excluded
        bias = sizes[:, start:, 0].log().to(x.dtype)[:, None, None, :]
        return model.attn_pool(x[:, start:], attn_mask=bias)
    if pool_type not in ("avg", "avgmax", "max"):
        return VisionTransformer.pool(model, x, pool_type)
    tokens, w = x[:, start:], sizes[:, start:].to(x.dtype)
    avg = (tokens * w).sum(1) / w.sum(1)
    if pool_type == "avg":
        return avg
    top = tokens.masked_fill(w == 0, float("-inf")).amax(1)
    return top if pool_type == "max" else 0.5 * (avg + top)


def _to_grid(model, y: torch.Tensor, state: TokenState) -> torch.Tensor:
    """(B, P+N, C) tokens of the current forward -> (B, C, gh, gw), unmerging through the source map."""
    B, _, C = y.shape
    gh, gw = state.grid
    patches = y[:, state.layout.num_prefix_tokens:]
    if patches.shape[1] != gh * gw or state.source is not None:
        if state.source is None:
            raise ValueError(f"forward_intermediates: {patches.shape[1]} patch tokens do not fill the "
                             f"{gh}x{gw} grid and no source map was kept; use output_fmt='NLC'")
        # source indexes the sequence with prompts; y has them stripped. -1 marks a dropped patch (zeros).
        p, n = state.layout.num_prefix_tokens, state.num_prompts
        source = torch.where(state.source >= p + n, state.source - n, state.source)
        idx = source.clamp_min(0).unsqueeze(-1).expand(B, gh * gw, C)
        patches = y.gather(1, idx) * (source >= 0).unsqueeze(-1).to(y.dtype)
    return patches.reshape(B, gh, gw, C).permute(0, 3, 1, 2).contiguous()


def forward_intermediates(model: VisionTransformer, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                          norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                          intermediates_only: bool = False, output_dict: bool = False, attn_mask=None,
                          is_causal: bool = False):
    """timm's `forward_intermediates` through the block runner; prompts stripped, merged tokens unmerged."""
    from timm.models._features import feature_take_indices

    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take, max_index = feature_take_indices(len(model.blocks), indices)
    with get_runner(model)._forward_call():
        return _forward_intermediates(model, x, take, max_index, return_prefix_tokens, norm, stop_early,
                                      output_fmt, intermediates_only, output_dict, attn_mask, is_causal)


def _forward_intermediates(model, x, take, max_index, return_prefix_tokens, norm, stop_early, output_fmt,
                           intermediates_only, output_dict, attn_mask, is_causal):
    x = embed(model, x)
    state = get_runner(model).state
    p = state.layout.num_prefix_tokens
    features, prefixes = [], []
    for i, x in run_blocks(model, x, attn_mask, is_causal, upto=max_index if stop_early else None):
        if i in take:
            y = strip_prompts(model, x)
            y = model.norm(y) if norm else y
            prefixes.append(y[:, :p])
            features.append(_to_grid(model, y, state) if output_fmt == "NCHW" else y[:, p:])
    x = strip_prompts(model, x)
    _strip_state_prompts(state)
    if output_dict:
        out = {"image_intermediates": features}
        if p and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            out["image_features"] = state.record_output(model.norm(x))
        return out
    if return_prefix_tokens and p:
        features = list(zip(features, prefixes))
    if intermediates_only:
        return features
    return state.record_output(model.norm(x)), features
