"""The method registry: every method's name, kind, config and `apply`, and the methods applied to a model.

A method module ends with one call, `register("name", kind=..., config=Config, apply=apply)`; the registry
imports every module of the method packages (`vitkit.adapt`, `vitkit.tokens`, `vitkit.compress`) on first
use, so a new method appears in `vk.methods()`, the CLI, the demo and the conformance tests by existing.

`Registry` is the one mechanism behind every such table: the methods here, the attacks (`vitkit.robust`), the
pretraining objectives (`vitkit.pretrain`) and the distillation methods (`vitkit.distill`) each hold one, so
their names, config checks, discovery, listing, unknown-name errors and `--help` lists read the same.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn as nn

KINDS = ("adapt", "accelerate", "compress", "augment", "repair")  # augment: training-time transforms read by vk.fit
METHOD_PACKAGES = ("vitkit.adapt", "vitkit.tokens", "vitkit.compress", "vitkit.augment", "vitkit.distill")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class Registry:
    """A table of named, documented things of one sort, filled by the modules of some packages.

    Each entry is a frozen dataclass with (at least) a `name`, a `config` dataclass and a one-line `doc`; the
    `owner` given to `add` is the function or class that does the work (an `apply`, an attack's `run`, ...).

    Args:
        what: what an entry is called in messages ("method", "objective", ...).
        packages: the packages whose modules register entries, imported on first use (modules named `_*`,
            `*_algo`, `*_layer`, `*_io` and those in `skip` are not imported).
        skip: module names of those packages that register nothing.
        context: the start of every error message (e.g. "pretrain: "), naming where the name was given.
    """

    def __init__(self, what: str, packages: tuple[str, ...], skip: tuple[str, ...] = (), context: str = ""):
        self.what, self.packages, self.skip, self.context = what, packages, set(skip), context
        self.entries: dict[str, Any] = {}
        self._owners: dict[str, Callable] = {}
        self._discovered = False

    def add(self, entry: Any, owner: Callable) -> None:
        """Check `entry` (its name, its documented config dataclass; no other owner under its name) and store it,
        with `doc` the first line of the docstring of `owner`'s module."""
        name, config, label = entry.name, entry.config, f"{self.context}{self.what} `{entry.name}`"
        if not _NAME.match(name):
            raise ValueError(f"{self.context}{self.what} name `{name}` must be lower case letters, digits and `-`")
        if self._owners.get(name, owner) is not owner:
            raise ValueError(f"{label} is already registered by {self._owners[name].__module__}")
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"{label}: config must be a dataclass, got {config!r}")
        missing_help = [f.name for f in dataclasses.fields(config) if not f.metadata.get("help")]
        if missing_help:
            raise ValueError(f"{label}: config fields {missing_help} need metadata={{'help': ...}}")
        doc = (importlib.import_module(owner.__module__).__doc__ or "").strip().splitlines()
        self.entries[name] = dataclasses.replace(entry, doc=doc[0] if doc else "")
        self._owners[name] = owner

    def discover(self) -> None:
        """Import every module of the packages once, so each registers its entries."""
        if self._discovered:
            return
        self._discovered = True
        for package_name in self.packages:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                if not (info.name.startswith("_") or info.name.endswith(("_algo", "_layer", "_io"))
                        or info.name in self.skip):
                    importlib.import_module(f"{package_name}.{info.name}")

    def all(self) -> list:
        """Every entry, sorted by name."""
        self.discover()
        return sorted(self.entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> Any:
        """The entry called `name`; an unknown name raises a `ValueError` naming the closest and all names."""
        self.discover()
        if isinstance(name, str) and name in self.entries:
            return self.entries[name]
        close = difflib.get_close_matches(str(name), list(self.entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(f'`{c}`' for c in close)}? " if close else ""
        raise ValueError(f"{self.context}unknown {self.what} `{name}`; {hint}registered: "
                         f"{', '.join(sorted(self.entries))}")

    def help(self, title: str) -> str:
        """`title`, then every entry's name and doc and its config fields (default, help): a `--help` epilog."""
        lines = [title]
        for entry in self.all():
            lines.append(f"  {entry.name}: {entry.doc}")
            lines += [f"      {name}={default!r}  {help_text}" for name, _, default, help_text in entry.fields()]
        return "\n".join(lines)


class Entry:
    """What every registry entry offers besides its fields: `fields()`, the rendering of its `config`."""

    def fields(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for every config field."""
        hints = typing.get_type_hints(self.config)
        out = []
        for f in dataclasses.fields(self.config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return out


@dataclass(frozen=True)
class Method(Entry):
    """A registered method.

    Attributes:
        name: registry name (lower case, `-` separated).
        kind: one of `KINDS`.
        config: the method's `Config` dataclass (paper defaults, help on every field).
        apply: `apply(model, cfg) -> model`.
        identity: config overrides at which the method leaves outputs unchanged (None: no such setting).
        doc: first line of the method module's docstring.
    """

    name: str
    kind: str
    config: type
    apply: Callable[[nn.Module, Any], nn.Module]
    identity: Optional[dict] = None
    doc: str = ""


@dataclass(frozen=True)
class Applied:
    """One method applied to a model, recorded in order on the model."""

    name: str
    config: Any


METHODS = Registry("method", METHOD_PACKAGES)


def register(name: str, *, kind: str, config: type, apply: Callable, identity: Optional[dict] = None) -> None:
    """Register a method. Called once, at the foot of the method's module."""
    if kind not in KINDS:
        raise ValueError(f"method `{name}`: kind must be one of {KINDS}, got `{kind}`")
    METHODS.add(Method(name, kind, config, apply, identity), owner=apply)


def alias(name: str, of: str, **defaults) -> None:
    """Register `name` as method `of` with other config defaults (`vpt-deep` = `vpt` with deep=True).

    The alias shares `of`'s `apply`; its `Config` is a subclass of `of`'s whose `defaults` fields start at the
    given values (help and checks inherited), so `vk.methods()`, the CLI, `vk.save`/`vk.load`, the demo and the
    bench see an ordinary method. Called at the foot of `of`'s module, after its `register`.
    """
    target = METHODS.entries[of]
    unknown = [k for k in defaults if k not in {f.name for f in dataclasses.fields(target.config)}]
    if unknown:
        raise ValueError(f"alias `{name}`: {unknown} are not fields of `{of}`'s config")
    fields = [(f.name, f.type, dataclasses.field(default=defaults[f.name], metadata=f.metadata))
              for f in dataclasses.fields(target.config) if f.name in defaults]
    config = dataclasses.make_dataclass(f"{target.config.__qualname__}_{name.replace('-', '_')}", fields,
                                        bases=(target.config,), frozen=True)
    config.__module__ = target.config.__module__  # its string annotations resolve in the method's module
    register(name, kind=target.kind, config=config, apply=target.apply, identity=target.identity)
    shown = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    entry = METHODS.entries[name]
    METHODS.entries[name] = dataclasses.replace(entry, doc=f"Alias of `{of}` with {shown}: {target.doc}")


def methods(kind: Optional[str] = None) -> list[Method]:
    """Every registered method (of one kind when given), sorted by kind then name."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind `{kind}`; kinds: {', '.join(KINDS)}")
    found = [m for m in METHODS.all() if kind is None or m.kind == kind]
    return sorted(found, key=lambda m: KINDS.index(m.kind))  # stable: by name within a kind


def get(name: str) -> Method:
    """The method called `name`; an unknown name raises a `ValueError` listing the closest names."""
    return METHODS.get(name)


def make_config(method: Method, **kwargs) -> Any:
    """Build a method's config, naming unknown or ill-typed fields and listing the valid ones."""
    hints = typing.get_type_hints(method.config)
    valid = [f.name for f in dataclasses.fields(method.config)]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{method.name}: unknown config field(s) {unknown}; valid fields: {', '.join(valid) or 'none'}")
    for key, value in kwargs.items():
        if not _type_ok(value, hints[key]):
            raise TypeError(f"{method.name}: `{key}` must be {_type_name(hints[key])}, got {value!r}; "
                            f"valid fields: {', '.join(valid)}")
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):  # from JSON or YAML
            kwargs[key] = tuple(value)
    return method.config(**kwargs)


def apply(model: nn.Module, name: str, *, kind: Optional[str] = None, **config) -> nn.Module:
    """Apply method `name` with `config` to `model` in place, record it on the model and return the model."""
    method = get(name)
    if kind is not None and method.kind != kind:
        raise ValueError(f"`{name}` is an {method.kind} method; call vk.{method.kind}(model, {name!r}, ...) "
                         f"or vk.apply(model, {name!r}, ...)")
    cfg = make_config(method, **config)
    if "_vitkit_base" not in model.__dict__:  # a model vitkit did not load: fingerprint it for vk.save
        from .models.loading import record_module_base

        record_module_base(model)
    model = method.apply(model, cfg)
    # a method may record the config that actually ran (int8's backend='auto' resolved for the device)
    applied(model).append(Applied(name, model.__dict__.pop("_vitkit_resolved_config", cfg)))
    return model


def applied(model: nn.Module) -> list[Applied]:
    """The methods applied to `model`, in order (a live list stored on the model)."""
    return model.__dict__.setdefault("_vitkit_applied", [])


def config_dict(cfg: Any) -> dict:
    """A config as JSON-friendly values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _type_ok(value, hint) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, args[0]) for v in value) if args else \
            isinstance(value, (tuple, list))
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
