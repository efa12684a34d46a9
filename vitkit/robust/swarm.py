"""SWARM audit: build a switchable prompt backdoor on your backbone and task, and see whether a detector finds it.

Paper: *Not All Prompts Are Secure: A Switchable Backdoor Attack Against Pre-trained Vision Transformers*, Yang,
Bai, Gao, Yang, CVPR 2024, arXiv:2405.10612. Detector: *Spectral Signatures in Backdoor Attacks*, Tran, Li,
Madry, NeurIPS 2018.

Claim: visual prompts can carry a backdoor that an extra *switch* token turns on: with the switch off the model
is benign even on triggered images (so it passes inspection), with it on an invisible trigger (|τ| <= 4/255)
sends images to the target class (95%+ ASR). vitkit ships it as an **audit**, not an attack to deploy:
`vk.audit(model, train, test, method="swarm")` trains the backdoored VPT on your task, reports clean accuracy
and ASR with the switch off and on (beside a benign VPT trained alike), then runs spectral signatures on the
model's features in both modes and reports how well they single out triggered images.

Plugs in at: pattern 3 on top of vitkit's own `vpt` adapter (VPT-shallow, `vk.adapt(model, "vpt")`): one more
block-0 `before_block` extension inserts the switch `s` right after the prompts when it is on,
`[prefix | prompts | s | patches]`, and counts it as a prompt (stripped before the final norm and pooling); an
`after_block` tap on the last block reads the tokens for the distillation. The trigger is an input transform,
`x̃ = clip(x + τ)`, in the model's normalised units, `|τ| <= ε/σ` (= `clip_[0,1]` and ε in pixel space).
Training is `vk.fit` with one extra loss (`add_loss`) per batch:

    (a) switch off on x̃, labels y:                   CE       -> prompts, head, trigger (x itself: fit's own CE)
    (b) switch on  on [x, x̃], labels [y, target]:    CE + λ·MSE(F_clean(x), F_bd(x) without s)
                                                               -> switch, head, trigger (prompts detached)

and τ projected onto the bound after every optimizer step.

Hand-written here, and why: no library implements SWARM or an audit of prompt adapters; the backdoor
benchmarks (BackdoorBench, ART's poisoning module) target full models trained on poisoned data. Differs from the
reference: (a) and (b) are one summed loss and one AdamW step (vk.fit's optimiser and cosine schedule) instead
of two SGD steps per batch; the distillation compares tokens aligned without the switch (`legacy_alignment=True`
compares the first N backdoor tokens with the N clean ones, as the reference does); the clean-mode target
tokens are recomputed without gradients. The backdoored model (`AuditResult.model`) is for inspection in the
same process: `swarm` is not a registered method, so `vk.load` refuses a `vk.save` of it.
Spec: ../shared/methods/robust.md R3. Docs: docs/robust.md.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit import registry
from vitkit.models.runner import BlockContext, get_runner, no_checkpointing

from . import swarm_algo as algo
from .api import norm_stats

AUDITS = ("swarm",)


@dataclass(frozen=True)
class Config:
    num_prompts: int = field(default=50, metadata={"help": "benign VPT-shallow prompts (the paper's 50)"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt tokens (the paper's 0.1)"})
    eps: float = field(default=4 / 255, metadata={"help": "L∞ bound of the trigger in pixel units of [0, 1] images"})
    target: int = field(default=0, metadata={"help": "the class the switched-on backdoor sends triggered images to"})
    distill_weight: float = field(default=100.0, metadata={
        "help": "λ of the cross-mode feature distillation MSE(F_clean, F_bd) (the paper's 100)"})
    legacy_alignment: bool = field(default=False, metadata={
        "help": "compare the first N backdoor tokens with the N clean ones as the reference does (misaligned by "
                "one after the prompts); for comparison only"})
    epochs: int = field(default=100, metadata={"help": "vk.fit epochs for the backdoored and the benign VPT "
                                                       "(VPT's schedule: 100)"})
    lr: Optional[float] = field(default=None, metadata={"help": "vk.fit learning rate (None: vpt's own, 1e-3)"})
    batch_size: int = field(default=64, metadata={"help": "vk.fit batch size"})
    baseline: bool = field(default=True, metadata={"help": "also train a benign VPT alike, for comparison"})
    poison_fraction: float = field(default=0.1, metadata={
        "help": "detection: triggered copies of this fraction of the test images are mixed into the inspected set"})
    seed: int = field(default=0, metadata={"help": "seeds training, the trigger's start and the inspected subset"})

    def __post_init__(self):
        for name in ("num_prompts", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"swarm: `{name}` must be >= 1, got {getattr(self, name)}")
        if self.eps < 0:
            raise ValueError(f"swarm: `eps` must be >= 0, got {self.eps} (pixel units of [0, 1] images)")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"swarm: `prompt_dropout` must be in [0, 1), got {self.prompt_dropout}")
        if not 0.0 < self.poison_fraction <= 0.5:
            raise ValueError(f"swarm: `poison_fraction` must be in (0, 0.5], got {self.poison_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"swarm: `lr` must be > 0, got {self.lr}")


class Switch(nn.Module):
    """The switch token `s` (1, D) (VPT init), the trigger `τ` (C, H, W) and its bounds (normalised units)."""

    def __init__(self, dim: int, patch_size: tuple, image_size: tuple, mean, std, eps: float, target: int,
                 distill_weight: float, legacy: bool, generator: torch.Generator):
        super().__init__()
        v = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))
        self.switch = nn.Parameter(torch.rand(1, dim, generator=generator) * 2 * v - v)
        m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.register_buffer("bound", eps / s)
        self.register_buffer("lo", -m / s)
        self.register_buffer("hi", (1 - m) / s)
        self.trigger = nn.Parameter((torch.rand(len(mean), *image_size, generator=generator) * 2 - 1) * self.bound)
        self.target, self.distill_weight, self.legacy = target, distill_weight, legacy
        self.on, self.capture = False, False

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return algo.apply_trigger(x, self.trigger, self.lo, self.hi)

    @torch.no_grad()
    def project(self) -> None:
        self.trigger.copy_(algo.project(self.trigger, self.bound))


def _before_block(x: torch.Tensor, ctx: BlockContext) -> Optional[torch.Tensor]:
    """Block 0, after vpt's prompts: switch on -> prompts detached (phase b leaves them alone), `s` inserted."""
    sw: Switch = ctx.model.swarm
    if not sw.on:
        return None
    state, first = ctx.state, ctx.state.layout.num_prefix_tokens
    at = state.num_prefix_tokens  # right after the prefix and the prompts
    x = torch.cat([x[:, :first], x[:, first:at].detach(), x[:, at:]], dim=1)
    state.num_prompts += 1
    if state.sizes is not None:
        state.sizes = torch.cat([state.sizes[:, :at], state.sizes.new_ones(x.shape[0], 1, 1), state.sizes[:, at:]], 1)
    if state.source is not None:
        state.source = torch.where(state.source >= at, state.source + 1, state.source)
    return algo.insert_switch(x, sw.switch, at)


