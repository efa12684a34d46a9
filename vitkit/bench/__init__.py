"""`vitkit bench`: backbones x method chains x tasks x protocols, measured side by side in one run.

Spec: ../shared/methods/bench.md. `vk.bench(recipe, out=...)` runs the grid (resumable, failures recorded as
rows, optional Ray executor) and writes rows.jsonl, results.md/json and plots.
"""
from .recipe import Backbone, Budget, Cell, Chain, Recipe, RecipeError, Task, load_recipe, make_chain, parse_chain
from .report import markdown, zscores
from .run import BenchResult, bench, dry_run, read_rows

__all__ = ["Backbone", "Budget", "Cell", "Chain", "Recipe", "RecipeError", "Task", "load_recipe", "make_chain",
           "parse_chain", "markdown", "zscores", "BenchResult", "bench", "dry_run", "read_rows"]
