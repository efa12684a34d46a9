"""A bench recipe: backbones x method chains x tasks x protocols x seeds, and the cells it expands to.

A chain is written `name:field=value,field=value+name2:...` (`lora:rank=8+tome:r=4`); the empty chain is the
baseline and is always part of the grid. Every chain is parsed once, when the recipe is loaded, into a `Chain`
(registered methods with typed configs), so an unknown method or field stops the run before any work and the
runner never reads chain strings again. Protocols (Battle of the Backbones):
* `linear` / `knn` / `fewshot` / `retrieval` probe frozen features: they run on chains without `adapt`
  methods (an adapter that never trains leaves features unchanged, so such cells would repeat the baseline);
* `finetune` trains what the chain makes trainable with `vk.fit` on a fixed budget; a chain with no `adapt`
  method is fine-tuned in full (the baseline cell is full fine-tuning).
* `robust` trains as `finetune` does, then reports robust accuracy under the recipe's `robust:` attack (PGD at a
  stated ε by default; `vitkit/robust/bench.py`) beside the clean accuracy of the same images.
* `quality` trains nothing: attention locality and similarity overlap of the frozen features
  (`vitkit/bench/quality.py`), columns beside the accuracies, not part of the ranking.

Tasks are image folders, `digits`, or procedural tasks of other inputs (`sounds`, `tiles`, `clips`, `pairs`,
`points`; `vitkit/data/generators.py`): an input adapter runs on its own task only, every other chain and the
baseline on the task's RGB view (`Chain.runs_on`; docs/applications.md).

Loading validates everything before any cell runs (`RecipeError`, one line naming the file and field): YAML
syntax, keys, methods and config fields, protocols, OOD variants, tasks that cannot be split into `train` +
`eval` images per class, and backbones (each is loaded once, so a backbone that needs the unreachable hub
fails here, once). The weights' SHA-256 is recorded on each backbone and enters every cell key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vitkit import registry
from vitkit.cli import yaml_load
from vitkit.data.generators import TASKS as PROCEDURAL_TASKS

PROTOCOLS = ("linear", "knn", "finetune", "fewshot", "retrieval", "robust", "quality")
TRAINED = ("finetune", "robust")  # protocols that fine-tune the chain
PROBES = ("linear", "knn", "fewshot", "retrieval", "quality")
OOD_VARIANTS = ("rotate15", "rotate30", "rotate90", "noise0.1", "noise0.2", "invert", "jpeg30", "jpeg10")
DEFAULT_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-test-jpeg" / "test"
CELL_KINDS = ("probe", "finetune", "perf")
VITKIT_MAJOR = 0


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any cell, with one line naming the file, field and fix."""


@dataclass(frozen=True)
class Backbone:
    """A model to benchmark: `source` goes to `vk.load`, `args` to it as keyword arguments, `data` overrides
    the data config (e.g. `mean`, `std` of a checkpoint without a pretrained_cfg). `weights_sha256` is filled
    when the recipe is validated (None for random initialisation)."""

    name: str
    source: str
    args: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    weights_sha256: Optional[str] = None

    def __hash__(self) -> int:
        return hash((self.name, self.source, self.weights_sha256))


@dataclass(frozen=True)
class Task:
    """`digits` (scikit-learn, stratified 80/20, seed 0), an image folder split per class in file order: the
    first `train` images of each class train, the last `eval` evaluate (defaults 800 / 200 per class, so a class
    needs at least 1,000 images; CIFAR-10 JPEGs: 800-999 evaluate, the images the embedded model never trained
    on), or a procedural task of another input (`vk.data.procedural`: sounds, tiles, clips, pairs, points;
    `train` + `eval` samples generated per class, defaults 20 / 20 in a recipe, seed 0)."""

    name: str
    root: Optional[str] = None
    train: int = 800
    eval: int = 200

    @property
    def procedural(self):
        """The `vitkit.data.generators.Task` of a procedural task, else None."""
        return PROCEDURAL_TASKS.get(self.name) if self.root is None else None

    @property
    def takes(self) -> Optional[str]:
        """The input adapter this task's samples are made for (None: RGB images)."""
        return self.procedural.adapter if self.procedural else None


