"""Attacks on pretrained ViTs: `vk.attack(model, images, labels, method=...)` (spec: ../shared/methods/robust.md;
docs: docs/robust.md).

Contract (what every attack module and caller can rely on):

* **Pixel space.** `images` are (N, C, H, W) float pixels in [0, 1], never normalised; ε, α and every norm are
  in these pixel units. The attack normalises inside with the model's own mean/std (`AttackContext.normalise`,
  read from `vk.data.transform(model)`'s data config: `pretrained_cfg`, or `vk.load(..., mean=, std=)`), so the
  ε ball is the same whatever the normalisation. `vk.robust.pixel_transform(model)` turns PIL images into
  such tensors (the model's resize and crop, no normalisation).
* **The model is never updated.** During the attack the model is in eval mode with `requires_grad=False` on
  every parameter (`frozen(model)`); afterwards every module's mode and every parameter's flag are restored.
  Attacks take input gradients with `torch.autograd.grad`, never `.backward()`, so no `.grad` changes.
* **Registry.** An attack is a module of this package ending with one call
  `register_attack("name", config=Config, run=run, needs_labels=True, torchattacks=None)`; the registry imports
  every module here on first use (`attacks()`, `get_attack(name)`), except `api`, `commands`, `bench`, `_*`
  and `*_algo`. `Config` is a frozen dataclass with help on every field and checks in `__post_init__`
  (`ValueError` naming the attack and field); `vk.attack(..., **config)` fills it through
  `vitkit.registry.make_config` (unknown fields: `TypeError` listing the valid ones).
* **run(ctx, x, y, cfg) -> x_adv.** One batch: `x` pixel images on the attack device, `y` labels — or the
  targets when `ctx.targeted`, or None for an attack registered with `needs_labels=False` called without
  labels. Returns adversarial pixel images of `x`'s shape in [0, 1]. `ctx` (`AttackContext`) holds the frozen
  `model` (it takes normalised images), `mean`/`std` (1, C, 1, 1), `normalise(x)`, `logits(x)`,
  `loss(x, y)` (summed cross-entropy), `targeted` and a seeded CPU `generator` for all randomness.
* **Result.** `vk.attack` returns an `AttackResult`: `images` (adversarial, CPU), `clean`, `labels`,
  `clean_pred`, `adv_pred`, `targets`, and `clean_accuracy`, `robust_accuracy` (fraction still correct),
  `attack_success_rate` (untargeted: fraction of originally-correct samples made wrong; targeted: fraction of
  originally-correct samples with label != target sent to the target), `perturbation()`, `report()` (JSON
  dict) and `transfer(other_model)` (the same images scored on another model, e.g. a downstream model). It
  unpacks as `x_adv, report = vk.attack(...)`. Without labels (label-free attacks) the model's clean
  predictions serve as labels (`labels_from="model"`).
* **Errors.** Bad input is one `ValueError` / `TypeError` naming the problem and the fix: unknown method or
  backend, ε < 0, labels of the wrong length or out of range, images outside [0, 1] or not (N, C, H, W).
* **Backends.** `backend="torchattacks"` runs the torchattacks attack built by the registered
  `torchattacks(ctx, cfg)` factory (`torchattacks_setup` adds the normalisation and targeted mode).
"""
from __future__ import annotations

from .api import (Attack, AttackContext, AttackResult, attack, attacks, check_images, frozen, get_attack,
                  norm_stats, pixel_transform, predict, register_attack, torchattacks_setup)

__all__ = ["attack", "attacks", "get_attack", "register_attack", "Attack", "AttackContext", "AttackResult",
           "frozen", "norm_stats", "pixel_transform", "predict", "check_images", "torchattacks_setup"]
