"""The attack registry, the attack context, `AttackResult` and `vk.attack` (contract: `vitkit/robust/__init__.py`).

Attacks are tasks, not methods: they never change the model, so they live in their own registry (`ATTACKS`, a
`vitkit.registry.Registry`), not in `vk.methods()`. Each attack module of `vitkit.robust` ends with one
`register_attack(...)` call; the registry imports every such module on first use, so a new module is all a new
attack needs.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit import registry

BACKENDS = ("vitkit", "torchattacks")


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Attack(registry.Entry):
    """A registered attack.

    Attributes:
        name: registry name (lower case, `-` separated), the `method=` of `vk.attack`.
        config: its `Config` dataclass (defaults, help on every field, checks in `__post_init__`).
        run: `run(ctx, x, y, cfg) -> x_adv`: pixel images (B, C, H, W) in [0, 1] and their labels (targets
            when `ctx.targeted`; None when the attack needs no labels and none were given) -> adversarial
            pixel images of the same shape, in [0, 1].
        needs_labels: False when the attack crafts without labels (e.g. a feature-space attack).
        torchattacks: optional `(ctx, cfg) -> torchattacks.Attack` for `backend="torchattacks"`.
        doc: first line of the attack module's docstring.
    """

    name: str
    config: type
    run: Callable
    needs_labels: bool = True
    torchattacks: Optional[Callable] = None
    doc: str = ""


# modules of vitkit.robust that register nothing (swarm: the audit, vk.audit)
ATTACKS = registry.Registry("method", ("vitkit.robust",), skip=("api", "commands", "bench", "swarm"),
                            context="attack: ")


def register_attack(name: str, *, config: type, run: Callable, needs_labels: bool = True,
                    torchattacks: Optional[Callable] = None) -> None:
    """Register an attack; called once, at the foot of its module (see `Attack` for the arguments)."""
    ATTACKS.add(Attack(name, config, run, needs_labels, torchattacks), owner=run)


def attacks() -> list[Attack]:
    """Every registered attack, sorted by name."""
    return ATTACKS.all()


def get_attack(name: str) -> Attack:
    """The attack called `name`; an unknown name raises a `ValueError` listing the closest and all names."""
    return ATTACKS.get(name)


# ---------------------------------------------------------------------------------------------- context
@dataclass
class AttackContext:
    """What an attack's `run` receives besides the images: the frozen model and its normalisation.

    Attributes:
        model: the model under attack, in eval mode with `requires_grad=False` on every parameter (restored
            afterwards by `vk.attack`); it takes *normalised* images.
        mean, std: (1, C, 1, 1) tensors on the model's device: the normalisation of `vk.data.transform(model)`.
        targeted: the labels handed to `run` are target classes (descend the loss towards them).
        generator: a CPU `torch.Generator` seeded by `vk.attack(seed=)`; draw all randomness from it.
    """

    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    targeted: bool = False
    generator: Optional[torch.Generator] = None

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel images (B, C, H, W) in [0, 1] -> the model's input."""
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for pixel images."""
        return self.model(self.normalise(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the model's logits for pixel images `x` against `y` (per-sample gradients
        do not depend on the batch size)."""
        return F.cross_entropy(self.logits(x), y, reduction="sum")


@contextmanager
def frozen(model: nn.Module):
    """Eval mode and `requires_grad=False` on every parameter while inside; every module's mode and every
    parameter's flag restored afterwards (also on error). Attacks take input gradients with
    `torch.autograd.grad`, so no `.grad` of the model is created or changed."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def norm_stats(model: nn.Module, mean=None, std=None) -> tuple[tuple, tuple]:
    """The normalisation the model's inputs get from `vk.data.transform(model)` (its `pretrained_cfg`, or the
    `mean` / `std` given to `vk.load`), unless `mean` / `std` are given here."""
    from vitkit.explain.image import norm_stats as _stats

    return _stats(model, mean=mean, std=std)


def pixel_transform(model: nn.Module, **overrides):
    """`vk.data.transform(model)` without its normalisation: image -> (C, H, W) pixel tensor in [0, 1], with
    the model's own resize and crop. What `vk.attack` takes."""
    from vitkit.data.transforms import data_config, transform

    chans = data_config(model)["input_size"][0]
    return transform(model, **{**overrides, "mean": (0.0,) * chans, "std": (1.0,) * chans})


