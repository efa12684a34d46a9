"""mutmut 3 on ONE algorithm file with only that file's tests, in a scratch copy of the repository.

`[tool.mutmut]` in pyproject.toml configures the token run (benchmarks/RESULTS.md, issue 11); mutmut reads its
config only from the working directory's pyproject.toml / setup.cfg, so this script copies `vitkit/` and
`tests/` to a scratch directory, writes a pyproject.toml there that mutates the one file and selects the given
tests, and runs `mutmut run` + `mutmut results` in it. The working tree is never touched.

    OMP_NUM_THREADS=1 nice python benchmarks/mutmut_file.py vitkit/models/inflate.py tests/adapt/test_inputs.py
    OMP_NUM_THREADS=1 nice python benchmarks/mutmut_file.py FILE TEST... --show   # also print each survivor's diff

Prints the number of mutants, killed and survived, and the survivors' names (`--show`: their diffs).
Results: benchmarks/RESULTS.md, "Mutation testing, stop 25".
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
CONFIG = """[tool.pytest.ini_options]
markers = ["slow: longer behavioural tests"]
filterwarnings = ["ignore::DeprecationWarning"]

[tool.mutmut]
source_paths = ["vitkit"]
only_mutate = [{file!r}]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
pytest_add_cli_args_test_selection = [{tests}]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="the algorithm file to mutate, e.g. vitkit/models/inflate.py")
    ap.add_argument("tests", nargs="+", help="its test files")
    ap.add_argument("--show", action="store_true", help="print each survivor's diff")
    ap.add_argument("--keep", help="scratch directory to use and keep (default: a temporary one, removed)")
    args = ap.parse_args()
    if not MUTMUT.exists():
        print(f"mutmut is not installed next to {sys.executable}: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    missing = [p for p in (args.file, *args.tests) if not (ROOT / p).is_file()]
    if missing:
        print(f"not a file of the repository: {', '.join(missing)}", file=sys.stderr)
        return 2
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vitkit-mutmut-"))
    try:
        work = scratch / "repo"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for d in ("vitkit", "tests"):
            shutil.copytree(ROOT / d, work / d, ignore=ignore)
        # tests/conftest.py finds the shared data at parents[2] / "shared" (the copy runs from repo/mutants/)
        shared = ROOT.parent / "shared"
        for link in (scratch / "shared", work / "shared"):
            if shared.exists() and not link.exists():
                link.symlink_to(shared.resolve())
        (work / "pyproject.toml").write_text(CONFIG.format(file=args.file, tests=", ".join(map(repr, args.tests))))
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.pop("PYTHONPATH", None)
        with open(scratch / "run.log", "w") as log:  # mutmut's progress spinner: kept out of the summary
            run = subprocess.run([str(MUTMUT), "run", "--max-children", "1"], cwd=work, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        if run.returncode:
            tail = (scratch / "run.log").read_text(errors="replace")[-2000:]
            print(f"mutmut run failed (exit {run.returncode}):\n{tail}", file=sys.stderr)
            return run.returncode
        out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                             text=True).stdout
        rows = [line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line]
        status = Counter(s for _, s in rows)
        print(f"{args.file}: {len(rows)} mutants, " + ", ".join(f"{n} {s}" for s, n in sorted(status.items())))
        for name, s in rows:
            if s != "killed":
                print(f"  {s}: {name}")
                if args.show:
                    print(subprocess.run([str(MUTMUT), "show", name], cwd=work, env=env, capture_output=True,
                                         text=True).stdout)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
