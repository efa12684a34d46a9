"""`vk.fit`: fine-tune whatever requires grad. One function, read top to bottom (after nanoGPT's train.py).

    setup (seeds, Accelerate, optimizer over trainable tensors)  ->  maybe resume  ->  for each epoch:
        data order from (seed, epoch)  ->  micro-batches (accumulate, clip, step, lr from a pure schedule)
        ->  validate  ->  checkpoint last (+ best), metrics to JSONL/CSV

Methods decide what trains by setting `requires_grad` (and may add loss terms with `add_loss`); augmentations
attached with `vk.augment` transform each training batch (`vitkit.augment.mix_batch`; a dataset may yield
`(image, label, *extras)`, e.g. ForAug's masks); nothing here knows any method.
The learning rate and weight decay default to the applied methods' own (`default_hparams`:
each adaptation method's Config states its paper's / the PETL benchmarks' values). Multi-process: the same code runs under `accelerate launch` or `torchrun` (Accelerate wraps the
model in DDP; each process reads its own shard of the epoch's order). Mixed precision (bf16) only on CUDA.

Exact resume: a checkpoint holds the trained tensors, the optimizer, the schedule's step, the RNG states and
the next epoch, and the data order is a function of (seed, epoch) only, so a run stopped after any epoch and
resumed ends bit-for-bit where the uninterrupted run ends (tested on CPU).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.augment import mix_batch, refuse_attached
from vitkit.augment._common import attached
from vitkit.io import atomic_torch_save, atomic_write

from .hparams import ResumeMismatchError, changed_settings, default_hparams, method_chain

_log = logging.getLogger("vitkit")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class FitResult:
    """What `fit` returns: the run folder, one metrics dict per epoch, the best epoch's metrics, the settings."""

    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best: Optional[dict] = None
    config: dict = field(default_factory=dict)  # the settings used, with `lr_source` (where the lr came from)


def add_loss(model: nn.Module, fn: Callable) -> None:
    """Add a loss term `fn(model, images, logits, targets) -> scalar` that `fit` adds to the task loss."""
    model.__dict__.setdefault("_vitkit_losses", []).append(fn)


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup for `warmup` steps, then cosine from `lr` down to `min_lr` at step `total`."""
    if step < warmup:  # 1) warm up linearly
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 2) cosine decay over the remaining steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states(accelerator) -> list[torch.Tensor]:
    """Every process's RNG state, serialised to a uint8 tensor each (index = process rank)."""
    from accelerate.utils import gather_object

    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    blobs = gather_object([buffer.getvalue()]) if accelerator.num_processes > 1 else [buffer.getvalue()]
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]


