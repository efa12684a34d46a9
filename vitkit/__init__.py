"""vitkit: adapt, accelerate, compress, explain and benchmark pretrained Vision Transformers (timm).

    import vitkit as vk
    model = vk.load("vit_small_patch16_224.augreg_in21k", num_classes=10)
    vk.adapt(model, "linear")
    print(vk.info(model))
"""
from __future__ import annotations

import os as _os
import sys as _sys
import types as _types

# OpenMP threads that spin while waiting make PyTorch many times slower on a shared or busy CPU (measured:
# 4.9 s -> 0.06 s for one training step of a tiny ViT on 2 cores). Effective only when vitkit is imported
# before torch (the CLI and the tests do); set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_torchao_enum_notice() -> None:
    """torchao (imported by PEFT and by vitkit.compress) registers Enums with torch's pytree, which logs a
    deprecation addressed to torchao's developers on every import: two warning lines in every LoRA run."""
    import logging

    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())


_quiet_torchao_enum_notice()

__version__ = "0.1.0"


# ---------------------------------------------------------------------------------------- verbs vs. subpackages
# `vk.explain`, `vk.bench`, `vk.compress`, `vk.adapt`, `vk.info` are functions, and `vitkit/explain/`,
# `vitkit/bench/`, ... are (sub)packages of the same names. Python's import system binds a submodule on its
# parent as an attribute (`setattr(vitkit, "compress", <module vitkit.compress>)`) the first time it is imported,
# so importing `vitkit.compress` after this file ran (the method registry's discovery does) replaced the function
# `vk.compress` by the module. And dotted paths through a verb (`import vitkit.bench.run as run`,
# `mock.patch("vitkit.bench.run.x")`, pytest's `monkeypatch.setattr("vitkit.explain.maps.f", ...)`) resolve
# attribute by attribute, so they reached the function and failed.
# The mechanism, without renaming anything:
# 1. the `vitkit` module object gets the class `_Package`, whose `__setattr__` refuses to let the import system
#    replace a function (a verb) by the submodule of the same name; the submodule stays in `sys.modules` and
#    imports as usual (`import vitkit.compress`, `from vitkit.bench import run`);
# 2. instead, the submodules of that package are set as attributes on the verb function itself
#    (`vk.bench.run is sys.modules["vitkit.bench.run"]`), and the package gets the class `_VerbPackage`, which
#    does the same for submodules imported later. So `vk.<verb>` is always the function, and a dotted path
#    `vitkit.<verb>.<submodule>...` leads to the submodule.
# A plain module shadowed by a verb (`vitkit/info.py` by `vk.info`) has no submodules: `from vitkit.info import
# Info` works; `import vitkit.info as m` gives the function, as it always did.
_VERB_OF: dict = {}  # "vitkit.bench" -> the function vk.bench


def _reach_through(verb, module: _types.ModuleType) -> None:
    """Make `module`'s submodules attributes of `verb` (now and, for a package, when imported later)."""
    _VERB_OF[module.__name__] = verb
    prefix = module.__name__ + "."
    for key, sub in list(_sys.modules.items()):
        if key.startswith(prefix) and "." not in key[len(prefix):] and sub is not None:
            verb.__dict__.setdefault(key[len(prefix):], sub)
    if hasattr(module, "__path__") and type(module) is _types.ModuleType:
        module.__class__ = _VerbPackage


class _VerbPackage(_types.ModuleType):
    """The class of a subpackage shadowed by a verb: a submodule bound on it is bound on the verb too."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, _types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            verb = _VERB_OF.get(self.__name__)
            if verb is not None:
                verb.__dict__[name] = value


class _Package(_types.ModuleType):
    """The class of the `vitkit` module: a submodule never replaces the function (verb) of the same name."""

    def __setattr__(self, name, value):
        current = self.__dict__.get(name)
        if (isinstance(value, _types.ModuleType) and value.__name__ == f"{self.__name__}.{name}"
                and callable(current) and not isinstance(current, _types.ModuleType)):
            _reach_through(current, value)
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

from .info import Info, info
from .io import save
from .models import TokenLayout, get_runner, load, token_layout
from .registry import Method, applied, methods
from . import data  # vk.data: datasets, transforms, splits
from .train import evaluate, fit
from . import assets as _assets  # registers embedded checkpoints
from .explain import attention, explain, segment, similarity_overlap  # vk.explain & co.
from .explain import segment_volume  # vk.segment_volume: 3-D masks from patch similarity
from .bench import bench  # vk.bench: backbones x methods x protocols
from . import robust  # vk.robust: the attack registry, AttackResult, pixel_transform
from .robust import attack  # vk.attack: pgd, fgsm, ...
from .distill import distill  # vk.distill: teacher -> student (kd, logit-cache, ...)
from .robust.swarm import audit  # vk.audit: the SWARM switchable-backdoor audit of prompt adapters
from .pretrain import pretrain  # vk.pretrain: continued self-supervised pre-training (mae, dino, ...)
from .models.stitch import stitch  # vk.stitch: two pretrained ViTs joined into one model with many routes
from .train.align import align  # vk.align: a new sensor's encoder aligned to a frozen ViT (InfoNCE)


def apply(model, name: str, **config):
    """Apply any registered method `name` with `config` (see `vk.methods()`); returns the same model."""
    from .registry import apply as _apply

    return _apply(model, name, **config)


def adapt(model, name: str, **config):
    """Apply a parameter-efficient adaptation method (kind `adapt`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="adapt", **config)


def accelerate(model, name: str, **config):
    """Apply a token-reduction method (kind `accelerate`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="accelerate", **config)


def compress(model, name: str, **config):
    """Apply a compression method (kind `compress`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="compress", **config)


def augment(model, name: str, **config):
    """Attach a training-time augmentation (kind `augment`: transmix, foraug) that `vk.fit` applies per batch."""
    from .registry import apply as _apply

    return _apply(model, name, kind="augment", **config)


__all__ = ["__version__", "load", "save", "info", "Info", "methods", "Method", "applied", "apply", "adapt",
           "accelerate", "compress", "token_layout", "TokenLayout", "get_runner", "data", "fit", "evaluate",
           "attention", "explain", "segment", "similarity_overlap", "bench",
           "segment_volume",
           "robust", "attack", "audit", "distill", "pretrain", "augment", "stitch", "align"]

for _name in __all__:  # verbs whose subpackage was imported while this file ran (explain, bench, info, ...)
    _value = globals()[_name]
    _module = _sys.modules.get(f"{__name__}.{_name}")
    if _module is not None and callable(_value) and not isinstance(_value, _types.ModuleType):
        _reach_through(_value, _module)
del _name, _value, _module