class _PixelModel(nn.Module):
    """The model with its normalisation in front: pixel images in, logits out (what torchattacks attacks)."""

    def __init__(self, ctx: AttackContext):
        super().__init__()
        self.model, self.ctx = ctx.model, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.logits(x)


def torchattacks_setup(ctx: AttackContext, name: str, **kwargs):
    """torchattacks' attack class `name` with `kwargs`, built on the model with its normalisation in front
    (pixel images in and out), in targeted-by-label mode when `ctx.targeted` (it then receives the targets)."""
    try:
        import torchattacks
    except ImportError:
        raise ImportError("attack: backend='torchattacks' needs torchattacks: pip install \"vitkit[attack]\"") \
            from None
    atk = getattr(torchattacks, name)(_PixelModel(ctx), **kwargs)
    if ctx.targeted:
        atk.set_mode_targeted_by_label(quiet=True)
    return atk


# ---------------------------------------------------------------------------------------------- result
def _fraction(hits: torch.Tensor) -> float:
    """Fraction of True in a bool tensor, as count / total (NaN when empty)."""
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


@dataclass
class AttackResult:
    """What `vk.attack` returns. `x_adv, report = vk.attack(...)` unpacks to (images, report()).

    Attributes:
        method, backend: the attack and the backend that ran it.
        config: the attack's `Config` instance (all fields filled).
        images: (N, C, H, W) adversarial pixel images in [0, 1], on the CPU.
        clean: (N, C, H, W) the clean pixel images, on the CPU.
        labels: (N,) true labels; the model's clean predictions when no labels were given (`labels_from`).
        clean_pred, adv_pred: (N,) the model's predictions on the clean and the adversarial images.
        targets: (N,) target classes of a targeted attack, else None.
        labels_from: "given" or "model".
        mean, std: the normalisation the attack used (pixel space -> model input).
    """

    method: str
    backend: str
    config: Any
    images: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    targets: Optional[torch.Tensor] = None
    labels_from: str = "given"
    mean: tuple = ()
    std: tuple = ()

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    @property
    def clean_accuracy(self) -> float:
        return _fraction(self.clean_pred == self.labels)

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all samples still classified correctly after the attack."""
        return _fraction(self.adv_pred == self.labels)

    @property
    def attack_success_rate(self) -> float:
        """Untargeted: the fraction of originally-correct samples made wrong. Targeted: the fraction of
        originally-correct samples whose label is not the target that are sent to the target. NaN when there
        are no such samples."""
        eligible = self.clean_pred == self.labels
        if self.targets is not None:
            eligible &= self.labels != self.targets
            success = self.adv_pred == self.targets
        else:
            success = self.adv_pred != self.labels
        return _fraction(success[eligible])

    def perturbation(self) -> dict:
        """Largest L∞ and L2 norm of `images − clean` over the samples (pixel units)."""
        delta = (self.images - self.clean).flatten(1)
        return {"linf_max": float(delta.abs().amax()) if delta.numel() else 0.0,
                "l2_max": float(delta.norm(dim=1).amax()) if delta.numel() else 0.0}

    def report(self) -> dict:
        """JSON-ready summary: method, backend, config, n, accuracies, ASR (None when undefined), norms."""
        def num(v):
            return None if v != v else v  # NaN -> None (JSON has no NaN)

        return {"method": self.method, "backend": self.backend, "config": registry.config_dict(self.config),
                "n": self.n, "targeted": self.targets is not None, "labels_from": self.labels_from,
                "clean_accuracy": num(self.clean_accuracy), "robust_accuracy": num(self.robust_accuracy),
                "attack_success_rate": num(self.attack_success_rate), **self.perturbation()}

    def __iter__(self):
        return iter((self.images, self.report()))

    def transfer(self, model: nn.Module, *, labels=None, batch_size: int = 64, mean=None, std=None,
                 device: Optional[Union[str, torch.device]] = None) -> "AttackResult":
        """The same clean and adversarial images evaluated on another `model` (transfer, black-box): its
        predictions, with its own normalisation; labels are `labels` (that model's classes, e.g. a downstream
        task's), else these labels when given, else `model`'s own clean predictions."""
        m, s = norm_stats(model, mean, std)
        clean_pred = predict(model, self.clean, m, s, batch_size, device)
        adv_pred = predict(model, self.images, m, s, batch_size, device)
        if labels is not None:
            labels, given = _as_labels(labels, self.n, "labels", getattr(model, "num_classes", None) or None,
                                       self.method), "given"
        else:
            labels, given = (self.labels, "given") if self.labels_from == "given" else (clean_pred, "model")
        return dataclasses.replace(self, labels=labels, clean_pred=clean_pred, adv_pred=adv_pred, mean=m, std=s,
                                   labels_from=given)


# ---------------------------------------------------------------------------------------------- vk.attack
def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _stat_tensor(values: Sequence[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64, device=None) -> torch.Tensor:
    """(N,) predicted classes of pixel images under the normalisation `mean` / `std`, in eval mode (the
    model's modes restored)."""
    dev = _device(model, device)
    m, s = _stat_tensor(mean, dev), _stat_tensor(std, dev)
    out = []
    with frozen(model):
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(dev)
            out.append(model((x - m) / s).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _as_labels(values, n: int, what: str, num_classes: Optional[int], method: str) -> torch.Tensor:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values] * n
    t = torch.as_tensor(values)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise TypeError(f"attack {method}: `{what}` must be a 1-D sequence of integer classes, got "
                        f"dtype {t.dtype} and shape {tuple(t.shape)}")
    if t.numel() != n:
        raise ValueError(f"attack {method}: `{what}` has {t.numel()} entries but there are {n} images; give one "
                         f"class per image")
    if num_classes is not None and n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"attack {method}: `{what}` must be classes in [0, {num_classes}), got values from "
                         f"{int(t.min())} to {int(t.max())}")
    return t.long().cpu()


def check_images(images, method: str = "") -> torch.Tensor:
    """`images` as a float (N, C, H, W) CPU tensor of pixel values in [0, 1], or one clear error."""
    where = f"attack {method}" if method else "attack"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: `images` must be a torch.Tensor (N, C, H, W) of pixels in [0, 1], got "
                        f"{type(images).__name__}; vk.robust.pixel_transform(model) turns PIL images into such "
                        f"tensors")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or not images.dtype.is_floating_point:
        raise TypeError(f"{where}: `images` must be a float tensor (N, C, H, W), got dtype {images.dtype} and shape "
                        f"{tuple(images.shape)}; uint8 images: divide by 255")
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError(f"{where}: `images` contain NaN or infinite values")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError(f"{where}: `images` must be pixel values in [0, 1] (the ε ball is in pixel space), got "
                         f"values from {float(images.min()):.4g} to {float(images.max()):.4g}; pass images before "
                         f"normalisation: the attack normalises with the model's mean/std itself "
                         f"(vk.robust.pixel_transform(model) makes such tensors)")
    return images.detach().float().cpu()


