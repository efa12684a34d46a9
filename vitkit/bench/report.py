"""Tables, z-score ranking and plots from bench rows; `vitkit bench report DIR` rebuilds them from rows alone.

Ranking (Battle of the Backbones): per setting s = (task, protocol), z(e, s) = (acc - mean_s) / std_s with the
population std (z = 0 when std = 0); an entry (backbone, chain) scores its mean z over the settings every
compared entry has. Settings some entries lack are listed, never imputed.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

ACC_PROTOCOLS = ("linear", "knn", "finetune", "fewshot", "retrieval", "robust")
COLUMN = {"linear": "linear", "knn": "knn", "finetune": "finetune", "fewshot": "fewshot (± std)",
          "retrieval": "retrieval MAP@R", "robust": "robust (clean)"}


def _latest_ok(rows: list[dict]) -> list[dict]:
    """One row per cell (backbone, chain, task, protocol, seed): the last `ok` row of its last key (a changed
    recipe gives the cell a new key; older rows are kept in the file but not reported), else its last error."""
    by_cell: dict[tuple, dict] = {}
    for row in rows:
        cell = (row["backbone"], row["chain"], row["task"], row["protocol"], row["seed"])
        old = by_cell.get(cell)
        if old is None or old["key"] != row["key"] or row["status"] == "ok" or old["status"] != "ok":
            by_cell[cell] = row
    return list(by_cell.values())


def over_seeds(rows: list[dict]) -> list[dict]:
    """The accuracy rows of one (backbone, chain, task, protocol) merged over their seeds, when every seed is `ok`:
    `acc` (and `clean_acc`, `ood_mean`, `acc_pre_post`, `acc_pre_compress`) the mean over seeds, `acc_std` the
    population std over seeds, `acc_runs` and `seeds` the values per seed. Other rows pass unchanged."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["backbone"], row["chain"], row["task"], row["protocol"])].append(row)
    out = []
    for group in groups.values():
        if len(group) == 1 or group[0]["protocol"] == "perf" or any(r["status"] != "ok" for r in group):
            out += group
            continue
        group = sorted(group, key=lambda r: r["seed"])
        merged = dict(group[0], seeds=[r["seed"] for r in group], acc_runs=[r["acc"] for r in group])
        for key in ("acc", "clean_acc", "ood_mean", "acc_pre_post", "acc_pre_compress"):
            values = [r.get(key) for r in group]
            if key in merged:  # a key a row lacks (post chains alone have acc_pre_post) stays absent
                merged[key] = None if None in values else sum(values) / len(values)
        mean = merged["acc"]
        merged["acc_std"] = math.sqrt(sum((v - mean) ** 2 for v in merged["acc_runs"]) / len(group))
        out.append(merged)
    return out


def zscores(rows: list[dict]) -> tuple[list[tuple[str, str, float, int]], list[tuple[str, str]]]:
    """[(backbone, chain, mean z, settings used)] best first, and the settings left out as incomplete."""
    scores: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for row in rows:
        if row["status"] == "ok" and row["protocol"] in ACC_PROTOCOLS:
            scores[(row["backbone"], row["chain"])].setdefault((row["task"], row["protocol"]), []).append(row["acc"])
    entries = {e: {s: sum(v) / len(v) for s, v in settings.items()} for e, settings in scores.items()}
    if not entries:
        return [], []
    all_settings = sorted({s for settings in entries.values() for s in settings})
    shared = [s for s in all_settings if all(s in settings for settings in entries.values())]
    z: dict[tuple, list[float]] = defaultdict(list)
    for setting in shared:
        values = [entries[e][setting] for e in entries]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for e in entries:
            z[e].append(0.0 if std == 0 else (entries[e][setting] - mean) / std)
    ranked = sorted(((e[0], e[1], sum(v) / len(v) if v else 0.0, len(v)) for e, v in z.items()),
                    key=lambda r: (-r[2], r[0], r[1]))
    return ranked, [s for s in all_settings if s not in shared]


def _fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _acc_text(row: dict) -> str:
    if row.get("clean_acc") is not None:  # the robust protocol: robust accuracy (clean accuracy, same images)
        return f"{row['acc']:.3f} ({row['clean_acc']:.3f})"
    return f"{row['acc']:.3f} ± {row['acc_std']:.3f}" if row.get("acc_std") is not None else f"{row['acc']:.3f}"


