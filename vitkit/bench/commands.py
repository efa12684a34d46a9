"""`vitkit bench RECIPE.yaml` and `vitkit bench report DIR [--into RESULTS.md]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_bench(args: argparse.Namespace) -> None:
    from . import bench, dry_run, load_recipe
    from .report import splice_section, write
    from .run import read_rows

    if args.recipe == "report":
        if not args.dir:
            raise ValueError("usage: vitkit bench report DIR [--into RESULTS.md]")
        folder = Path(args.dir)
        rows = read_rows(folder / "rows.jsonl")
        write(folder, rows)
        print(f"rebuilt {folder / 'results.md'} and {folder / 'plots'}")
        if args.into:
            splice_section(Path(args.into), folder, rows)
            print(f"rewrote the `{folder}` section of {args.into} from the rows")
        return
    recipe = load_recipe(args.recipe)  # validated entirely before any work
    if args.seeds:
        recipe = type(recipe)(**{**recipe.__dict__, "seeds": tuple(int(s) for s in args.seeds.split(","))})
    if args.dry_run:
        force = tuple(args.force or ())
        from .run import _forced

        for cell, finished in dry_run(recipe, Path(args.out), args.device):
            state = "todo" if not finished or _forced(cell, force) else "done"
            print(f"{state}  {cell.key}  {cell.id}")
        return
    try:
        result = bench(recipe, out=args.out, executor=args.executor, ray_address=args.ray_address,
                       device=args.device, retry_failed=args.retry_failed, force=tuple(args.force or ()))
    except KeyboardInterrupt:
        print(f"\nvitkit bench: interrupted; finished cells are kept in {Path(args.out) / 'rows.jsonl'}: run the "
              "same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    print(result.table())
    print(f"computed {len(result.computed)} cell(s); results in {Path(args.out) / 'results.md'}, rows in "
          f"{Path(args.out) / 'rows.jsonl'}, plots in {Path(args.out) / 'plots'}")


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="backbones x methods x protocols side by side (resumable)",
                       description="Run a bench recipe (YAML), or `vitkit bench report DIR` to rebuild the report.")
    p.add_argument("recipe", help="recipe YAML, or the word `report`")
    p.add_argument("dir", nargs="?", help="run folder (for `report`)")
    p.add_argument("--out", default="runs/bench", help="run folder (default: runs/bench)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="run cells here or as Ray tasks")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--seeds", help="comma-separated seeds, overriding the recipe")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--force", action="append", metavar="GLOB",
                   help="recompute cells whose backbone/chain/task/protocol/sSEED id or key matches (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="recompute cells whose row is an error")
    p.add_argument("--dry-run", action="store_true", help="list cells and whether they are finished")
    p.add_argument("--into", metavar="RESULTS.md",
                   help="with `report`: also rewrite this run's section of a Markdown file, from the rows alone")
    p.set_defaults(func=_run_bench)