@dataclass(frozen=True)
class Budget:
    """The fine-tune budget every `finetune` cell of a task gets. `lr` trains adapter chains, `full_lr` the
    chains fine-tuned in full; None lets `vk.fit` use the method's own default. `tune` is a learning-rate grid
    (a list for every chain, or a dict `{method: [...], default: [...]}`, `full` naming full fine-tuning):
    each value is trained on `train` minus a validation split (`val`, the last fraction of each class's
    train images), the best on validation is chosen before the evaluation split is touched, then retrained on
    all of `train`."""

    epochs: int = 2
    batch_size: int = 32
    lr: Optional[float] = None
    full_lr: Optional[float] = None
    tune: Any = ()
    val: float = 0.2

    def __hash__(self) -> int:
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))

    def lr_for(self, chain: "Chain") -> Optional[float]:
        return self.lr if chain.adapter else self.full_lr

    def grid_for(self, chain: "Chain") -> tuple[float, ...]:
        if isinstance(self.tune, dict):
            name = chain.adapter_name or "full"
            return tuple(float(v) for v in self.tune.get(name, self.tune.get("default", ())))
        return tuple(float(v) for v in self.tune)


@dataclass(frozen=True, eq=False)
class Chain:
    """Methods applied in order: `steps` = ((name, config instance), ...), parsed and validated once."""

    text: str
    steps: tuple = ()

    @property
    def label(self) -> str:
        return self.text or "baseline"

    @property
    def adapter(self) -> bool:
        return any(registry.get(name).kind == "adapt" for name, _ in self.steps)

    @property
    def takes(self) -> Optional[str]:
        """The chain's input adapter (`video`, `points`, ...: docs/applications.md), None when it takes images."""
        return next((name for name, _ in self.steps if getattr(registry.get(name).config, "INPUT", None)), None)

    def runs_on(self, task: Task) -> bool:
        """An input adapter runs on its own procedural task only; any other chain on images, or on the RGB view of
        a procedural task's samples (the spectrogram replicated, bands B04 B03 B02, the frame average, the first
        image; point clouds have none)."""
        if self.takes or task.procedural:
            return self.takes == task.takes if self.takes else task.procedural.view is not None
        return True

    @property
    def adapter_name(self) -> Optional[str]:
        return next((name for name, _ in self.steps if registry.get(name).kind == "adapt"), None)

    @property
    def compress_tail(self) -> "Chain":
        """The trailing `compress` steps (`lora+prune:sparsity=0.5` -> `prune`): a fine-tune cell applies them
        after training (prune or quantise the trained model), so the chain before them is what trains."""
        i = len(self.steps)
        while i and registry.get(self.steps[i - 1][0]).kind == "compress":
            i -= 1
        return Chain("+".join(part for part in self.text.split("+")[i:]), self.steps[i:])

    @property
    def trained(self) -> "Chain":
        """The steps before `compress_tail`."""
        tail = len(self.compress_tail.steps)
        return Chain("+".join(self.text.split("+")[:len(self.steps) - tail]), self.steps[:len(self.steps) - tail])

    def canonical(self) -> list:
        """Every method with its full config (defaults filled), so equal chains hash equally."""
        return [[name, registry.config_dict(cfg)] for name, cfg in self.steps]

    def apply(self, model):
        """Apply the chain through the registry (`vk.apply`), each method with its full config."""
        for name, cfg in self.steps:
            registry.apply(model, name, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
        return model

    def __eq__(self, other) -> bool:
        return isinstance(other, Chain) and self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(json.dumps(self.canonical(), sort_keys=True, default=str))


BASELINE = Chain("")


@dataclass(frozen=True)
class Cell:
    """The unit of work, caching and resumption. `settings` holds, as canonical JSON, everything else that
    changes the cell's result (budget, OOD list, protocol options, perf batch, device and its fingerprint)."""

    backbone: Backbone
    chain: Chain
    task: Task
    protocol: str
    seed: int
    settings: str = "{}"

    @property
    def key(self) -> str:
        task = asdict(self.task)
        if self.task.procedural:  # keyed on the generated samples, so a changed generator recomputes
            from vitkit.data.generators import digest

            task["data_sha256"] = digest(self.task.name, self.task.train + self.task.eval)
        payload = json.dumps({"backbone": asdict(self.backbone), "chain": self.chain.canonical(),
                              "task": task, "protocol": self.protocol, "seed": self.seed,
                              "settings": json.loads(self.settings), "vitkit_major": VITKIT_MAJOR},
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def kind(self) -> str:
        return "perf" if self.protocol == "perf" else "finetune" if self.protocol in TRAINED else "probe"

    @property
    def id(self) -> str:
        """`backbone/chain/task/protocol/sSEED`, what `--force GLOB` matches (with the key)."""
        return f"{self.backbone.name}/{self.chain.label}/{self.task.name}/{self.protocol}/s{self.seed}"

    def label(self) -> str:
        return f"{self.backbone.name} | {self.chain.label} | {self.task.name} | {self.protocol} | s{self.seed}"

    def with_chain(self, chain: Chain, protocol: Optional[str] = None) -> "Cell":
        return dataclasses.replace(self, chain=chain, protocol=protocol or self.protocol)


@dataclass(frozen=True)
class Resources:
    """Ray resources of one cell kind."""

    cpus: float = 1
    gpus: Optional[float] = None  # None: 1 when the run's device is CUDA, else 0


@dataclass(frozen=True)
class Recipe:
    backbones: tuple[Backbone, ...]
    chains: tuple[Chain, ...] = ()
    tasks: tuple[Task, ...] = (Task("digits"),)
    protocols: tuple[str, ...] = ("linear", "knn", "finetune")
    seeds: tuple[int, ...] = (0,)
    budget: Budget = Budget()
    ood: tuple[str, ...] = ()
    perf: bool = True
    perf_batch: int = 8
    fewshot: tuple = (("shots", 5), ("draws", 5))
    robust: str = "{}"  # the `robust` protocol's attack, canonical JSON (vitkit.robust.bench.parse)
    resources: tuple = ()  # ((kind, Resources), ...)
    max_retries: int = 1
    source: str = "recipe"

    def resources_for(self, kind: str) -> Resources:
        return dict(self.resources).get(kind, Resources())

    def settings(self, protocol: str, chain: Chain, device: str, fingerprint: Optional[dict] = None) -> str:
        """What besides (backbone, chain, task, protocol, seed) changes a cell's result, as canonical JSON."""
        if protocol in TRAINED:
            budget = asdict(self.budget)
            budget.update(lr=self.budget.lr_for(chain), grid=list(self.budget.grid_for(chain)))
            budget.pop("full_lr")
            budget.pop("tune")
            out = {"budget": budget, "ood": list(self.ood), "device": device.split(":")[0]}
            if protocol == "robust":  # the attack, its full config and the number of images attacked
                out.update(robust=json.loads(self.robust), ood=[])
        elif protocol == "perf":
            out = {"perf_batch": self.perf_batch, "fingerprint": fingerprint or {"device": device}}
        elif protocol == "fewshot":
            out = {"fewshot": dict(self.fewshot), "device": device.split(":")[0]}
        elif protocol in ("retrieval", "quality"):
            out = {"device": device.split(":")[0]}
        else:
            out = {"ood": list(self.ood), "device": device.split(":")[0]}
        return json.dumps(out, sort_keys=True, default=str)

    def cells(self, device: str = "cpu", fingerprint: Optional[dict] = None) -> list[Cell]:
        """The grid, baseline first for every backbone, skipping probes of untrained adapters and the tasks a
        chain does not run on (`Chain.runs_on`); then one perf cell per (backbone, chain) when `perf` is on (FLOPs
        counted on the evaluation samples of the first task the chain runs on)."""
        chains = (BASELINE,) + tuple(c for c in self.chains if c.steps)
        out = []
        for backbone in self.backbones:
            for chain in chains:
                for task in filter(chain.runs_on, self.tasks):
                    for protocol in self.protocols:
                        if protocol not in TRAINED and chain.adapter:
                            continue
                        settings = self.settings(protocol, chain, device)
                        out.extend(Cell(backbone, chain, task, protocol, seed, settings) for seed in self.seeds)
        if self.perf:
            settings = self.settings("perf", BASELINE, device, fingerprint)
            for backbone in self.backbones:
                for chain in chains:
                    task = next(filter(chain.runs_on, self.tasks), None)
                    if task is not None:
                        out.append(Cell(backbone, chain, task, "perf", 0, settings))
        return out


def parse_chain(chain: str) -> list[tuple[str, dict[str, Any]]]:
    """`"lora:rank=8,alpha=16+tome:r=4"` -> [("lora", {"rank": 8, "alpha": 16}), ("tome", {"r": 4})]. A value may
    be a YAML list (`spectrogram:img_size=[32,64]`): commas inside brackets do not separate fields."""
    steps = []
    for part in filter(None, (p.strip() for p in chain.split("+"))):
        name, _, rest = part.partition(":")
        config = {}
        for pair in filter(None, _split_fields(rest)):
            if "=" not in pair:
                raise ValueError(f"chain `{chain}`: expected field=value in `{pair}`")
            key, value = pair.split("=", 1)
            config[key.strip()] = yaml_load(value)
        steps.append((name.strip(), config))
    return steps


def _split_fields(text: str) -> list[str]:
    """`a=1,b=[2,3]` -> ["a=1", "b=[2,3]"]: split at the commas outside brackets."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            fields.append(text[start:i])
            start = i + 1
    return fields + [text[start:]]


def make_chain(text: str) -> Chain:
    """Parse and validate a chain string into a `Chain` (ValueError / TypeError naming the method or field)."""
    steps = []
    for name, config in parse_chain(text):
        steps.append((name, registry.make_config(registry.get(name), **config)))
    maps = [name for name, _ in steps if getattr(registry.get(name).config, "OUTPUT", None)]
    if maps:  # `dense`: the bench's protocols score a classifier
        raise ValueError(f"`{maps[0]}` makes the model predict {registry.get(maps[0]).config.OUTPUT}, not classes; "
                         "the bench's protocols score classifiers: measure it with vk.evaluate(model, data, "
                         "protocol='dense') (benchmarks/applications.py --tasks tiles)")
    inputs = [name for name, _ in steps if getattr(registry.get(name).config, "INPUT", None)]
    if len(inputs) > 1:
        raise ValueError(f"{' and '.join(f'`{n}`' for n in inputs)} each replace the model's input; a chain takes "
                         "one kind of input: keep one of them")
    return Chain(text.strip(), tuple(steps))


def canonical_chain(chain: str) -> list:
    """The chain with every method's full config (defaults filled), so equal chains hash equally."""
    return make_chain(chain).canonical()


def check_chain(chain: str) -> Optional[str]:
    """None when every method and field of the chain is valid, else the error message."""
    try:
        make_chain(chain)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def has_adapter(chain: str | Chain) -> bool:
    try:
        return (chain if isinstance(chain, Chain) else make_chain(chain)).adapter
    except (ValueError, TypeError):
        return False


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path}: no such file") from None
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as err:
        from vitkit.cli import yaml_problem

        raise RecipeError(f"recipe {path}: YAML syntax error{yaml_problem(err)}; fix the file "
                          "(a chain with `:` or `+` may need quotes)") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of keys (backbones, chains, tasks, ...), "
                          f"got {type(raw).__name__}")
    return raw


