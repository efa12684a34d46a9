"""`vk.pretrain`: continue self-supervised pre-training of a timm ViT with a registered objective, in place."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

_log = logging.getLogger("vitkit")


def _trainable(model: nn.Module) -> dict[str, bool]:
    """Set what trains: the backbone (all of it, or what an applied adaptation method left trainable), never the
    classifier head; returns the previous `requires_grad` of every parameter, to restore afterwards."""
    from vitkit.registry import applied, get

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = [a.name for a in applied(model) if get(a.name).kind == "adapt"]
    if not adapted:
        model.requires_grad_(True)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        head.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"pretrain: nothing in the backbone is trainable after {', '.join(adapted)}; apply a method "
                         "that trains backbone parameters (e.g. lora), or none to train the whole backbone")
    return before


def pretrain(model: nn.Module, data, objective: str = "mae", *, epochs: int = 10, batch_size: int = 64,
             warmup_epochs: float = 1.0, grad_accum: int = 1, clip_grad: float | None = 3.0, seed: int = 0,
             out_dir: str | Path = "runs/pretrain", resume: bool | str = False, num_workers: int = 0,
             progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None, **config) -> nn.Module:
    """Continue self-supervised pre-training of `model` on unlabelled images, in place, and return it.

    Args:
        model: a timm ViT (pretrained weights are kept as the starting point: nothing is re-initialised).
        data: a vitkit dataset (labels are ignored), an image folder or a bundled dataset name (`digits`).
        objective: a registered objective (`vitkit.pretrain.objectives()`: `mae`, `dino`, ...).
        epochs, batch_size, warmup_epochs, grad_accum, clip_grad, seed, out_dir, resume, num_workers, progress,
        on_epoch_end: as in `vk.fit` (the loop is `vk.fit`'s: exact resume, Accelerate / torchrun multi-process).
        **config: the objective's `Config` fields, including `lr` (new parts) and `backbone_lr` (the ViT).

    Returns:
        `model` itself, trained; the objective's extra parts (decoder, head, teacher) are dropped. Its state-dict
        keys are those it had, so it saves with `vk.save` and loads into `timm.create_model` like any ViT. The
        run folder holds `metrics.jsonl` (loss and the objective's statistics per epoch), `last.pt` and
        `model/` (a `vk.save` folder, usable as a `vitkit bench` backbone).
    """
    from vitkit import data as vdata
    from vitkit.augment import refuse_attached
    from vitkit.registry import make_config
    from vitkit.train.fit import fit

    from . import get_objective

    entry = get_objective(objective)
    cfg = make_config(entry, **config)  # type: ignore[arg-type]
    entry.objective.check(model)
    refuse_attached(model, "pretrain", f"the `{objective}` objective computes its loss on the plain images")
    if isinstance(data, (str, Path)):
        data = vdata.get(data)
    if not hasattr(data, "with_transform"):
        raise TypeError(f"pretrain: `data` must be a vitkit dataset, an image folder or `digits`, got "
                        f"{type(data).__name__}")
    before = _trainable(model)
    try:
        torch.manual_seed(seed)  # the new parts' initialisation is a function of the seed (a run is reproducible)
        obj = entry.objective(model, cfg)
        train = data.with_transform(obj.transform())
        result = fit(model, train, None, epochs=epochs, lr=cfg.lr, batch_size=batch_size,
                     weight_decay=cfg.weight_decay, warmup_epochs=warmup_epochs, grad_accum=grad_accum,
                     clip_grad=clip_grad, seed=seed, out_dir=out_dir, resume=resume, num_workers=num_workers,
                     progress=progress, on_epoch_end=on_epoch_end, objective=obj)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
    problem = obj.diagnose(result.history[-1]) if result.history else None
    if problem:
        _log.warning("pretrain: %s", problem)
    model.__dict__["_vitkit_pretrain"] = {"objective": objective, "history": result.history,
                                          "run_dir": str(result.run_dir)}
    return model