def _gmacs_text(perf: dict) -> str:
    if perf.get("gmacs") is None:
        return "-"
    if perf.get("flops_input_dependent"):
        return f"{perf['gmacs']:.4f} ({perf['gmacs_min']:.4f}–{perf['gmacs_max']:.4f})"
    return f"{perf['gmacs']:.4f}"


def markdown(rows: list[dict]) -> str:
    rows = over_seeds(_latest_ok(rows))
    perf = {(r["backbone"], r["chain"]): r for r in rows if r["protocol"] == "perf" and r["status"] == "ok"}
    lines = []
    protocols = [p for p in ACC_PROTOCOLS if any(r["protocol"] == p for r in rows)]
    quality = any(r["protocol"] == "quality" for r in rows)
    for task in sorted({r["task"] for r in rows if r["protocol"] != "perf"}):
        generated = next((r for r in rows if r["task"] == task and r.get("task_input")), None)
        lines += [f"## {task}", ""] + ([
            f"*Procedural* {generated['task_input']}: the input adapter takes them; the baseline and the other "
            f"chains take {generated['task_view']}.", ""] if generated else []) + [
                  "| backbone | chain | " + " | ".join(COLUMN[p] for p in protocols) + " | Δ finetune | params (M) "
                  "| trainable | adapter (KB) | GMACs (min–max) | img/s (×) | peak MiB | OOD mean |"
                  + (" locality | sim. overlap (AUROC) |" if quality else ""),
                  "|---|---|" + "---|" * len(protocols) + "---|---|---|---|---|---|---|---|" + "---|---|" * quality]
        entries: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in rows:
            if r["task"] == task:
                entries[(r["backbone"], r["chain"])][r["protocol"]] = r
        baseline_ft = {b: e.get("finetune", {}).get("acc") for (b, c), e in entries.items() if c == "baseline"}
        for (backbone, chain), cells in sorted(entries.items(), key=lambda kv: (kv[0][0], kv[0][1] != "baseline",
                                                                                   kv[0][1])):
            acc = {p: (_acc_text(cells[p]) if cells[p]["status"] == "ok" else cells[p]["status"]) if p in cells else None
                   for p in protocols}
            ft = cells.get("finetune", {})
            base = baseline_ft.get(backbone)
            delta = ft["acc"] - base if ft.get("status") == "ok" and base is not None else None
            p = perf.get((backbone, chain), {})
            any_cell = next(iter(cells.values()))
            ood = [c.get("ood_mean") for c in cells.values() if c.get("ood_mean") is not None]
            cols = [backbone, chain] + [a if isinstance(a, str) else _fmt(a) for a in acc.values()] + [
                _fmt(delta, "+.3f"), _fmt(any_cell.get("params"), ".2f", 1e-6),
                "-" if not ft.get("trainable_params") else f"{ft['trainable_params']:,} ({100 * ft['trainable_frac']:.1f}%)",
                _fmt(ft.get("adapter_bytes"), ".1f", 1 / 1024), _gmacs_text(p),
                "-" if not p else f"{p['throughput_ips']:.0f} ({p['speedup']:.2f}×)", _fmt(p.get("peak_mem_mib"), ".2f"),
                _fmt(max(ood) if ood else None)]
            if quality:
                cols += _quality_text(cells.get("quality"))
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    seeds = sorted({len(r["seeds"]) for r in rows if "seeds" in r})
    if seeds:
        lines += [f"Accuracies of cells run with {' or '.join(map(str, seeds))} seeds: the mean ± the population std "
                  "over seeds (`acc_runs` in results.json); Δ finetune compares the means.", ""]
    if quality:
        lines += ["locality: mean attention distance in patches over heads and blocks (ConViT's non-locality; "
                  "'n/a': no global attention map). sim. overlap: histogram overlap of same- vs different-object "
                  "patch cosines on 2x2 mosaics of evaluation images (lower separates objects better), AUROC in "
                  "brackets.", ""]
    lines += _robust_notes(rows)
    ranked, incomplete = zscores(rows)
    if ranked:
        lines += ["## Ranking (mean z-score over shared settings)", "", "| rank | backbone | chain | mean z | settings |",
                  "|---|---|---|---|---|"]
        lines += [f"| {i} | {b} | {c} | {z:+.3f} | {n} |" for i, (b, c, z, n) in enumerate(ranked, 1)]
        if incomplete:
            lines += ["", "Settings left out (not every entry has them): "
                      + ", ".join(f"{t}/{p}" for t, p in incomplete)]
        lines.append("")
    lines += _failed_cells(rows, "## Failed cells", width=200)
    lines += _skipped_cells(rows, "## Skipped cells", width=200)
    return "\n".join(lines)


