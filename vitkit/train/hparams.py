"""Where `vk.fit`'s learning rate comes from, and which settings a resumed run must share with its checkpoint."""
from __future__ import annotations

import torch.nn as nn


class ResumeMismatchError(ValueError):
    """`resume=True` found a checkpoint written with other settings (budget, lr, methods); nothing was changed."""


FALLBACK_LR, FALLBACK_WEIGHT_DECAY = 1e-3, 0.05  # when no applied method states its own (e.g. a raw timm model)

# Settings that change what a resumed run computes; a checkpoint written with other values is not resumed silently.
RESUME_KEYS = ("epochs", "lr", "batch_size", "weight_decay", "warmup_epochs", "min_lr", "grad_accum", "clip_grad",
               "label_smoothing", "seed", "train_size", "methods", "objective")


def default_hparams(model: nn.Module) -> dict:
    """The learning rate and weight decay `fit` uses when the caller sets none, and where they come from.

    Each adaptation method's `Config` states the `lr` and `weight_decay` of its paper or of the PETL benchmarks
    (see the fields' help). The rule when several applied methods state one: the **lowest** `lr` wins (the most
    cautious: e.g. `full` after `lora` trains every weight, at full fine-tuning's rate), with that method's
    `weight_decay`; on a tie the method applied last. Token methods (ToMe, EViT, ...) state none: they train
    nothing. Without any, `FALLBACK_LR` / `FALLBACK_WEIGHT_DECAY`.

    Returns:
        `{"lr", "weight_decay", "source"}`; `source` names the method (`"lora"`), or says `"fit default"`.
    """
    from vitkit.registry import applied

    stated = [(a.config.lr, -i, a.name, getattr(a.config, "weight_decay", FALLBACK_WEIGHT_DECAY))
              for i, a in enumerate(applied(model)) if getattr(a.config, "lr", None) is not None]
    if not stated:
        return {"lr": FALLBACK_LR, "weight_decay": FALLBACK_WEIGHT_DECAY, "source": "fit default (no applied method "
                "states an lr)"}
    lr, _, name, weight_decay = min(stated)
    others = sorted({f"{n} {v:g}" for v, _, n, _ in stated if n != name})
    source = f"{name}'s Config" + (f" (lowest of the applied methods; also {', '.join(others)})" if others else "")
    return {"lr": lr, "weight_decay": weight_decay, "source": source}


def method_chain(model: nn.Module) -> list:
    """The applied methods and their configs, without the training hyper-parameters (those are compared apart)."""
    from vitkit.registry import applied, config_dict

    return [[a.name, {k: v for k, v in config_dict(a.config).items() if k not in ("lr", "weight_decay")}]
            for a in applied(model)]


def changed_settings(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every resume-relevant setting that differs (keys an old checkpoint lacks are skipped)."""
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if k in saved and k in now and saved[k] != now[k]]
