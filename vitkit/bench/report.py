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

ACC_PROTOCOLS = ("linear", "knn", "finetune")


def _latest_ok(rows: list[dict]) -> list[dict]:
    """The last `ok` row per key, plus error rows of keys that never succeeded."""
    by_key: dict[str, dict] = {}
    for row in rows:
        if row["status"] == "ok" or by_key.get(row["key"], {}).get("status") != "ok":
            by_key[row["key"]] = row
    return list(by_key.values())


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


def markdown(rows: list[dict]) -> str:
    rows = _latest_ok(rows)
    perf = {(r["backbone"], r["chain"]): r for r in rows if r["protocol"] == "perf" and r["status"] == "ok"}
    lines = []
    for task in sorted({r["task"] for r in rows if r["protocol"] != "perf"}):
        lines += [f"## {task}", "",
                  "| backbone | chain | linear | knn | finetune | Δ finetune | params (M) | trainable | adapter (KB) "
                  "| GMACs | img/s (×) | peak MiB | OOD mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        entries: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in rows:
            if r["task"] == task:
                entries[(r["backbone"], r["chain"])][r["protocol"]] = r
        baseline_ft = {b: e.get("finetune", {}).get("acc") for (b, c), e in entries.items() if c == "baseline"}
        for (backbone, chain), cells in sorted(entries.items(), key=lambda kv: (kv[0][0], kv[0][1] != "baseline",
                                                                                   kv[0][1])):
            acc = {p: (cells[p]["acc"] if cells[p]["status"] == "ok" else "error") if p in cells else None
                   for p in ACC_PROTOCOLS}
            ft = cells.get("finetune", {})
            base = baseline_ft.get(backbone)
            delta = ft["acc"] - base if ft.get("status") == "ok" and base is not None else None
            p = perf.get((backbone, chain), {})
            any_cell = next(iter(cells.values()))
            ood = [c.get("ood_mean") for c in cells.values() if c.get("ood_mean") is not None]
            cols = [backbone, chain] + [a if isinstance(a, str) else _fmt(a) for a in acc.values()] + [
                _fmt(delta, "+.3f"), _fmt(any_cell.get("params"), ".2f", 1e-6),
                "-" if not ft.get("trainable_params") else f"{ft['trainable_params']:,} ({100 * ft['trainable_frac']:.1f}%)",
                _fmt(ft.get("adapter_bytes"), ".1f", 1 / 1024), _fmt(p.get("gmacs"), ".4f"),
                "-" if not p else f"{p['throughput_ips']:.0f} ({p['speedup']:.2f}×)", _fmt(p.get("peak_mem_mib"), ".2f"),
                _fmt(max(ood) if ood else None)]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    ranked, incomplete = zscores(rows)
    if ranked:
        lines += ["## Ranking (mean z-score over shared settings)", "", "| rank | backbone | chain | mean z | settings |",
                  "|---|---|---|---|---|"]
        lines += [f"| {i} | {b} | {c} | {z:+.3f} | {n} |" for i, (b, c, z, n) in enumerate(ranked, 1)]
        if incomplete:
            lines += ["", "Settings left out (not every entry has them): "
                      + ", ".join(f"{t}/{p}" for t, p in incomplete)]
        lines.append("")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["## Failed cells", "", "| backbone | chain | task | protocol | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['chain']} | {r['task']} | {r['protocol']} | "
                  f"{r['error'].replace('|', '/')[:200]} |" for r in errors]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Accuracy vs throughput (Pareto front) and accuracy vs trainable parameters, one panel per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in _latest_ok(rows) if r["status"] == "ok"]
    perf = {(r["backbone"], r["chain"]): r for r in rows if r["protocol"] == "perf"}
    tasks = sorted({r["task"] for r in rows if r["protocol"] != "perf"})
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("pareto_acc_throughput", "acc_vs_trainable"):
        fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            points = []
            for r in rows:
                if r["task"] != task or r["protocol"] == "perf":
                    continue
                if kind == "pareto_acc_throughput" and (r["backbone"], r["chain"]) in perf:
                    points.append((perf[(r["backbone"], r["chain"])]["throughput_ips"], r["acc"], r))
                elif kind == "acc_vs_trainable" and r["protocol"] == "finetune":
                    points.append((max(r["trainable_params"], 1), r["acc"], r))
            for x, y, r in points:
                marker = {"linear": "o", "knn": "s", "finetune": "^"}[r["protocol"]]
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