def _quality_text(row) -> list[str]:
    """The locality and similarity-overlap cells of a `quality` row."""
    if row is None or row["status"] != "ok":
        return ["-" if row is None else row["status"]] * 2
    loc = "n/a" if row.get("locality") is None else f"{row['locality']:.2f}"
    over = "n/a" if row.get("overlap") is None else f"{row['overlap']:.3f} ({row['overlap_auroc']:.3f})"
    return [loc, over]


def _robust_notes(rows: list[dict]) -> list[str]:
    """One line per attack setting of the `robust` rows: what `robust (clean)` measured."""
    settings = sorted({json.dumps(r["robust"]["config"] | {"method": r["robust"]["method"], "n": r.get("n_attacked")},
                                  sort_keys=True) for r in rows if r["protocol"] == "robust" and r.get("robust")})
    lines = []
    for text in settings:
        s = json.loads(text)
        extra = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("method", "eps", "norm", "n"))
        lines.append(f"robust (clean): accuracy under {s['method']} ({s.get('norm', '-')}, ε = {s['eps']:.6g} = "
                     f"{255 * s['eps']:.3g}/255 in pixel units; {extra}) on {s['n']} evaluation images, and their "
                     "clean accuracy in brackets.")
    return lines + [""] if lines else []


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Accuracy vs throughput (Pareto front) and accuracy vs trainable parameters, one panel per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in over_seeds(_latest_ok(rows)) if r["status"] == "ok"]
    perf = {(r["backbone"], r["chain"]): r for r in rows if r["protocol"] == "perf"}
    tasks = sorted({r["task"] for r in rows if r["protocol"] != "perf"})
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("pareto_acc_throughput", "acc_vs_trainable"):
        fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            points = []
            for r in rows:
                if r["task"] != task or r["protocol"] not in ACC_PROTOCOLS:
                    continue
                if kind == "pareto_acc_throughput" and (r["backbone"], r["chain"]) in perf:
                    points.append((perf[(r["backbone"], r["chain"])]["throughput_ips"], r["acc"], r))
                elif kind == "acc_vs_trainable" and r["protocol"] == "finetune":
                    points.append((max(r["trainable_params"], 1), r["acc"], r))
            for x, y, r in points:
                marker = {"linear": "o", "knn": "s", "finetune": "^", "fewshot": "v", "retrieval": "D",
                          "robust": "x"}[r["protocol"]]
                ax.scatter(x, y, marker=marker)
                ax.annotate(f"{r['backbone']}/{r['chain']}/{r['protocol']}", (x, y), fontsize=6)
            if kind == "pareto_acc_throughput" and points:
                front, best = [], -1.0
                for x, y, _ in sorted(points, key=lambda p: (-p[0], -p[1])):
                    if y > best:
                        front.append((x, y))
                        best = y
                ax.plot(*zip(*sorted(front)), "k--", lw=1, label="Pareto front")
                ax.legend(fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("inference images/s (log)" if kind.startswith("pareto") else "trainable parameters (log)")
            ax.set_ylabel("top-1 accuracy")
            ax.set_title(task)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write(out: Path, rows: list[dict]) -> None:
    """results.md, results.json and plots/ from rows (deterministic: the same rows give the same files)."""
    (out / "results.md").write_text(markdown(rows))
    (out / "results.json").write_text(json.dumps(_latest_ok(rows), indent=1, sort_keys=True, default=str))
    plot(rows, out / "plots")


# ---------------------------------------------------------------------------------------------- RESULTS.md
SECTION_END = "<!-- end of generated bench section -->"


def _section_start(folder) -> str:
    return f"<!-- generated by `vitkit bench report {folder} --into FILE` from {folder}/rows.jsonl: edit the rows' recipe, not this text -->"


def _range(values, spec: str, scale: float = 1.0, unit: str = "") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = format(min(values) * scale, spec), format(max(values) * scale, spec)
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def _unique(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def results_section(rows: list[dict], folder) -> str:
    """The Markdown section RESULTS.md shows for one bench run folder, every figure computed from its rows."""
    folder = str(folder)
    rows = _latest_ok(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    acc = [r for r in ok if r["protocol"] != "perf"]
    perf = {(r["backbone"], r["chain"]): r for r in ok if r["protocol"] == "perf"}
    backbones = _unique(r["backbone"] for r in rows)
    chains = _unique(r["chain"] for r in rows if r["chain"] != "baseline")
    tasks = _unique(r["task"] for r in rows if r["protocol"] != "perf")
    protocols = [p for p in ACC_PROTOCOLS if any(r["protocol"] == p for r in rows)]
    fps = _unique(json.dumps({k: v for k, v in (r.get("fingerprint") or {}).items() if k != "vitkit"}, sort_keys=True)
                  for r in ok)
    commits = _unique(r.get("git_commit") for r in rows if r.get("git_commit"))
    n_err = sum(r["status"] == "error" for r in rows)
    cell_s = sum(r.get("seconds", 0.0) for r in rows)
    span = max((r["started"] + r.get("seconds", 0.0) for r in rows), default=0) - min((r["started"] for r in rows),
                                                                                      default=0)
    lines = [_section_start(folder), "",
             f"## `vitkit bench`: {len(backbones)} backbones x {len(chains)} chains x {' / '.join(protocols)}"
             f" on {', '.join(tasks)}", "",
             f"Rows: `{folder}/rows.jsonl`, {len(rows)} cells ({len(rows) - len(perf) - sum(r['status'] == 'error' and r['protocol'] == 'perf' for r in rows)} accuracy, "
             f"{sum(r['protocol'] == 'perf' for r in rows)} perf), {n_err} failed"
             f"{_skipped_count(rows)}; full table: `{folder}/results.md`, "
             f"plots: `{folder}/plots/`. Cell time {cell_s / 60:.1f} min in all; first cell start to last cell end "
             f"{span / 60:.1f} min.", ""]
    for fp in fps:
        f = json.loads(fp)
        lines.append(f"Machine (from the rows): {f.get('device')} `{f.get('device_name')}`, {f.get('threads')} torch "
                     f"threads, torch {f.get('torch')}, timm {f.get('timm')}, Python {f.get('python')}.")
    if commits:
        lines.append(f"vitkit commit: {', '.join(f'`{c}`' for c in commits)}.")
    lines.append("")
    lines.append("Backbones (weights SHA-256): " + "; ".join(
        f"{b} ({next((r.get('weights_sha256') for r in rows if r['backbone'] == b and r.get('weights_sha256')), None) or 'random init'})"[:90]
        for b in backbones) + ".")
    ft = [r for r in acc if r["protocol"] == "finetune"]
    for task in tasks:
        sizes = _unique((r.get("n_train"), r.get("n_eval")) for r in acc if r["task"] == task)
        generated = next((r["task_input"] for r in acc if r["task"] == task and r.get("task_input")), None)
        what = f"samples (*procedural* {generated})" if generated else "images"
        lines.append(f"Task `{task}`: " + ", ".join(f"{a} train / {b} evaluation {what}" for a, b in sizes) + ".")
    if ft:
        budgets = _unique(json.dumps({k: v for k, v in (r.get("settings") or {}).get("budget", {}).items()
                                      if k in ("epochs", "batch_size", "val")}, sort_keys=True) for r in ft)
        for b in budgets:
            b = json.loads(b)
            mine = [r for r in ft if all((r.get("settings") or {}).get("budget", {}).get(k) == v for k, v in b.items())]
            grids = {}
            for r in mine:
                grid = tuple((r.get("settings") or {}).get("budget", {}).get("grid") or ())
                kind = "full fine-tuning" if r["chain"] == "baseline" or "acc_pre_post" in r else "adapters"
                kinds = grids.setdefault(grid, [])
                if kind not in kinds:
                    kinds.append(kind)
            tuned = "; ".join(f"{list(g)} for {' and '.join(kinds)}" for g, kinds in grids.items() if g)
            lrs = _unique(_lr(r) for r in mine if not r.get("tune"))
            lines.append(f"Fine-tune budget: {b.get('epochs')} epochs, batch {b.get('batch_size')}"
                         + (f"; learning rate tuned on a validation split ({100 * b['val']:.0f} % of each class's "
                            f"train images) over {tuned}, then retrained on all train images" if tuned else "")
                         + (f"; untuned: {', '.join(lrs)}" if lrs else "") + ".")
    lines.append("")
    for task in tasks:
        lines += [f"### {task}: selected rows", "",
                  "| " + " | ".join(["backbone", *(p for p in ("linear", "knn") if p in protocols), "full fine-tune (lr)",
                                     "best PEFT fine-tune (trainable, lr)", "best post-training chain (Δ vs full)"])
                  + " |",
                  "|---|" + "---|" * len([p for p in ("linear", "knn") if p in protocols]) + "---|---|---|"]
        for b in backbones:
            mine = [r for r in over_seeds(acc) if r["backbone"] == b and r["task"] == task]
            cols = [b]
            for p in ("linear", "knn"):
                if p in protocols:
                    r = next((r for r in mine if r["protocol"] == p and r["chain"] == "baseline"), None)
                    cols.append("-" if r is None else _acc_text(r))
            full = next((r for r in mine if r["protocol"] == "finetune" and r["chain"] == "baseline"), None)
            cols.append("-" if full is None else f"{_acc_text(full)} ({_lr(full)})")
            peft = [r for r in mine if r["protocol"] == "finetune" and r["chain"] != "baseline"
                    and "acc_pre_post" not in r]
            best = max(peft, key=lambda r: (r["acc"], r["chain"]), default=None)
            cols.append("-" if best is None else
                        f"{best['chain']} {_acc_text(best)} ({best['trainable_params']:,}, {_lr(best)})")
            post = [r for r in mine if r["protocol"] == "finetune" and "acc_pre_post" in r]
            bp = max(post, key=lambda r: (r["acc"], r["chain"]), default=None)
            cols.append("-" if bp is None else f"{bp['chain']} {_acc_text(bp)} ({bp['acc'] - bp['acc_pre_post']:+.3f})")
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    tuned = [r for r in ft if r.get("tune")]
    if tuned:
        grid = _unique(k for r in tuned for k in r["tune"])
        lines += ["### Learning rates chosen on the validation split", "",
                  "| backbone | chain | " + " | ".join(f"val acc @ {g}" for g in grid) + " | chosen | test acc |",
                  "|---|---|" + "---|" * len(grid) + "---|---|"]
        for r in sorted(tuned, key=lambda r: (backbones.index(r["backbone"]), r["chain"] != "baseline", r["chain"])):
            if "acc_pre_post" in r:
                continue
            lines.append(f"| {r['backbone']} | {r['chain']} | "
                         + " | ".join(_fmt(r["tune"].get(g)) for g in grid) + f" | {r['lr']:g} | {r['acc']:.3f} |")
        lines.append("")
    if perf:
        sizes = any("model_bytes" in r for r in perf.values())  # rows from before the compression columns: none
        lines += ["### Cost against the baseline of the same backbone, measured in the same perf cell", "",
                  "| backbone | chain | GMACs / image (min–max) | FLOPs vs baseline | img/s | throughput vs baseline "
                  "| peak MiB |" + (" model MB | sparsity |" if sizes else ""), "|---|---|---|---|---|---|---|"
                  + ("---|---|" if sizes else "")]
        for (b, c), r in sorted(perf.items(), key=lambda kv: (backbones.index(kv[0][0]), kv[0][1] != "baseline",
                                                               kv[0][1])):
            lines.append(f"| {b} | {c} | {_gmacs_text(r)} | {100 * (r['flops_ratio'] - 1):+.1f} % | "
                         f"{r['throughput_ips']:.0f} | {r['speedup']:.2f}× | {r['peak_mem_mib']:.2f} |"
                         + (f" {_fmt(r.get('model_bytes'), '.2f', 1e-6)} | {_fmt(r.get('sparsity'), '.3f')} |"
                            if sizes else ""))
        lines.append("")
        # a summary per kind of chain, computed: which chains change FLOPs, by how much, at what speed
        cut = [r for (b, c), r in perf.items() if c != "baseline" and r["flops_ratio"] < 1 - 1e-9]
        if cut:
            names = _unique(c for (b, c), r in perf.items() if c != "baseline" and r["flops_ratio"] < 1 - 1e-9)
            lines.append(f"Chains that cut FLOPs ({', '.join(names)}): {_range([1 - r['flops_ratio'] for r in cut], '.0f', 100)} % "
                         f"fewer FLOPs at {_range([r['speedup'] for r in cut], '.2f')}× the baseline's images/s "
                         f"(batch {_range([r.get('batch') for r in cut], '.0f')}, {len(cut)} perf cells).")
        selves = [r["speedup"] for (b, c), r in perf.items() if c == "baseline"]
        if selves:
            lines.append(f"Timing noise: each baseline timed against itself reads {_range(selves, '.2f')}× "
                         "(compare throughput ratios against that spread).")
        dep = [r for r in perf.values() if r.get("flops_input_dependent")]
        if dep:
            lines.append("Input-dependent FLOPs (" + ", ".join(_unique(r["chain"] for r in dep)) + "): mean over the "
                         f"first {_range([r['flops_images'] for r in dep], '.0f')} evaluation images, minimum–maximum in "
                         "brackets.")
        lines.append("")
    lines += _failed_cells(rows, "### Failed cells", width=160)
    lines += _skipped_cells(rows, "### Skipped cells", width=160)
    lines += ["Definitions: accuracy is top-1 on the evaluation images (fewshot: mean ± std over draws; retrieval: "
              "MAP@R of evaluation queries against the train gallery). *Trainable* counts the parameters `vk.fit` "
              "trained; *adapter* is the bytes of those tensors as one safetensors file (what a task adds to its "
              "backbone; the whole model for full fine-tuning). *Post-training chains* are applied to the "
              "fine-tuned baseline without retraining; Δ is against that model before the chain. GMACs are counted "
              "with eager attention on evaluation images; images/s and peak memory (CPU: the profiler's per-op "
              "allocations of one forward, on top of the weights) are measured in the same perf cell, baseline "
              "and chain alternating.", "", SECTION_END]
    return "\n".join(lines) + "\n"


def _lr(row: dict) -> str:
    lr = row.get("lr")
    source = row.get("lr_source", "recipe")
    return f"lr {'default' if lr is None else format(lr, 'g')}{', tuned' if source == 'tuned' else ''}"


def splice_section(path: Path, folder, rows: list[dict]) -> None:
    """Replace this folder's generated section of `path` (or append it), leaving every other section alone."""
    text = path.read_text() if path.exists() else ""
    start = _section_start(folder)
    section = results_section(rows, folder)
    if start in text:
        head, rest = text.split(start, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n") if SECTION_END in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def _failed_cells(rows: list[dict], heading: str, width: int) -> list[str]:
    """A table of the error rows (each message cut at `width` characters), or nothing when every cell ran."""
    errors = [r for r in rows if r["status"] == "error"]
    if not errors:
        return []
    return [heading, "", "| backbone | chain | task | protocol | error |", "|---|---|---|---|---|",
            *(f"| {r['backbone']} | {r['chain']} | {r['task']} | {r['protocol']} | "
              f"{r['error'].replace('|', '/')[:width]} |" for r in errors), ""]


def _skipped_count(rows: list[dict]) -> str:
    n = sum(r["status"] == "skipped" for r in rows)
    return f", {n} skipped (a ViT-only method on another backbone)" if n else ""


def _skipped_cells(rows: list[dict], heading: str, width: int) -> list[str]:
    """One line per (backbone, chain) whose cells were skipped (a ViT-only method on another backbone), with
    the reason, or nothing."""
    seen: dict[tuple, str] = {}
    for r in rows:
        if r["status"] == "skipped":
            seen.setdefault((r["backbone"], r["chain"]), r["skipped"])
    if not seen:
        return []
    return [heading, "", "| backbone | chain | why |", "|---|---|---|",
            *(f"| {b} | {c} | {why.replace('|', '/')[:width]} |" for (b, c), why in seen.items()), ""]