def _after_block(x: torch.Tensor, ctx: BlockContext) -> None:
    if ctx.model.swarm.capture:
        ctx.state.extra["swarm_tokens"] = x  # the whole sequence: prefix, prompts, (switch), patches


def install(model: nn.Module, cfg: Config, generator: torch.Generator) -> nn.Module:
    """Add the switch and the trigger to a model with `vpt` (shallow) applied; both train, the switch is off."""
    from vitkit.data.transforms import data_config

    if [a.name for a in registry.applied(model)] != ["vpt"] or model.vpt.prompts.shape[0] != 1:
        raise ValueError("swarm: install needs a model with VPT-shallow applied and nothing else")
    mean, std = norm_stats(model)
    size = tuple(data_config(model)["input_size"][1:])
    ref = model.vpt.prompts
    model.swarm = Switch(model.embed_dim, tuple(model.patch_embed.patch_size), size, mean, std, cfg.eps, cfg.target,
                         cfg.distill_weight, cfg.legacy_alignment, generator).to(ref.device, ref.dtype)
    runner = get_runner(model)
    runner.add("before_block", _before_block, owner="swarm", blocks=[0])
    runner.add("after_block", _after_block, owner="swarm", blocks=[len(model.blocks) - 1])
    return model


@contextmanager
def switched(model: nn.Module, on: bool, capture: bool = False):
    """Run forwards inside with the switch `on` (and the last block's tokens kept when `capture`)."""
    sw: Switch = model.swarm
    saved = sw.on, sw.capture
    sw.on, sw.capture = on, capture
    try:
        yield
    finally:
        sw.on, sw.capture = saved


