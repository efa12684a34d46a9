"""The `robust` protocol of `vk.bench`: robust accuracy under an attack (PGD by default) at a stated ε, beside
the clean accuracy of the same images, on the model the `finetune` protocol trains.

Recipe key (every field optional; ε may be written as a fraction, `2/255`):

    robust: {method: pgd, eps: 2/255, alpha: 0.5/255, steps: 10, norm: linf, random_start: true, n: 200}

`n` attacks a uniform sample of n evaluation images (seeded by the cell's seed; default: all of them). The
attack's full config (defaults filled), the method and `n` enter the cell key, so a changed ε is a new cell.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from vitkit import registry

from .api import attack, get_attack, pixel_transform
from .commands import number


def parse(raw: Optional[dict]) -> dict:
    """The recipe's `robust:` mapping as canonical settings `{"method", "config" (all fields), "n"}`; a
    `ValueError` / `TypeError` names a bad method, field or value."""
    raw = dict(raw or {})
    method = raw.pop("method", "pgd")
    n = raw.pop("n", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"robust.n: the number of evaluation images to attack must be an integer >= 1 (or left "
                         f"out for all), got {n!r}")
    spec = get_attack(str(method))
    config = {k: number(v) if isinstance(v, str) else v for k, v in raw.items()}
    cfg = registry.make_config(spec, **config)
    if not spec.needs_labels:
        raise ValueError(f"robust.method: `{method}` crafts without labels; the robust protocol measures accuracy "
                         "under a label-guided attack (pgd, fgsm)")
    return {"method": spec.name, "config": registry.config_dict(cfg), "n": n}


def robust_accuracy(model, evaluation, settings: dict, data: dict, seed: int, device: str) -> dict:
    """Attack `model` on (a seeded sample of) the evaluation split; the row's fields: `acc` (robust accuracy),
    `clean_acc` (the same images, clean), `asr`, `n_attacked` and the full `robust` report."""
    import torch

    from .commands import sample

    n = settings["n"]
    indices = sample(evaluation, n, seed)
    stats = {k: v for k, v in data.items() if k in ("mean", "std")}
    pixels = evaluation.with_transform(pixel_transform(model, **{k: v for k, v in data.items() if k not in stats}))
    pairs = [pixels[i] for i in indices]
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([int(p[1]) for p in pairs])
    cfg = settings["config"]
    fields = {f.name for f in dataclasses.fields(get_attack(settings["method"]).config)}
    result = attack(model, images, labels, method=settings["method"], seed=seed, device=device, **stats,
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields})
    report = result.report()
    return {"acc": report["robust_accuracy"], "clean_acc": report["clean_accuracy"],
            "asr": report["attack_success_rate"], "n_attacked": report["n"], "robust": report}