def attack(model: nn.Module, images: torch.Tensor, labels=None, method: str = "pgd", *, targets=None,
           backend: str = "vitkit", batch_size: int = 64, seed: int = 0, mean=None, std=None,
           device: Optional[Union[str, torch.device]] = None, progress: bool = False, **config) -> AttackResult:
    """Attack `model` on pixel `images` and report clean accuracy, robust accuracy and attack success rate.

    Args:
        model: a classifier taking normalised images (any timm ViT, any vitkit-adapted model). It is never
            changed: eval mode and frozen parameters during the attack, modes and flags restored after.
        images: (N, C, H, W) float pixels in [0, 1], *not* normalised (`vk.robust.pixel_transform(model)`).
        labels: (N,) true classes; may be None only for attacks that craft without labels (then the model's
            clean predictions serve as labels in the report).
        method: a registered attack (`vk.robust.attacks()`): `pgd`, `fgsm`, ...
        targets: targeted attack: one class for all images (int) or (N,) classes; None: untargeted.
        backend: "vitkit" (default) or "torchattacks" (cross-check; `pip install "vitkit[attack]"`).
        batch_size: images per attack batch.
        seed: seeds the attack's random start; the same seed, batch size and device give the same images.
        mean, std: override the normalisation (default: the model's data config, as `vk.data.transform`).
        device: where to attack (default: the model's device).
        progress: a Rich progress bar over batches.
        **config: the attack's `Config` fields (`eps`, `alpha`, `steps`, `norm`, ...), ε in pixel units.

    Returns:
        `AttackResult` (unpacks to `x_adv, report`).
    """
    spec = get_attack(method)
    if backend not in BACKENDS:
        raise ValueError(f"attack {method}: unknown backend `{backend}`; valid: {', '.join(BACKENDS)}")
    cfg = registry.make_config(spec, **config)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"attack {method}: `batch_size` must be an integer >= 1, got {batch_size!r}")
    x_all = check_images(images, method)
    n = x_all.shape[0]
    num_classes = getattr(model, "num_classes", None) or None
    if labels is None and spec.needs_labels:
        raise ValueError(f"attack {method}: `labels` are required (one true class per image)")
    y_all = None if labels is None else _as_labels(labels, n, "labels", num_classes, method)
    t_all = None if targets is None else _as_labels(targets, n, "targets", num_classes, method)
    mean, std = norm_stats(model, mean, std)
    if x_all.shape[1] != len(mean):
        raise ValueError(f"attack {method}: images have {x_all.shape[1]} channels but the model's normalisation "
                         f"has {len(mean)}")
    dev = _device(model, device)
    if backend == "torchattacks" and spec.torchattacks is None:
        raise NotImplementedError(f"attack {method}: no torchattacks backend; use backend='vitkit'")

    generator = torch.Generator().manual_seed(seed)
    ctx = AttackContext(model, _stat_tensor(mean, dev), _stat_tensor(std, dev), targeted=t_all is not None,
                        generator=generator)
    clean_pred = predict(model, x_all, mean, std, batch_size, dev)
    if y_all is None:
        y_all, labels_from = clean_pred.clone(), "model"
    else:
        labels_from = "given"
    guide = t_all if t_all is not None else y_all
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = []
    with frozen(model), Progress(TextColumn(f"[bold]attack {method}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), disable=not progress,
                                 transient=True) as bar:
        task = bar.add_task("", total=n)
        torch_atk = spec.torchattacks(ctx, cfg) if backend == "torchattacks" else None
        for i in range(0, n, batch_size):
            x = x_all[i:i + batch_size].to(dev)
            y = None if (labels is None and not ctx.targeted) else guide[i:i + batch_size].to(dev)
            if torch_atk is not None:
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    torch.manual_seed(seed + i)  # torchattacks draws its random start from the global RNG
                    adv = torch_atk(x, y)
            else:
                adv = spec.run(ctx, x, y, cfg)
            out.append(adv.detach().float().cpu())
            bar.advance(task, x.shape[0])
    x_adv = torch.cat(out) if out else x_all.clone()
    adv_pred = predict(model, x_adv, mean, std, batch_size, dev)
    return AttackResult(method, backend, cfg, x_adv, x_all, y_all, clean_pred, adv_pred, t_all, labels_from,
                        tuple(mean), tuple(std))
