"""`vk.evaluate(model, data, protocol=...)`: the standard ways to measure a (pretrained or adapted) ViT.

Protocols:
    finetuned   the model's own head.
    linear      a linear probe on frozen features: scikit-learn's multinomial `LogisticRegression` (L-BFGS) on
                standardised features of `train`, scored on `data`.
    knn         cosine k-NN on L2-normalised features, k=20, votes weighted by exp(similarity / 0.07) as in
                DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers").
    fewshot     n-shot nearest prototype (mean of the n normalised support features per class, cosine), repeated
                over several seeded support draws from `train`; mean and std of top-1.
    dense       a dense head's per-patch predictions (`vk.adapt(model, "dense")`): mIoU, per-class IoU and pixel
                accuracy, or MSE (`vitkit.adapt.dense.evaluate`).
    retrieval   deep-metric-learning retrieval by cosine similarity: every image of `data` queries the others
                (leave-one-out; usually classes held out from training), or the `train` gallery when given;
                Recall@K (a same-class item among the K nearest) and MAP@R (Musgrave et al., 2020, "A Metric
                Learning Reality Check"). Features: the head's embedding when the head has one
                (`model.head.embed`, dml-proxies), else the pooled pre-logits.

Features are `forward_head(forward_features(x), pre_logits=True)`: the pooled pre-logits of whatever methods
are applied (prompts, adapters, token merging run in `forward_features`). Every protocol returns top-1,
top-5, per-class accuracy and the confusion matrix (rows: true class, columns: predicted), except retrieval
(`recall@K`, `map@r`, `n`; `top1` is Recall@1).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

_log = logging.getLogger("vitkit")

PROTOCOLS = ("finetuned", "linear", "knn", "fewshot", "retrieval", "dense")


@torch.inference_mode()
def features(model: nn.Module, dataset, *, batch_size: int = 256, logits: bool = False,
             num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features or logits `(N, D)`, labels `(N,)`) of a dataset, in eval mode (the mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, targets in loader:
        x = model.forward_features(images.to(device))
        outs.append(model.forward_head(x, pre_logits=not logits).float().cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def scores_report(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, classes=None) -> dict:
    """top-1, top-5, per-class accuracy and confusion matrix from class scores `(N, C)`."""
    pred = scores.argmax(1)
    k = min(5, scores.shape[1])
    top5 = (scores.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1)).tolist()
    out = {"top1": (pred == labels).float().mean().item(), "top5": top5, "per_class": per_class,
           "confusion": confusion.tolist(), "n": len(labels)}
    if classes is not None:
        out["classes"] = list(classes)
    return out


def knn_scores(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores `(N_test, C)`: sum over the k most cosine-similar train samples of exp(sim / T)."""
    train_f = nn.functional.normalize(train_f, dim=1)
    test_f = nn.functional.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    out = []
    for start in range(0, len(test_f), chunk):
        sim = test_f[start:start + chunk] @ train_f.T  # (n, N_train)
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def linear_probe_scores(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                        C: float = 1.0, max_iter: int = 1000) -> torch.Tensor:
    """Class probabilities `(N_test, C)` of a logistic-regression probe fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f.numpy())
    probe = LogisticRegression(C=C, max_iter=max_iter)
    probe.fit(scaler.transform(train_f.numpy()), train_y.numpy())
    proba = probe.predict_proba(scaler.transform(test_f.numpy()))
    scores = np.zeros((len(test_f), num_classes), dtype=np.float64)
    scores[:, probe.classes_] = proba  # classes absent from train keep score 0
    return torch.from_numpy(scores)


def fewshot_scores(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                   shots: int, seed: int) -> torch.Tensor:
    """Cosine similarity `(N_test, C)` to class prototypes built from `shots` seeded support samples per class."""
    rng = np.random.default_rng(seed)
    train_f = nn.functional.normalize(train_f, dim=1)
    protos = torch.zeros(num_classes, train_f.shape[1])
    for c in range(num_classes):
        pool = (train_y == c).nonzero().flatten().numpy()
        if len(pool) < shots:
            raise ValueError(f"fewshot: class {c} has {len(pool)} train images, fewer than shots={shots}")
        protos[c] = train_f[rng.choice(pool, shots, replace=False)].mean(0)
    return nn.functional.normalize(test_f, dim=1) @ nn.functional.normalize(protos, dim=1).T


def evaluate(model: nn.Module, data, protocol: str = "finetuned", *, train=None, k: int = 20,
             temperature: float = 0.07, shots: int = 5, seeds: int = 5, C: float = 1.0,
             batch_size: int = 256, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Measure `model` on `data` with a standard protocol.

    Args:
        model: a timm ViT (methods may be applied).
        data: the evaluation dataset, yielding `(image tensor, label)`.
        protocol: `finetuned`, `linear`, `knn` or `fewshot` (see the module docstring).
        train: labelled reference data for `linear` (probe fit), `knn` (the memory bank), `fewshot` (supports).
        k, temperature: k-NN neighbours and vote temperature (DINO: 20, 0.07).
        shots, seeds: few-shot support size per class and number of seeded draws.
        C: inverse L2 strength of the linear probe.
        ks: the K of Recall@K (retrieval).

    Returns:
        dict with `protocol`, `top1`, `top5`, `per_class`, `confusion`, `n` (and for fewshot `top1_std`,
        `top1_runs`, `shots`; its confusion matrix sums over the draws).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: unknown protocol `{protocol}`; protocols: {', '.join(PROTOCOLS)}")
    if protocol == "dense" or (protocol == "finetuned" and hasattr(model, "dense_head")):
        from vitkit.adapt.dense import evaluate as dense_evaluate  # a dense model's own head is per patch

        return dense_evaluate(model, data, batch_size=batch_size)
    classes = getattr(data, "classes", None)
    if protocol == "finetuned":
        scores, labels = features(model, data, batch_size=batch_size, logits=True)
        return {"protocol": protocol, **scores_report(scores, labels, scores.shape[1], classes)}
    if protocol == "retrieval":
        return retrieval(model, data, train=train, ks=ks, batch_size=batch_size)
    if train is None:
        raise ValueError(f"evaluate: protocol `{protocol}` needs labelled reference data: pass train=<dataset>")
    train_f, train_y = features(model, train, batch_size=batch_size)
    test_f, labels = features(model, data, batch_size=batch_size)
    num_classes = int(max(train_y.max(), labels.max())) + 1
    if classes is not None:
        num_classes = max(num_classes, len(classes))
    if protocol == "knn":
        scores = knn_scores(train_f, train_y, test_f, num_classes, k=k, temperature=temperature)
        return {"protocol": protocol, "k": k, "temperature": temperature,
                **scores_report(scores, labels, num_classes, classes)}
    if protocol == "linear":
        scores = linear_probe_scores(train_f, train_y, test_f, num_classes, C=C)
        return {"protocol": protocol, "C": C, **scores_report(scores, labels, num_classes, classes)}
    runs = [scores_report(fewshot_scores(train_f, train_y, test_f, num_classes, shots, seed), labels, num_classes)
            for seed in range(seeds)]
    top1 = np.array([r["top1"] for r in runs])
    confusion = np.sum([np.array(r["confusion"]) for r in runs], axis=0)
    per_class = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
    out = {"protocol": protocol, "shots": shots, "seeds": seeds, "top1": float(top1.mean()),
           "top1_std": float(top1.std()), "top1_runs": top1.tolist(),
           "top5": float(np.mean([r["top5"] for r in runs])), "per_class": per_class,
           "confusion": confusion.tolist(), "n": len(labels)}
    if classes is not None:
        out["classes"] = list(classes)
    return out


def retrieval(model: nn.Module, data, *, train=None, ks=(1, 2, 4, 8), batch_size: int = 256) -> dict:
    """Recall@K and MAP@R of `data` querying itself (leave-one-out) or the `train` gallery."""
    from vitkit.bench.run import retrieval_scores

    def embed(dataset):
        f, y = features(model, dataset, batch_size=batch_size)
        head_embed = getattr(getattr(model, "head", None), "embed", None)
        if isinstance(head_embed, nn.Module):
            with torch.inference_mode():
                f = head_embed(f.to(next(head_embed.parameters()).device)).float().cpu()
        return f, y

    query_f, query_y = embed(data)
    if len(query_y) < 2:
        raise ValueError(f"evaluate: retrieval needs at least 2 images, got {len(query_y)}")
    gallery_f, gallery_y = embed(train) if train is not None else (query_f, query_y)
    scores = retrieval_scores(gallery_f, gallery_y, query_f, query_y, ks=tuple(ks), exclude_self=train is None)
    return {"protocol": "retrieval", "gallery": "train" if train is not None else "leave-one-out", **scores,
            "top1": scores[f"recall@{ks[0]}"], "n": len(query_y)}


def format_report(result: dict) -> str:
    """One human line: protocol, top-1 (± std), top-5, n (retrieval: Recall@K and MAP@R)."""
    if result["protocol"] == "retrieval":
        recalls = "  ".join(f"R@{k.split('@')[1]} {v:.4f}" for k, v in result.items() if k.startswith("recall@"))
        return f"retrieval: {recalls}  MAP@R {result['map@r']:.4f}  (n={result['n']})"
    std = f" ± {result['top1_std']:.4f}" if "top1_std" in result else ""
    return (f"{result['protocol']}: top-1 {result['top1']:.4f}{std}  top-5 {result['top5']:.4f}  "
            f"(n={result['n']})")
