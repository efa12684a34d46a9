"""A bench recipe: backbones x method chains x tasks x protocols x seeds, and the cells it expands to.

A chain is written `name:field=value,field=value+name2:...` (`lora:rank=8+tome:r=4`); the empty chain is the
baseline and is always part of the grid. Protocols (Battle of the Backbones):
* `linear` / `knn` probe frozen features: they run on chains without `adapt` methods (an adapter that never
  trains leaves features unchanged, so such cells would repeat the baseline);
* `finetune` trains what the chain makes trainable with `vk.fit` on a fixed budget; a chain with no `adapt`
  method is fine-tuned in full (the baseline cell is full fine-tuning).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vitkit import registry

PROTOCOLS = ("linear", "knn", "finetune")
OOD_VARIANTS = ("rotate15", "rotate30", "rotate90", "noise0.1", "noise0.2", "invert", "jpeg30", "jpeg10")
DEFAULT_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-test-jpeg" / "test"


@dataclass(frozen=True)
class Backbone:
    """A model to benchmark: `source` goes to `vk.load`, `args` to it as keyword arguments, `data` overrides
    the data config (e.g. `mean`, `std` of a checkpoint without a pretrained_cfg)."""

    name: str
    source: str
    args: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """`digits` (scikit-learn, stratified 80/20, seed 0) or an image folder split per class in file order:
    the first `train` images of each class train, the last `eval` evaluate (CIFAR-10 JPEGs: 800-999 evaluate,
    the images the embedded model never trained on)."""

    name: str
    root: Optional[str] = None
    train: int = 800
    eval: int = 200


@dataclass(frozen=True)
class Budget:
    """The fine-tune budget every `finetune` cell of a task gets."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    full_lr: float = 2e-4


@dataclass(frozen=True)
class Cell:
    """The unit of work, caching and resumption."""

    backbone: Backbone
    chain: str
    task: Task
    protocol: str
    seed: int

    @property
    def key(self) -> str:
        try:
            chain = canonical_chain(self.chain)
        except (ValueError, TypeError):  # an invalid chain still needs a key: its row records the error
            chain = self.chain
        payload = json.dumps({"backbone": asdict(self.backbone), "chain": chain,
                              "task": asdict(self.task), "protocol": self.protocol, "seed": self.seed,
                              "vitkit_major": 0}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.backbone.name} | {self.chain or 'baseline'} | {self.task.name} | {self.protocol} | s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    backbones: tuple[Backbone, ...]
    chains: tuple[str, ...] = ("",)
    tasks: tuple[Task, ...] = (Task("digits"),)
    protocols: tuple[str, ...] = PROTOCOLS
    seeds: tuple[int, ...] = (0,)
    budget: Budget = Budget()
    ood: tuple[str, ...] = ()
    perf: bool = True
    perf_batch: int = 8

    def cells(self) -> list[Cell]:
        """The grid, baseline first for every backbone, skipping probes of untrained adapters."""
        chains = ("",) + tuple(c for c in self.chains if c.strip())
        out = []
        for backbone in self.backbones:
            for chain in chains:
                for task in self.tasks:
                    for protocol in self.protocols:
                        if protocol != "finetune" and has_adapter(chain):
                            continue
                        out.extend(Cell(backbone, chain, task, protocol, seed) for seed in self.seeds)
        return out


def parse_chain(chain: str) -> list[tuple[str, dict[str, Any]]]:
    """`"lora:rank=8,alpha=16+tome:r=4"` -> [("lora", {"rank": 8, "alpha": 16}), ("tome", {"r": 4})]."""
    steps = []
    for part in filter(None, (p.strip() for p in chain.split("+"))):
        name, _, rest = part.partition(":")
        config = {}
        for pair in filter(None, rest.split(",")):
            if "=" not in pair:
                raise ValueError(f"chain `{chain}`: expected field=value in `{pair}`")
            key, value = pair.split("=", 1)
            config[key.strip()] = yaml.safe_load(value)
        steps.append((name.strip(), config))
    return steps


def canonical_chain(chain: str) -> list:
    """The chain with every method's full config (defaults filled), so equal chains hash equally."""
    out = []
    for name, config in parse_chain(chain):
        method = registry.get(name)
        out.append([name, registry.config_dict(registry.make_config(method, **config))])
    return out


def check_chain(chain: str) -> Optional[str]:
    """None when every method and field of the chain is valid, else the error message."""
    try:
        canonical_chain(chain)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def has_adapter(chain: str) -> bool:
    try:
        return any(registry.get(name).kind == "adapt" for name, _ in parse_chain(chain))
    except ValueError:
        return False


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """A recipe from a YAML file or a dict (see `benchmarks/bench_cifar.yaml`); `chains: all` means every
    registered adapt and accelerate method with its defaults."""
    raw = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
    known = {"backbones", "chains", "methods", "tasks", "protocols", "seeds", "budget", "ood", "perf", "perf_batch"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"recipe: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    backbones = []
    for entry in raw.get("backbones", []):
        entry = {"source": entry} if isinstance(entry, str) else dict(entry)
        entry.setdefault("name", Path(str(entry["source"])).stem)
        backbones.append(Backbone(entry["name"], str(entry["source"]), entry.get("args", {}), entry.get("data", {})))
    if not backbones:
        raise ValueError("recipe: list at least one backbone")
    tasks = []
    for entry in raw.get("tasks", ["digits"]):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        if entry["name"] == "cifar10":
            entry.setdefault("root", os.environ.get("VITKIT_CIFAR10_JPEG", str(DEFAULT_CIFAR)))
        task = Task(**entry)
        if task.name != "digits" and not (task.root and Path(task.root).is_dir()):
            raise FileNotFoundError(f"recipe: task `{task.name}` needs an image folder `root`, got {task.root!r}")
        tasks.append(task)
    protocols = tuple(raw.get("protocols", PROTOCOLS))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"recipe: unknown protocols {bad}; valid: {PROTOCOLS}")
    ood = tuple(raw.get("ood", ()))
    bad = [v for v in ood if v not in OOD_VARIANTS]
    if bad:
        raise ValueError(f"recipe: unknown OOD variants {bad}; valid: {OOD_VARIANTS}")
    chains = raw.get("chains", raw.get("methods", ()))
    chains = all_registered_chains() if chains == "all" else [chains] if isinstance(chains, str) else chains
    return Recipe(backbones=tuple(backbones), chains=tuple(chains),
                  tasks=tuple(tasks), protocols=protocols, seeds=tuple(raw.get("seeds", (0,))),
                  budget=Budget(**raw.get("budget", {})), ood=ood, perf=bool(raw.get("perf", True)),
                  perf_batch=int(raw.get("perf_batch", 8)))


def all_registered_chains(kinds=("adapt", "accelerate")) -> list[str]:
    """Every registered method of `kinds` as a one-method chain with its defaults (`linear` and `full` are the
    protocols' own baselines and are left out)."""
    return [m.name for m in registry.methods() if m.kind in kinds and m.name not in ("linear", "full")]