KNOWN_KEYS = {"backbones", "chains", "methods", "tasks", "protocols", "seeds", "budget", "ood", "perf", "perf_batch",
              "fewshot", "resources", "robust"}


def load_recipe(source: str | os.PathLike | dict, *, check_backbones: bool = True) -> Recipe:
    """A recipe from a YAML file or a dict (see `benchmarks/bench_cifar.yaml`), validated entirely (see the
    module docstring); `chains: all` means every registered adapt and accelerate method with its defaults."""
    where = "recipe" if isinstance(source, dict) else f"recipe {source}"
    raw = dict(source) if isinstance(source, dict) else _read_yaml(Path(source))

    def fail(message: str):
        raise RecipeError(f"{where}: {message}")

    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        fail(f"unknown keys {sorted(unknown)}; valid: {sorted(KNOWN_KEYS)}")
    entries = []
    for entry in raw.get("backbones") or []:
        entry = {"source": entry} if isinstance(entry, str) else dict(entry)
        if "source" not in entry:
            fail(f"backbone {entry}: needs a `source` (timm name, hf-hub: id, weights file or vitkit/... name)")
        entry.setdefault("name", default_backbone_name(str(entry["source"])))
        bad = set(entry) - {"name", "source", "args", "data"}
        if bad:
            fail(f"backbone `{entry['name']}`: unknown fields {sorted(bad)}; valid: args, data, name, source")
        entries.append(entry)
    if not entries:
        fail("list at least one backbone")
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        fail(f"backbones: names {sorted({n for n in names if names.count(n) > 1})} repeat; give each a `name:`")

    tasks = []
    for entry in raw.get("tasks", ["digits"]):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        if entry.get("name") == "cifar10":
            entry.setdefault("root", os.environ.get("VITKIT_CIFAR10_JPEG", str(DEFAULT_CIFAR)))
        if entry.get("name") in PROCEDURAL_TASKS and not entry.get("root"):
            entry.setdefault("train", 20)
            entry.setdefault("eval", 20)
        try:
            task = Task(**entry)
        except TypeError:
            fail(f"task {entry}: valid fields are name, root, train, eval")
        if task.procedural:
            if task.train < 1 or task.eval < 1:
                fail(f"task `{task.name}`: `train` and `eval` must be >= 1 samples per class, got train={task.train}, "
                     f"eval={task.eval}")
        elif task.name != "digits":
            if not (task.root and Path(task.root).is_dir()):
                raise RecipeError(f"{where}: task `{task.name}` needs an image folder `root`, got {task.root!r}")
            _check_split(task, where)
        tasks.append(task)

    protocols = tuple(raw.get("protocols", ("linear", "knn", "finetune")))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        fail(f"unknown protocols {bad}; valid: {PROTOCOLS}")
    ood = tuple(raw.get("ood") or ())
    bad = [v for v in ood if v not in OOD_VARIANTS]
    if bad:
        fail(f"unknown OOD variants {bad}; valid: {OOD_VARIANTS}")
    generated = [t.name for t in tasks if t.procedural]
    image_only = [p for p in protocols if p in ("robust", "quality")] + (["ood"] if ood else [])
    if generated and image_only:
        fail(f"{' and '.join(image_only)} work on images; the procedural tasks {generated} are not images: bench them "
             "in a recipe of their own")

    chains_raw = raw.get("chains", raw.get("methods", ()))
    chains_raw = all_registered_chains() if chains_raw == "all" else [chains_raw] if isinstance(chains_raw, str) \
        else list(chains_raw or ())
    chains = []
    for text in chains_raw:
        try:
            chains.append(make_chain(str(text)))
        except (ValueError, TypeError) as err:
            fail(f"chains: `{text}`: {err}")
    inputs = {t.takes: t for t in tasks if t.procedural}
    if raw.get("chains", raw.get("methods")) == "all":  # input adapters join where their task is listed
        chains = [c for c in chains if not c.takes or c.takes in inputs]
    for chain in chains:
        if chain.takes and chain.takes not in inputs:
            name = next(n for n, t in PROCEDURAL_TASKS.items() if t.adapter == chain.takes)
            fail(f"chains: `{chain.text}`: `{chain.takes}` takes {registry.get(chain.takes).config.INPUT}, not images; "
                 f"add the task `{name}` (vk.data.procedural) to `tasks:`, or run it on your own data with vk.fit")
        if chain.takes:
            problem = _input_mismatch(chain, inputs[chain.takes])
            if problem:
                fail(f"chains: `{chain.text}` on task `{inputs[chain.takes].name}`: {problem}")

    budget_raw = dict(raw.get("budget") or {})
    try:
        budget = Budget(**budget_raw)
    except TypeError:
        fail(f"budget {budget_raw}: valid fields are {[f.name for f in dataclasses.fields(Budget)]}")
    if isinstance(budget.tune, (list, tuple)):
        budget = dataclasses.replace(budget, tune=tuple(budget.tune))
    elif isinstance(budget.tune, dict):
        for key, grid in budget.tune.items():
            if key not in ("default", "full"):
                try:
                    registry.get(key)
                except ValueError as err:
                    fail(f"budget.tune: `{key}`: {err}")
            if not isinstance(grid, (list, tuple)) or not grid:
                fail(f"budget.tune.{key}: expected a list of learning rates, got {grid!r}")
    else:
        fail(f"budget.tune: expected a list of learning rates or a dict of lists, got {budget.tune!r}")
    if not 0 < budget.val < 1:
        fail(f"budget.val: the validation fraction of train must be in (0, 1), got {budget.val}")
    try:
        grids = [budget.grid_for(c) for c in (BASELINE, *chains)]
    except (TypeError, ValueError):
        fail(f"budget.tune: learning rates must be numbers, got {budget.tune!r}")
    if any(v <= 0 for g in grids for v in g):
        fail(f"budget.tune: learning rates must be > 0, got {budget.tune!r}")

    fewshot = {"shots": 5, "draws": 5, **dict(raw.get("fewshot") or {})}
    if set(fewshot) - {"shots", "draws"}:
        fail(f"fewshot: valid fields are shots, draws; got {sorted(fewshot)}")
    for task in tasks:
        if "fewshot" in protocols and task.name != "digits" and task.train < fewshot["shots"]:
            fail(f"fewshot: shots={fewshot['shots']} needs at least that many train images per class; task "
                 f"`{task.name}` has train={task.train}")

    from vitkit.robust.bench import parse as parse_robust

    try:
        robust = parse_robust(raw.get("robust"))
    except (ValueError, TypeError) as err:
        fail(f"robust: {err}")

    resources = {}
    res_raw = dict(raw.get("resources") or {})
    max_retries = int(res_raw.pop("max_retries", 1))
    for kind, value in res_raw.items():
        if kind not in CELL_KINDS:
            fail(f"resources: unknown cell kind `{kind}`; valid: {CELL_KINDS} (and max_retries)")
        try:
            resources[kind] = Resources(**dict(value))
        except TypeError:
            fail(f"resources.{kind}: valid fields are cpus, gpus; got {value!r}")
        for name, amount in vars(resources[kind]).items():
            if amount is not None and (isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0):
                fail(f"resources.{kind}.{name}: a number >= 0 (Ray's num_{name}), got {amount!r}")

    backbones = tuple(resolve_backbone(e, where) if check_backbones else
                      Backbone(e["name"], str(e["source"]), e.get("args") or {}, e.get("data") or {})
                      for e in entries)
    return Recipe(backbones=backbones, chains=tuple(chains), tasks=tuple(tasks), protocols=protocols,
                  seeds=tuple(int(s) for s in raw.get("seeds", (0,))), budget=budget, ood=ood,
                  perf=bool(raw.get("perf", True)), perf_batch=int(raw.get("perf_batch", 8)),
                  fewshot=tuple(sorted(fewshot.items())), robust=json.dumps(robust, sort_keys=True),
                  resources=tuple(sorted(resources.items())),
                  max_retries=max_retries, source=where)