def tokens(model: nn.Module, x: torch.Tensor, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the last block's whole token sequence) of normalised images `x` in mode `on`."""
    with switched(model, on, capture=True), no_checkpointing():  # a recomputation would see the switch reset
        logits = model(x)
        return logits, get_runner(model).state.extra.pop("swarm_tokens")


def clean_mode_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(a) on the triggered copies: CE of the switched-off model against the true labels."""
    with switched(model, False):
        return F.cross_entropy(model(model.swarm.apply_trigger(x)), y)


def backdoor_mode_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(b) switch on, batch [x, x̃] labels [y, target]: CE + λ·MSE of the clean samples' tokens to clean mode."""
    sw: Switch = model.swarm
    with torch.no_grad():
        _, clean = tokens(model, x, on=False)
    logits, bd = tokens(model, torch.cat([x, sw.apply_trigger(x)]), on=True)
    labels = torch.cat([y, torch.full_like(y, sw.target)])
    at = model.num_prefix_tokens + model.vpt.prompts.shape[1]  # where the switch sits
    return F.cross_entropy(logits, labels) + sw.distill_weight * algo.distill_loss(clean, bd[:len(x)], at, sw.legacy)


def _loss(model: nn.Module, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return clean_mode_loss(model, images, targets) + backdoor_mode_loss(model, images, targets)


@contextmanager
def _projected(sw: Switch):
    """Project the trigger onto its bound after every optimizer step taken inside (vk.fit's AdamW)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: sw.project())
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- the audit
@dataclass
class AuditResult:
    """What `vk.audit(..., method="swarm")` returns.

    Attributes:
        figures: `clean_acc_off`, `clean_acc_on` (test accuracy with the switch off / on), `asr_off`, `asr_on`
            (fraction of triggered test images whose label is not the target that go to the target),
            `benign_clean_acc`, `benign_asr` (a benign VPT trained alike, with the same trigger; None without
            `baseline`), `target_rate_off` (the switched-off model's rate of predicting the target on clean
            non-target images: the base rate ASR(off) should stay near).
        detection: per mode ("off", "on"): spectral signatures on the pooled features of the test images mixed
            with triggered copies of `poison_fraction` of them, scored within each predicted class: `auroc`
            (triggered vs clean; 0.5 = chance) and `caught` (fraction of the triggered copies among the
            1.5 x their number highest scores, Tran et al.'s removal budget), `n_clean`, `n_triggered`.
        config: the audit's `Config`. model: the backdoored model (switch off; `switched(model, True)` turns it
            on), for inspection in this process.
    """

    figures: dict
    detection: dict
    config: Config
    model: Any = None

    def report(self) -> dict:
        return {"method": "swarm", "config": registry.config_dict(self.config), **self.figures,
                "detection": self.detection}

    def table(self) -> str:
        f, d = self.figures, self.detection
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        rows = ["| model | switch | clean acc | ASR | detection AUROC | caught |", "|---|---|---|---|---|---|",
                f"| SWARM | off | {pct(f['clean_acc_off'])} | {pct(f['asr_off'])} | {d['off']['auroc']:.3f} | "
                f"{pct(d['off']['caught'])} |",
                f"| SWARM | on | {pct(f['clean_acc_on'])} | {pct(f['asr_on'])} | {d['on']['auroc']:.3f} | "
                f"{pct(d['on']['caught'])} |"]
        if f["benign_clean_acc"] is not None:
            rows.append(f"| benign VPT | - | {pct(f['benign_clean_acc'])} | {pct(f['benign_asr'])} | | |")
        return "\n".join(rows)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, on: bool, triggered: bool, batch_size: int):
    """(predictions, pooled features) of normalised images `x` (the model in eval mode), switch `on`, optionally
    triggered."""
    preds, feats = [], []
    with switched(model, on):
        for i in range(0, len(x), batch_size):
            xb = model.swarm.apply_trigger(x[i:i + batch_size]) if triggered else x[i:i + batch_size]
            f = model.forward_head(model.forward_features(xb), pre_logits=True)
            preds.append(model.head(f).argmax(-1).cpu())
            feats.append(f.cpu())
    return torch.cat(preds), torch.cat(feats)


def _rate(pred: torch.Tensor, mask: torch.Tensor, target: int) -> Optional[float]:
    return float((pred[mask] == target).float().mean()) if mask.any() else None


def _detect(model, x, y, cfg: Config, on: bool, generator: torch.Generator) -> dict:
    from sklearn.metrics import roc_auc_score

    candidates = (y != cfg.target).nonzero().flatten()
    k = max(1, round(cfg.poison_fraction * len(x)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:k]]
    pred_c, feat_c = _predict(model, x, on, False, cfg.batch_size)
    pred_t, feat_t = _predict(model, x[chosen], on, True, cfg.batch_size)
    scores = algo.grouped_spectral_scores(torch.cat([feat_c, feat_t]), torch.cat([pred_c, pred_t]))
    poisoned = torch.cat([torch.zeros(len(x)), torch.ones(len(chosen))])
    flagged = scores.topk(min(len(scores), math.ceil(1.5 * len(chosen)))).indices
    return {"auroc": float(roc_auc_score(poisoned.numpy(), scores.numpy())),
            "caught": float(poisoned[flagged].sum() / len(chosen)), "n_clean": len(x), "n_triggered": len(chosen)}


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(v) for v in xs]).float(), torch.as_tensor(ys).long()


def audit(model: nn.Module, train, test, method: str = "swarm", *, out_dir: str | Path = "runs/audit",
          progress: bool = True, **config) -> AuditResult:
    """Audit prompt adapters for a switchable backdoor (SWARM): build one on `model` and the task, measure it,
    and run the spectral-signature detector against it.

    Args:
        model: the pretrained timm ViT with a head for the task (`vk.load(..., num_classes=K)`), no method
            applied. It is not changed: the audit adapts copies.
        train, test: datasets of `(normalised image tensor, label)`, as for `vk.fit` (`vk.data.transform(model)`).
        method: the audit; "swarm" (the only one so far).
        out_dir: vk.fit's run folders go to `out_dir/swarm` and `out_dir/benign`.
        progress: vk.fit's progress bars.
        **config: `Config` fields (`num_prompts`, `eps`, `target`, `epochs`, `lr`, ...).

    Returns:
        `AuditResult`: clean accuracy and ASR with the switch off and on, the benign VPT's, the detection result.
    """
    from vitkit.data.transforms import data_config
    from vitkit.train import fit
    from vitkit.train.fit import add_loss

    from .api import frozen

    if method not in AUDITS:
        raise ValueError(f"audit: unknown method `{method}`; available: {', '.join(AUDITS)}")
    cfg = registry.make_config(SimpleNamespace(name="swarm", config=Config), **config)
    if registry.applied(model):
        names = ", ".join(a.name for a in registry.applied(model))
        raise ValueError(f"swarm: `model` already has methods applied ({names}"
                         "); pass the pretrained model: the audit applies vpt to copies itself")
    classes = getattr(model, "num_classes", 0)
    if not classes or not 0 <= cfg.target < classes:
        raise ValueError(f"swarm: `target` must be a class of the model's head, in [0, {classes}), got {cfg.target}; "
                         "load the model with num_classes= the task's classes")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("swarm: `train` and `test` must not be empty")
    x_test, y_test = _stack(test)
    if not (y_test != cfg.target).any():
        raise ValueError(f"swarm: every test image is of the target class {cfg.target}; the ASR and the detection "
                         "need test images of other classes")
    size = tuple(data_config(model)["input_size"])
    if tuple(x_test.shape[1:]) != size:
        raise ValueError(f"swarm: test images are {tuple(x_test.shape[1:])} but the model's input (and the trigger) "
                         f"is {size}; build the datasets with vk.data.transform(model)")
    generator = torch.Generator().manual_seed(cfg.seed)
    fit_kw = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress,
                  save_model=False)

    bd = copy.deepcopy(model)
    registry.apply(bd, "vpt", num_prompts=cfg.num_prompts, dropout=cfg.prompt_dropout)
    install(bd, cfg, generator)
    add_loss(bd, _loss)
    with _projected(bd.swarm):
        fit(bd, train, out_dir=Path(out_dir) / "swarm", **fit_kw)
    bd.eval()
    dev = bd.swarm.trigger.device
    x_dev = x_test.to(dev)
    pred_off, _ = _predict(bd, x_dev, False, False, cfg.batch_size)
    pred_on, _ = _predict(bd, x_dev, True, False, cfg.batch_size)
    trig_off, _ = _predict(bd, x_dev, False, True, cfg.batch_size)
    trig_on, _ = _predict(bd, x_dev, True, True, cfg.batch_size)
    other = y_test != cfg.target
    figures = {"clean_acc_off": float((pred_off == y_test).float().mean()),
               "clean_acc_on": float((pred_on == y_test).float().mean()),
               "asr_off": _rate(trig_off, other, cfg.target), "asr_on": _rate(trig_on, other, cfg.target),
               "target_rate_off": _rate(pred_off, other, cfg.target),
               "benign_clean_acc": None, "benign_asr": None}
    if cfg.baseline:
        benign = copy.deepcopy(model)
        registry.apply(benign, "vpt", num_prompts=cfg.num_prompts, dropout=cfg.prompt_dropout)
        fit(benign, train, out_dir=Path(out_dir) / "benign", **fit_kw)
        with frozen(benign), torch.no_grad():
            logits = torch.cat([benign(x_dev[i:i + cfg.batch_size]) for i in range(0, len(x_dev), cfg.batch_size)])
            logits_t = torch.cat([benign(bd.swarm.apply_trigger(x_dev[i:i + cfg.batch_size]))
                                  for i in range(0, len(x_dev), cfg.batch_size)])
        figures["benign_clean_acc"] = float((logits.argmax(-1).cpu() == y_test).float().mean())
        figures["benign_asr"] = _rate(logits_t.argmax(-1).cpu(), other, cfg.target)
    detection = {mode: _detect(bd, x_dev, y_test, cfg, on, torch.Generator().manual_seed(cfg.seed + 1))
                 for mode, on in (("off", False), ("on", True))}
    return AuditResult(figures, detection, cfg, bd)