def set_rng_state(state: dict | torch.Tensor) -> None:
    if isinstance(state, torch.Tensor):
        state = torch.load(io.BytesIO(state.numpy().tobytes()), weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    np.random.set_state(tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: every parameter that requires grad, and every buffer."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's sample order for `epoch`: a permutation seeded by (seed, epoch), padded and strided."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    order += order[: (-len(order)) % world]  # pad so every process gets the same number of batches
    return order[rank::world]


def fit(model: nn.Module, train: torch.utils.data.Dataset, val: Optional[torch.utils.data.Dataset] = None, *,
        epochs: int = 10, lr: Optional[float] = None, batch_size: int = 64, weight_decay: Optional[float] = None,
        warmup_epochs: float = 1.0, min_lr: float = 0.0, grad_accum: int = 1, clip_grad: Optional[float] = 1.0,
        label_smoothing: float = 0.0, seed: int = 0, out_dir: str | Path = "runs/fit", resume: bool | str = False,
        num_workers: int = 0, amp: bool = True, progress: bool = True,
        on_epoch_end: Optional[Callable[[dict], None]] = None, save_model: bool = True,
        objective: Optional[nn.Module] = None) -> FitResult:
    """Train the parameters of `model` that require grad on `train` (batches of `(images, labels)`).

    Args:
        model: a classifier; methods applied before `fit` decide what trains. A model with `computes_loss = True`
            (`vk.distill`'s `Distiller`) is called as `model(images, targets) -> (logits, loss, labels)` and
            computes its own loss (`label_smoothing` and `add_loss` terms are then its business).
        train, val: datasets yielding `(image tensor, int label)` (attach a transform with `with_transform`);
            `train.set_epoch(epoch)`, when the dataset has it, is called before each epoch. `train` may yield
            further items (`(image, label, mask)`) that attached augmentations read (ForAug's masks).
        epochs, batch_size: the budget; `batch_size` is per process and per micro-batch.
        lr: peak learning rate; None: the applied methods' own (`default_hparams`, logged with its source).
        weight_decay: AdamW decay of matrices (not of biases, norms, tokens or position embeddings); None: as `lr`.
        warmup_epochs, min_lr: the learning-rate schedule (`lr_at`), stepped per optimizer step.
        grad_accum: micro-batches per optimizer step. clip_grad: max gradient norm (None: no clipping).
        seed: seeds torch, numpy, python and the data order. out_dir: the run folder (checkpoints, metrics).
        resume: False starts clean (an earlier run's files in `out_dir` are replaced); True continues from
            `out_dir/last.pt` when it exists, and refuses (`ResumeMismatchError`, naming each change) when that
            checkpoint was written with another budget, lr, batch size, data size or method chain; "force"
            continues anyway (a warning lists the changes); a path continues from that file (same check).
        amp: bf16 autocast when CUDA is present (ignored on CPU). progress: a Rich progress bar.
        on_epoch_end: called with the epoch's metrics after its checkpoint is written.
        save_model: `vk.save` the final model into `out_dir/model` (trained tensors only, for adapters).
        objective: a self-supervised objective holding `model` (`vk.pretrain`; contract in `vitkit.pretrain`):
            labels are ignored and `objective(images) -> (loss, stats)` replaces the classification loss; its
            `lr_scale(name)` scales each parameter's lr, `after_step(step, total)` runs after every optimizer
            step (EMA teachers), and its whole state (decoder, teacher, centre) goes into the checkpoints.
    """
    from accelerate import Accelerator
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # before
    # seeding: importing rich moves an RNG, so the first run in a process would differ from the later ones

    # --- setup ---------------------------------------------------------------------------------------------
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    cuda = torch.cuda.is_available()  # cpu=True lets Accelerate run multi-process on CPU (gloo) under torchrun
    accelerator = Accelerator(mixed_precision="bf16" if amp and cuda else "no", cpu=not cuda)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir = Path(out_dir)
    if objective is not None and val is not None:
        raise ValueError("fit: `val` is for classification; a self-supervised objective is measured afterwards "
                         "(vk.evaluate with protocol='knn' or 'linear')")
    if objective is not None:
        refuse_attached(model, "fit", "the self-supervised objective computes its loss on the plain images")
    elif getattr(model, "computes_loss", False):
        refuse_attached(model, "fit", "the model computes its own loss on the plain batch (`computes_loss`)")
    if val is not None and hasattr(model, "dense_head"):
        raise ValueError("fit: `val` measures a classifier; measure a dense head afterwards with "
                         "vk.evaluate(model, data, protocol='dense')")
    net = model if objective is None else objective  # what the optimizer, Accelerate and checkpoints see
    if objective is not None:
        objective.distribute(world, accelerator.device)  # batch norm over the global batch (DINO's heads)
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: no parameter requires grad; apply an adaptation method first, e.g. "
                         "vk.adapt(model, 'linear') or vk.adapt(model, 'full')")
    if resume not in (True, False, "force") and not isinstance(resume, (str, Path)) or resume == "":
        raise ValueError(f"fit: `resume` must be True, False, 'force' or a checkpoint path, got {resume!r}")
    defaults = default_hparams(model)
    source_of = {"lr": "set by the caller" if lr is not None else defaults["source"],
                 "weight_decay": "set by the caller" if weight_decay is not None else defaults["source"]}
    lr = float(defaults["lr"] if lr is None else lr)
    weight_decay = float(defaults["weight_decay"] if weight_decay is None else weight_decay)
    if main:
        _log.info("fit: lr %g (%s), weight decay %g (%s)", lr, source_of["lr"], weight_decay,
                  source_of["weight_decay"])
    skip = set(getattr(net, "no_weight_decay", lambda: set())())
    scale_of = getattr(objective, "lr_scale", lambda name: 1.0)  # per-parameter lr multiplier
    groups = []
    for decays in (True, False):
        chosen = [(n, p) for n, p in params if (p.ndim >= 2 and n not in skip and n.split(".")[0] not in skip)
                  == decays]
        for scale in sorted({scale_of(n) for n, _ in chosen}, reverse=True) or [1.0]:
            groups.append({"params": [p for n, p in chosen if scale_of(n) == scale], "lr_scale": scale,
                           "weight_decay": weight_decay if decays else 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    ddp_model, optimizer = accelerator.prepare(net, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    extra_losses = model.__dict__.get("_vitkit_losses", []) if objective is None else []
    computes_loss = objective is None and getattr(model, "computes_loss", False)  # model(images, targets) -> (logits, loss, labels)
    n_batches = math.ceil(len(epoch_order(len(train), seed, 0, rank, world)) / batch_size)
    steps_per_epoch = math.ceil(n_batches / grad_accum)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    step, start_epoch, history, best = 0, 0, [], None
    saved_here = False  # whether `last` holds this run's state (written or resumed here), for the NaN message
    config = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                  min_lr=min_lr, grad_accum=grad_accum, clip_grad=clip_grad, label_smoothing=label_smoothing,
                  seed=seed, world_size=world, trainable=sum(p.numel() for _, p in params), train_size=len(train),
                  methods=method_chain(model), lr_source=source_of["lr"])
    if objective is not None:
        config["objective"] = objective.describe()
    kept_state = (lambda: trained_state(model)) if objective is None else (
        lambda: {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()})

    # --- resume: weights, optimizer, schedule step, RNG, next epoch ----------------------------------------
    last = run_dir / "last.pt"
    force = resume == "force"
    if isinstance(resume, (str, Path)) and not force:
        source = Path(resume)
        if not source.is_file():
            raise FileNotFoundError(f"fit: resume={str(resume)!r}: no such checkpoint file")
    else:
        source = last if resume and last.is_file() else None
    if source is not None:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        changes = changed_settings(ckpt.get("config", {}), config)
        if changes and not force:
            raise ResumeMismatchError(
                f"fit: {source} was written with other settings ({'; '.join(changes)}); resuming would mix two "
                "runs. Start clean with resume=False (vitkit train: leave out --resume), use another out_dir, or "
                "continue anyway with resume='force' (--resume force)")
        if changes:
            warnings.warn(f"fit: resuming {source} with changed settings ({'; '.join(changes)}) because "
                          "resume='force': the result is not that of one uninterrupted run", stacklevel=2)
        expected = set(kept_state())
        if set(ckpt["model"]) != expected:
            raise ValueError(f"fit: {source} holds other tensors than this model trains "
                             f"(missing {sorted(expected - set(ckpt['model']))[:5]}, unexpected "
                             f"{sorted(set(ckpt['model']) - expected)[:5]}); apply the same methods before resuming")
        net.load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, start_epoch = ckpt["scheduler"]["step"], ckpt["epoch"]
        history, best = ckpt["history"], ckpt["best"]
        if len(ckpt["rng"]) != world:
            _log.warning("fit: %s was written by %d process(es), resuming with %d: RNG streams restart",
                         source, len(ckpt["rng"]), world)
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        saved_here = source == last
        _log.info("fit: resumed from %s at epoch %d/%d (step %d)", source, start_epoch, epochs, step)
    elif resume:
        _log.info("fit: nothing to resume in %s, starting fresh", run_dir)
    elif last.is_file() and main:
        _log.info("fit: resume=False: starting clean in %s (the earlier run's last.pt, best.pt and metrics are "
                  "replaced as epochs finish)", run_dir)

    def loader(dataset, indices):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                           shuffle=False, num_workers=num_workers)

    # --- the loop ------------------------------------------------------------------------------------------
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[stats]}"), disable=not (progress and main), transient=False)
    with bar:
        for epoch in range(start_epoch, epochs):
            ddp_model.train()
            task = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=n_batches, stats="")
            order = epoch_order(len(train), seed, epoch, rank, world)
            if hasattr(train, "set_epoch"):  # a dataset whose samples depend on the epoch (vk.distill's logit cache)
                train.set_epoch(epoch)
            for augmentation in attached(model).values():  # augmentations that depend on the epoch (hint-aug)
                getattr(augmentation, "set_epoch", lambda e: None)(epoch)
            loss_sum, correct, labelled, seen, t0 = 0.0, 0, 0, 0, time.perf_counter()
            stat_sums: dict[str, float] = {}  # an objective's per-batch statistics, summed over images
            for i, (images, targets, *extras) in enumerate(loader(train, order)):  # extras: e.g. ForAug's masks
                images, targets = images.to(accelerator.device), targets.to(accelerator.device)
                mix = mix_batch(model, images, targets, extras) if objective is None else None  # vitkit.augment
                first = i - i % grad_accum  # first micro-batch of this optimizer step
                micro = min(grad_accum, n_batches - first)  # micro-batches in this step (the last may be short)
                sync = i == first + micro - 1
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr=lr, warmup=warmup, total=total, min_lr=min_lr) * group.get(
                        "lr_scale", 1.0)
                with (nullcontext() if sync else accelerator.no_sync(ddp_model)), accelerator.autocast():
                    if objective is not None:  # vk.pretrain: labels unused, the objective returns (loss, stats)
                        logits, labels, (loss, stats) = None, None, ddp_model(images)
                        for key, value in stats.items():
                            stat_sums[key] = stat_sums.get(key, 0.0) + float(value) * len(targets)
                    elif computes_loss:  # vk.distill: the model computes its loss (teacher, projectors) itself
                        logits, loss, labels = ddp_model(images, targets)
                    else:
                        with mix.forward():  # vitkit.augment: mixed images, hooks live for this forward only
                            logits = ddp_model(mix.images)  # (B, classes)
                        loss, labels = criterion(logits.float(), mix.target(logits.shape[-1])), mix.labels  # labels or soft targets
                    for extra in extra_losses:
                        loss = loss + extra(model, images, logits, targets)
                finite = bool(torch.isfinite(loss))
                if world > 1:  # every process stops at the same step, or the others wait in all-reduce forever
                    flags = accelerator.reduce(torch.tensor([float(finite)], device=accelerator.device), "sum")
                    bad = world - int(flags.item())
                else:
                    bad = 0 if finite else 1
                if bad:
                    where = "" if world == 1 else (f" on this process (rank {rank})" if not finite else
                                                   f" on {bad} other process(es); rank {rank} stops too")
                    kept = (f"{last} (epoch {start_epoch if not history else history[-1]['epoch']}, untouched)"
                            if saved_here else "none from this run" + (f" ({last} is an earlier run's, untouched)"
                                                                       if last.is_file() else ""))
                    raise NonFiniteLossError(
                        f"fit: the loss is {loss.item() if not finite else 'not finite'}{where} at step {step + 1} "
                        f"(epoch {epoch + 1}, batch {i + 1}) with lr {lr:g} ({source_of['lr']}); training stopped. "
                        f"Last good checkpoint: {kept}. Try a lower lr, clip_grad, or check the data for NaN/inf "
                        "pixels")
                accelerator.backward(loss / micro)
                if sync:
                    if clip_grad is not None:
                        accelerator.clip_grad_norm_([p for _, p in params], clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if objective is not None:
                        objective.after_step(step, total)
                n = len(mix.images) if mix is not None and not computes_loss else len(images)  # hint-aug adds images
                loss_sum += loss.item() * n
                if logits is not None and labels is not None and labels.ndim == 1:  # hard labels (a dense head's
                    correct += (logits.argmax(-1) == labels).sum().item()          # are per patch, flattened)
                    labelled += len(labels)
                seen += n
                speed = seen * world / (time.perf_counter() - t0)
                acc = f"acc {correct / labelled:.3f} " if labelled else ""
                bar.update(task, advance=1, stats=f"loss {loss_sum / seen:.4f} {acc}{speed:.0f} img/s "
                                                   f"lr {optimizer.param_groups[0]['lr']:.2e}")
            totals = accelerator.reduce(torch.tensor([loss_sum, correct, labelled, seen, *stat_sums.values()],
                                                     dtype=torch.float64, device=accelerator.device), "sum").tolist()
            metrics = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": totals[0] / totals[3], "train_acc": totals[1] / max(totals[2], 1),
                       "img_per_s": totals[3] / (time.perf_counter() - t0), "epoch_time_s": time.perf_counter() - t0}
            if not totals[2]:  # no hard labels (an objective, a regression head): no accuracy
                del metrics["train_acc"]
            if objective is not None:  # the objective's statistics
                metrics.update({k: v / totals[3] for k, v in zip(stat_sums, totals[4:])})
            if val is not None:
                metrics.update(validate(ddp_model, loader(val, list(range(rank, len(val), world))), accelerator))
            history.append(metrics)
            score = metrics.get("val_acc", -metrics["train_loss"])
            improved = best is None or score > best.get("val_acc", -best["train_loss"])
            best = metrics if improved else best

            # --- checkpoint (atomic: temporary file, then rename) and metrics ---------------------------
            ckpt = {"model": kept_state(), "optimizer": optimizer.state_dict(), "scheduler": {"step": step},
                    "epoch": epoch + 1, "history": history, "best": best, "config": config,
                    "rng": all_rng_states(accelerator), "data_order": {"seed": seed, "next_epoch": epoch + 1}}
            if main:
                atomic_torch_save(ckpt, last)
                if improved:
                    atomic_torch_save(ckpt, run_dir / "best.pt")
                write_metrics(run_dir, history)
                _log.info("epoch %d/%d  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                       if k not in ("epoch",)), epoch + 1, epochs)
            accelerator.wait_for_everyone()
            saved_here = True
            if on_epoch_end is not None:
                on_epoch_end(metrics)
    if main and save_model and "_vitkit_base" in model.__dict__:
        from vitkit.io import save

        save(model, run_dir / "model")
    return FitResult(run_dir, history, best, config)


@torch.no_grad()
def validate(model: nn.Module, loader, accelerator) -> dict:
    """Loss and top-1 accuracy of `model` over `loader`, summed over processes."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images, targets = images.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        seen += len(targets)
    model.train(was_training)
    totals = accelerator.reduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                                             device=accelerator.device), "sum").tolist()
    return {"val_loss": totals[0] / max(totals[2], 1), "val_acc": totals[1] / max(totals[2], 1)}


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """One JSON line and one CSV row per epoch (rewritten whole, atomically, so a resume never duplicates)."""
    atomic_write(run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(
        "".join(json.dumps(h) + "\n" for h in history)))
    keys = list(dict.fromkeys(k for h in history for k in h))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
