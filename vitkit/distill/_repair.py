"""The small loop shared by the feature-repair methods (registers, denoise, locality-align): a loss of a batch of
images, AdamW over what requires grad, an exponential learning-rate decay, an optional progress bar."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Teacher rule (distill.md): eval mode, no parameter requires grad."""
    return teacher.eval().requires_grad_(False)


def exp_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """`lr` at step 0 decaying exponentially to `min_lr` at step `total - 1`."""
    if total <= 1 or min_lr <= 0:
        return lr
    return lr * math.exp(math.log(min_lr / lr) * step / (total - 1))


def images_of(batch) -> torch.Tensor:
    """The image tensor of a batch that is either images or (images, labels, ...)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def train_steps(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, steps: int,
                lr: float, min_lr: float, weight_decay: float, progress: bool, name: str) -> list[float]:
    """`steps` AdamW steps over the parameters of `model` that require grad; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: no parameter of the student requires grad; apply the method first")
    if steps < 1:
        raise ValueError(f"{name}: `steps` must be >= 1, got {steps}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    losses: list[float] = []
    model.train()
    cycle = itertools.cycle(batches)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("loss {task.fields[loss]}"))
        bar.start()
        task = bar.add_task(name, total=steps, loss="-")
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = exp_lr(step, steps, lr, min_lr)
            loss = loss_fn(images_of(next(cycle)).to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: the loss became {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.stop()
    model.eval()
    return losses