def _input_mismatch(chain: Chain, task: Task) -> Optional[str]:
    """Why the chain's input adapter cannot take the task's samples, or None."""
    from vitkit.adapt.channels import SENTINEL2

    config = dict(chain.steps)[chain.takes]
    if chain.takes == "channels" and tuple(config.bands) != SENTINEL2:
        return (f"the tiles' bands are {list(SENTINEL2)} in that order; `channels:bands=` must name them so "
                "(or leave it at its default)")
    if chain.takes == "video" and config.num_frames < 4:
        return f"the clips have 4 frames; `video:num_frames` must be at least 4, got {config.num_frames}"
    return None


def default_backbone_name(source: str) -> str:
    """A weights file's stem; any other source (timm name with its tag, hf-hub id, vitkit/ name) as given."""
    return Path(source).stem if source.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt")) else source


def _check_split(task: Task, where: str) -> None:
    """Every class of an image-folder task must hold train + eval images (files are listed, not decoded)."""
    from vitkit.data.datasets import ImageFolder

    if task.train < 1 or task.eval < 1:
        raise RecipeError(f"{where}: task `{task.name}`: `train` and `eval` must be >= 1 images per class, got "
                          f"train={task.train}, eval={task.eval}")
    folder = ImageFolder(task.root)
    counts = {c: 0 for c in folder.classes}
    for label in folder.targets:
        counts[folder.classes[label]] += 1
    need = task.train + task.eval
    short = {c: n for c, n in counts.items() if n < need}
    if short:
        smallest = min(short.values())
        listed = ", ".join(f"{c} ({n})" for c, n in list(short.items())[:5])
        raise RecipeError(f"{where}: task `{task.name}`: classes {listed} have fewer than train + eval = "
                          f"{task.train} + {task.eval} = {need} images (defaults: train 800, eval 200 per class); "
                          f"set the task's `train:` and `eval:` so that they sum to at most {smallest}")


