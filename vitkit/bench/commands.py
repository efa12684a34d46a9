"""`vitkit bench RECIPE.yaml` and `vitkit bench report DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path


def _run_bench(args: argparse.Namespace) -> None:
    from . import bench, dry_run, load_recipe
    from .report import write
    from .run import read_rows

    if args.recipe == "report":
        if not args.dir:
            raise ValueError("usage: vitkit bench report DIR")
        folder = Path(args.dir)
        write(folder, read_rows(folder / "rows.jsonl"))
        print(f"rebuilt {folder / 'results.md'} and {folder / 'plots'}")
        return
    recipe = load_recipe(args.recipe)
    if args.seeds:
        recipe = type(recipe)(**{**recipe.__dict__, "seeds": tuple(int(s) for s in args.seeds.split(","))})
    if args.dry_run:
        for cell, finished in dry_run(recipe, Path(args.out)):
            print(f"{'done' if finished else 'todo'}  {cell.key}  {cell.label()}")
        return
    result = bench(recipe, out=args.out, executor=args.executor, ray_address=args.ray_address, device=args.device,
                   retry_failed=args.retry_failed)
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
    p.add_argument("--retry-failed", action="store_true", help="recompute cells whose row is an error")
    p.add_argument("--dry-run", action="store_true", help="list cells and whether they are finished")
    p.set_defaults(func=_run_bench)
