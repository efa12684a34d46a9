"""`vk.distill(teacher, student, data, method=...)`: a registered method's loss around the student, trained by
`vk.fit`."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from vitkit.augment import refuse_attached

from .base import Distiller, Teacher, _fit_keys, get, input_stats, transform_stats

_log = logging.getLogger("vitkit")


def distill(teacher: Optional[nn.Module], student: nn.Module, data: torch.utils.data.Dataset, method: str = "kd", *,
            val: Optional[torch.utils.data.Dataset] = None, out_dir: str | Path = "runs/distill", **kwargs):
    """Train `student` from `teacher` on `data` with the distillation method `method`.

    Args:
        teacher: any timm model (frozen here: `eval()`, no gradient, never saved). None only for a method that
            trains without a teacher forward and finds everything it needs on disk (a complete logit cache).
        student: any timm model with `forward_intermediates` (ViT, ResNet, ...); what trains is what requires
            grad (all of a fresh model; `vk.adapt(student, ...)` first to train less).
        data: training dataset of `(image tensor, int label)`, its transform attached (`with_transform`); the
            teacher sees the same augmented view, re-normalised to its own mean/std.
        method: a registered distillation method (`vitkit.distill.methods()`).
        val: validation dataset (student accuracy after each epoch).
        out_dir: run folder (checkpoints, metrics, the student saved with `vk.save` under `model/`).
        **kwargs: `vk.fit` settings (`epochs`, `lr`, `batch_size`, `seed`, `resume`, ...) and the method's
            `Config` fields (e.g. `alpha=0.9, temperature=4` for `kd`).

    Returns:
        `vk.fit`'s `FitResult`; its `config["distill"]` names the method and its config.
    """
    from vitkit.io import save
    from vitkit.registry import Applied, applied, config_dict, make_config
    from vitkit.train.fit import fit

    spec = get(method)
    fit_keys = _fit_keys()
    fit_kwargs = {**spec.fit_defaults, **{k: v for k, v in kwargs.items() if k in fit_keys}}
    cfg = make_config(spec, **{k: v for k, v in kwargs.items() if k not in fit_keys})
    if fit_kwargs.get("label_smoothing"):
        raise ValueError("distill: `label_smoothing` is a setting of vk.fit's cross-entropy, which distillation "
                         "replaces by the method's loss; leave it out")
    if not isinstance(student, nn.Module):
        raise TypeError(f"distill: `student` must be a torch model, got {type(student).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"distill: `teacher` must be a torch model or None, got {type(teacher).__name__}")
    if teacher is student:
        raise ValueError("distill: `teacher` and `student` are the same object; pass a copy (copy.deepcopy) or "
                         "another model")
    refuse_attached(student, "distill", f"the `{method}` loss trains the student on the plain batch")
    if teacher is None and spec.loss.needs_teacher:
        raise ValueError(f"distill: method `{method}` runs the teacher at every step; pass a teacher model")
    if not isinstance(data, torch.utils.data.Dataset) or len(data) == 0:
        raise ValueError(f"distill: `data` must be a non-empty dataset of (image, label), got {data!r}")
    stats = transform_stats(getattr(data, "transform", None))
    if stats is None:
        stats = input_stats(student)
        _log.info("distill: the data transform has no Normalize step; assuming the student's mean/std %s", stats)
    guide = Teacher(teacher, stats) if teacher is not None else None

    example = torch.stack([data[i][0] for i in range(min(2, len(data)))])
    setting = {k: fit_kwargs.get(k, p.default) for k, p in inspect.signature(fit).parameters.items()}
    torch.manual_seed(setting["seed"])  # the method's new modules (projectors) start alike for the same seed
    loss = spec.loss(cfg, guide, student, example)
    train = loss.prepare_data(data, guide, epochs=setting["epochs"], seed=setting["seed"],
                              batch_size=setting["batch_size"], progress=setting["progress"])
    model = Distiller(student, loss, guide)
    model.__dict__["_vitkit_applied"] = [*applied(student), Applied(f"distill-{method}", cfg)]  # resume checks
    result = fit(model, train, val, out_dir=out_dir, save_model=False, **fit_kwargs)
    result.config["distill"] = {"method": method, "config": config_dict(cfg)}

    from accelerate import PartialState

    if PartialState().is_main_process:
        save(student, Path(out_dir) / "model")
    return result