def resolve_backbone(entry: dict, where: str = "recipe") -> Backbone:
    """Load a backbone once (so a missing file or an unreachable hub fails here, not in every cell) and
    record its weights' SHA-256: of the file, of the embedded asset, or of the loaded tensors for hub
    weights; None for random initialisation."""
    import vitkit as vk
    from vitkit.models import loading

    name, source = entry["name"], str(entry["source"])
    args, data = dict(entry.get("args") or {}), dict(entry.get("data") or {})
    try:
        model = vk.load(source, any_model=True, **args)
    except Exception as err:  # noqa: BLE001 - any load failure is a recipe error naming the backbone
        raise RecipeError(f"{where}: backbone `{name}` ({source}): {err}") from None
    base = model.__dict__.get("_vitkit_base", {})
    digest = None
    if base.get("pretrained", True):
        if base.get("kind") == "embedded" or source in loading.EMBEDDED:
            digest = loading.sha256_file(loading.EMBEDDED[source]["file"])
        elif base.get("sha256"):
            digest = base["sha256"]
        elif Path(source).expanduser().is_dir():
            weights = Path(source).expanduser() / "weights.safetensors"
            digest = loading.sha256_file(weights) if weights.is_file() else None
        else:
            digest = _tensors_sha256(model)
    return Backbone(name, source, args, data, digest)


def _tensors_sha256(model) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def all_registered_chains(kinds=("adapt", "accelerate")) -> list[str]:
    """Every registered method of `kinds` as a one-method chain with its defaults (`linear` and `full` are the
    protocols' own baselines and are left out, `dense` predicts maps, not classes); `load_recipe` keeps the input
    adapters whose task is listed."""
    return [m.name for m in registry.methods() if m.kind in kinds and m.name not in ("linear", "full")
            and not getattr(m.config, "OUTPUT", None)]
