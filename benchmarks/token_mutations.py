"""Hand-listed mutations of the token methods: each one-line change must make a token test fail.

mutmut (`[tool.mutmut]` in pyproject.toml) mutates `vitkit/tokens/*_algo.py` mechanically; the mutations an
issue names (ToMe metric from queries, ATS value norm from q, ...) live partly in the integration files and are
semantic, so they are listed here. Each is applied to a scratch copy of the repository (never to the working
tree), the method's tests run with `-x`, and the mutation must be killed (a test fails).

    OMP_NUM_THREADS=1 python benchmarks/token_mutations.py [--oracle] [name-substring ...]

`--oracle` runs only the `test_*_oracle.py` files, to show the oracle alone kills each mutation.

Results: benchmarks/results/mutation.md.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T = "tests/tokens/"
TOME = [T + "test_tome_algo.py", T + "test_tome.py", T + "test_tome_oracle.py"]
EVIT = [T + "test_evit.py", T + "test_evit_oracle.py"]
ATS = [T + "test_ats.py", T + "test_ats_oracle.py"]
GTP = [T + "test_gtp.py", T + "test_gtp_oracle.py"]

# (name, file, old text, new text, tests)
MUTATIONS = [
    ("tome: metric from queries", "vitkit/tokens/tome.py", '{"k_norm": "tome.k"}', '{"q_norm": "tome.k"}', TOME),
    ("tome: metric from head 0", "vitkit/tokens/tome.py", "bipartite_soft_matching(k.mean(1),",
     "bipartite_soft_matching(k[:, 0],", TOME),
    ("tome: no proportional attention", "vitkit/tokens/tome.py", "if cfg.prop_attn:", "if False:", TOME),
    ("tome: merge unweighted by size", "vitkit/tokens/tome_algo.py",
     "merged = (xb * sb.to(x.dtype)).scatter_add_(1, dst.expand(-1, -1, C), _take(xa, match.src) * s_src.to(x.dtype))",
     "merged = xb.scatter_add(1, dst.expand(-1, -1, C), _take(xa, match.src))", TOME),
    ("tome: split ignores prefix parity", "vitkit/tokens/tome_algo.py", "a0 = num_prefix + num_prefix % 2",
     "a0 = num_prefix", TOME),
    ("tome: metric not normalised", "vitkit/tokens/tome_algo.py",
     "m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)", "m = metric", TOME),
    ("evit: fused token unweighted", "vitkit/tokens/evit_algo.py",
     "expand(-1, -1, C)) * w).sum(1, keepdim=True)", "expand(-1, -1, C)) * 1).sum(1, keepdim=True)", EVIT),
    ("evit: fused token renormalised", "vitkit/tokens/evit_algo.py", "w = scores.gather(1, dropped).unsqueeze(-1)",
     "w = scores.gather(1, dropped).softmax(-1).unsqueeze(-1)", EVIT),
    ("evit: class attention of head 0", "vitkit/tokens/evit_algo.py", "return logits.softmax(dim=-1).mean(dim=1)",
     "return logits.softmax(dim=-1)[:, 0]", EVIT),
    ("evit: keep the least attended", "vitkit/tokens/evit_algo.py",
     "order = a.argsort(dim=-1, descending=True, stable=True)", "order = a.argsort(dim=-1, stable=True)", EVIT),
    ("evit: floor instead of ceil", "vitkit/tokens/evit_algo.py", "math.ceil(keep_rate * num_candidates - 1e-9)",
     "math.floor(keep_rate * num_candidates)", EVIT),
    ("ats: value norm from q", "vitkit/tokens/ats.py", "v = qkv[..., -C:]", "v = qkv[..., :C]", ATS),
    ("ats: value norm dropped", "vitkit/tokens/ats_algo.py", "s = cls_attn_sum * v.norm(dim=-1)",
     "s = cls_attn_sum * 1.0", ATS),
    ("ats: value norm per head 0", "vitkit/tokens/ats.py", "v = qkv[..., -C:]", "v = qkv[..., -C:-C + C // 4]", ATS),
    ("ats: y from 0 instead of min c > 0", "vitkit/tokens/ats_algo.py", "* (1 - start) + start", "* 1.0", ATS),
    ("ats: cdf not sorted", "vitkit/tokens/ats_algo.py", "sorted_scores, order = scores.sort(stable=True)",
     "sorted_scores, order = scores, torch.arange(n, device=scores.device)", ATS),
    ("gtp: propagation removed", "vitkit/tokens/gtp_algo.py",
     "return x_keep + wx @ x_prop, s_keep + (alpha * w) @ s_prop", "return x_keep, s_keep", GTP),
    ("gtp: features not propagated", "vitkit/tokens/gtp_algo.py", "return x_keep + wx @ x_prop,", "return x_keep,",
     GTP),
    ("gtp: ranked by row sums", "vitkit/tokens/gtp_algo.py", "received = attn.sum(dim=-2)",
     "received = attn.sum(dim=-1)", GTP),
    ("gtp: self attention of head mean", "vitkit/tokens/gtp_algo.py",
     "diag = attn.diagonal(dim1=-2, dim2=-1).amax(dim=1)", "diag = attn.diagonal(dim1=-2, dim2=-1).mean(dim=1)",
     GTP),
    ("gtp: highest ranked propagate", "vitkit/tokens/gtp_algo.py", "order = scores.argsort(dim=-1, stable=True)",
     "order = scores.argsort(dim=-1, descending=True, stable=True)", GTP),
    ("gtp: graph not normalised", "vitkit/tokens/gtp_algo.py", "return d.unsqueeze(-1) * graph * d.unsqueeze(-2)",
     "return graph", GTP),
    ("gtp: sizes not propagated", "vitkit/tokens/gtp_algo.py", "s_keep + (alpha * w) @ s_prop", "s_keep", GTP),
    ("gtp: no token scale", "vitkit/tokens/gtp.py", "if cfg.token_scale:", "if False:", GTP),
]


def main(args: list[str]) -> int:
    oracle_only = "--oracle" in args
    selected = [a for a in args if a != "--oracle"]
    survivors, env, tried = [], {**os.environ, "OMP_NUM_THREADS": "1"}, 0
    for name, path, old, new, tests in MUTATIONS:
        if selected and not any(s in name for s in selected):
            continue
        tests = [t for t in tests if (ROOT / t).exists() and (t.endswith("_oracle.py") or not oracle_only)]
        tried += 1
        with tempfile.TemporaryDirectory() as tmp:
            for part in ("vitkit", "tests", "pyproject.toml"):
                src = ROOT / part
                (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / part)
            target = Path(tmp) / path
            text = target.read_text()
            if text.count(old) != 1:
                print(f"STALE    {name}: {old!r} found {text.count(old)} times in {path}")
                survivors.append(name)
                continue
            target.write_text(text.replace(old, new))
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p",
                                  "no:cacheprovider", *tests], cwd=tmp, env={**env, "PYTHONPATH": tmp},
                                 capture_output=True, text=True)
            failed = [ln.split(" - ")[0] for ln in run.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
            if run.returncode == 0:
                survivors.append(name)
                print(f"SURVIVED {name}", flush=True)
            else:
                print(f"killed   {name}: {failed[0] if failed else run.stdout.strip().splitlines()[-1]}", flush=True)
    print(f"{len(survivors)} survivor(s) of {tried} mutation(s)", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
