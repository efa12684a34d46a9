"""`vk.save` / `vk.load(folder)`: a base reference, the applied methods, and only the tensors that changed.

A save folder holds `vitkit.json` (base model reference: timm name with pretrained tag, the sha256 of a weights
file, or for a model vitkit did not load its timm name and a digest of its weights; the applied methods with
their configs; the head's class count and pooling, replayed with `reset_classifier` before the methods; the
preprocessing; the vitkit version; the sha256 of the weights file) and `weights.safetensors`
with the tensors that differ from the base (trained, changed, or added by methods). A base that cannot be
rebuilt exactly (random initialisation) is saved whole. A save is all-or-nothing: both files are written and
fsynced in a temporary folder beside the target, which then replaces the target in one atomic exchange, so a
crash at any point leaves either the previous save or the new one, never a mixed pair.
`vk.save(model, dir, format="peft")` writes a PEFT adapter folder instead (`vitkit/interchange.py`).
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from . import registry


def _file_sha256(path) -> str:
    from .models.loading import sha256_file  # at call time, like the other loading imports of this module

    return sha256_file(path)

MANIFEST = "vitkit.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", "vitkit_base.json")
OWN_FILES = {MANIFEST, WEIGHTS, *PEFT_FILES}  # what a save folder may hold; anything else is the user's


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def base_key(key: str) -> str:
    """Key of a tensor in the base model: wrappers keep the wrapped layer as `base_layer` (PEFT convention);
    a weight under a `torch.nn.utils.parametrize` parametrisation (pruning masks) keeps it as `original`."""
    return key.replace(".base_layer.", ".").replace(".parametrizations.weight.original", ".weight")


def changed_state(model: nn.Module, digests: dict | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors to save (those that differ from the base) and whether that is the whole model. `digests`, when
    given, is filled with the digest of every tensor kept unsaved (keyed as in the base)."""
    from .models.loading import tensor_digest

    hashes = model.__dict__.get("_vitkit_base_hashes")
    state = model.state_dict()
    if hashes is None:
        return state, True
    changed = {}
    for k, v in state.items():
        digest = tensor_digest(v)
        if hashes.get(base_key(k)) != digest:
            changed[k] = v
        elif digests is not None:
            digests[base_key(k)] = digest
    return changed, False


def save(model: nn.Module, path: str | os.PathLike, format: str = "vitkit") -> Path:
    """Save `model` to folder `path`: manifest + changed tensors (adapters alone stay small).

    Args:
        model: a model from `vk.load`, or any timm ViT (`timm.create_model(...)`): methods applied with
            `vk.adapt`/`vk.apply` are then saved alone against a digest of its weights, to be loaded back with
            `vk.load(path, base=the_same_base)`; a model with no method applied is saved whole.
        path: the folder (created, or replaced if it holds an earlier save).
        format: "vitkit" (default), or "peft" for a PEFT adapter folder (`PeftModel.from_pretrained` reads
            it; LoRA only, see docs/interchange.md).
    """
    if format == "peft":
        from .interchange import save_peft

        return save_peft(model, path)
    if format != "vitkit":
        raise ValueError(f"vk.save: `format` must be 'vitkit' or 'peft', got {format!r}")
    if getattr(model, "vitkit_unsavable", None):
        raise ValueError(f"vk.save: {model.vitkit_unsavable}")
    from safetensors.torch import save_file

    from . import __version__
    from .models import loading

    base = model.__dict__.get("_vitkit_base")
    if base is None:  # a model vitkit did not load and no method was applied through vk: save it whole
        base = loading.module_base(model)
        tensors, full = model.state_dict(), True
    else:
        unsaved: dict[str, str] = {}
        tensors, full = changed_state(model, unsaved)
    manifest = {
        "format": FORMAT,
        "vitkit_version": __version__,
        "base": base,
        "methods": [{"name": a.name, "config": registry.config_dict(a.config)} for a in registry.applied(model)],
        "weights": "full" if full else "changed",
        "tensors": sorted(tensors),
        "data_config": loading.data_config_of(model),
    }
    if hasattr(model, "reset_classifier") and isinstance(getattr(model, "num_classes", None), int):
        # the head as it is now: `model.reset_classifier(n)` after vk.load leaves the base's class count behind
        pool = getattr(model, "global_pool", None)  # a ViT's pooling name (a CNN's is a module: not replayed)
        manifest["head"] = {"num_classes": model.num_classes, "global_pool": pool if isinstance(pool, str) else None}
    if not full:
        manifest["base_tensors"] = unsaved
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def write_manifest(tmp: str) -> None:
        manifest["weights_sha256"] = _file_sha256(Path(tmp).with_name(WEIGHTS))
        Path(tmp).write_text(json.dumps(manifest, indent=2, default=str))

    return write_folder(path, {WEIGHTS: lambda tmp: save_file(tensors, tmp), MANIFEST: write_manifest})


def write_folder(path: str | os.PathLike, writers: dict[str, Callable[[str], None]]) -> Path:
    """Write every file of a save folder at once: each `writers[name](tmp_path)` in order inside a fresh
    temporary folder beside `path`, fsync, then swap it with `path` in one atomic exchange (`renameat2`
    RENAME_EXCHANGE; where the system lacks it, two renames, with the previous save kept beside until the
    second is done). An existing `path` must hold nothing but an earlier save."""
    path = Path(path)
    if path.is_symlink():  # replace the folder it points to, not the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"vk.save: {path} is a file; pass a folder path")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise ValueError(f"vk.save: {path} holds files that are not part of a save ({', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''}); save into a new or empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the permissions mkdir would
        for name, write in writers.items():
            write(str(tmp / name))
            os.chmod(tmp / name, 0o666 & ~umask)
            _fsync(tmp / name)
        _fsync(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the previous save
        else:
            old = path.parent / f".{path.name}.previous"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def load_dir(path: str | os.PathLike, base: Any = None, **overrides) -> nn.Module:
    """Rebuild a saved model: base, then each method in order, then the saved tensors.

    Args:
        path: a folder written by `vk.save` (or a PEFT adapter folder, see `vitkit.interchange.load_peft`).
        base: load onto this base instead of the recorded one: a timm name, a weights file, or an `nn.Module`
            (copied, not changed). Its weights must be those the save was made on (a digest of every tensor
            the save relies on), else a `ValueError` names both and the tensors that differ.
        **overrides: `num_classes`, preprocessing (`mean`, `std`, ...) or timm arguments replacing recorded ones.
    """
    from safetensors.torch import load_file

    from .info import classifier_names
    from .models import loading

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / MANIFEST).is_file():
        from .interchange import load_peft

        return load_peft(path, base=base, **overrides)
    if not (path / MANIFEST).is_file():
        previous = path.parent / f".{path.name}.previous"
        hint = (f"; an interrupted vk.save left the previous save in {previous}: rename it to {path.name}"
                if (previous / MANIFEST).is_file() else "")
        raise FileNotFoundError(f"{path} is not a vitkit save folder (no {MANIFEST}){hint}")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("weights_sha256") and _file_sha256(path / WEIGHTS) != manifest["weights_sha256"]:
        raise ValueError(f"{path}: {WEIGHTS} is not the file {MANIFEST} was written with (sha256 differs); the "
                         "folder was changed after vk.save: save again")
    data = {k: overrides.pop(k) for k in loading.DATA_KEYS if k in overrides}
    recorded = manifest["base"]
    model_args = {**recorded.get("model_args", {}), **overrides}
    if isinstance(base, nn.Module):
        if registry.applied(base):
            raise ValueError(f"vk.load({str(path)!r}, base=...): the base already has methods applied "
                             f"({', '.join(a.name for a in registry.applied(base))}); pass the model as it was "
                             "before adaptation")
        model = copy.deepcopy(base)
    elif base is not None:
        model = loading.load(base, arch=recorded.get("arch"), **model_args)
    elif recorded["kind"] == "timm":
        model = loading.load_timm(recorded["name"], pretrained=recorded["pretrained"], **model_args)
    elif recorded["kind"] == "embedded":
        model = loading.load(recorded["name"], pretrained=recorded.get("pretrained", True), **model_args)
    elif recorded["kind"] == "module":
        model = _module_base(path, recorded, manifest["weights"] == "full", model_args)
    else:
        file = Path(recorded["path"])
        if not file.is_file():
            raise FileNotFoundError(f"{path}: base weights {file} are gone; pass base='path/to/the/same/file'")
        model = loading.load_file(file, arch=recorded.get("arch"), **model_args)
    if manifest["weights"] != "full":
        _check_base(path, manifest, model)
    _replay_head(model, manifest.get("head"), "num_classes" in overrides)
    data = {**_tuples(manifest.get("data_config", {})), **data}
    chans = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", None)
    # input adapters (channels, spectrogram) change the channel count: their mean/std are set after the methods
    early = {k: v for k, v in data.items() if k not in ("mean", "std") or not isinstance(v, tuple) or len(v) == chans}
    loading.set_data_config(model, **early)
    for entry in manifest["methods"]:
        registry.apply(model, entry["name"], **entry["config"])
    loading.set_data_config(model, **{k: v for k, v in data.items() if k not in early})
    tensors = load_file(str(path / WEIGHTS))
    expected = model.state_dict()
    heads = classifier_names(model)  # a CNN's `fc`, say
    new_head = [k for k in tensors if "num_classes" in overrides and (k.startswith(("head.", "head_dist.")) or
                                                                      k in heads)
                and k in expected and expected[k].shape != tensors[k].shape]
    for key in new_head:  # another class count asked for (e.g. a bench task): the rebuilt model keeps a new head
        tensors.pop(key)
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in tensors if k in expected and expected[k].shape != tensors[k].shape]
    if unexpected or shapes:
        raise ValueError(f"{path}: saved tensors do not fit the rebuilt model: unexpected {unexpected[:5]} "
                         f"({len(unexpected)}), shape mismatch {shapes[:5]} ({len(shapes)})")
    model.load_state_dict(tensors, strict=manifest["weights"] == "full" and not new_head)
    return model


def _replay_head(model: nn.Module, head: dict | None, new_classes: bool) -> None:
    """`model.reset_classifier` as the saved model had it (class count, pooling), before the methods are applied,
    unless the caller asked for another class count (`new_classes`: then only the pooling)."""
    if not head or not hasattr(model, "reset_classifier"):
        return
    classes = model.num_classes if new_classes else head["num_classes"]
    pool = head.get("global_pool")
    pool = None if pool == getattr(model, "global_pool", None) else pool  # None: keep the model's pooling
    if classes != model.num_classes or pool is not None:
        model.reset_classifier(classes, pool)


def _module_base(path: Path, recorded: dict, full: bool, model_args: dict) -> nn.Module:
    """The base of a save made from a model vitkit did not load: rebuilt from its timm name (random weights
    for a whole save; pretrained, then checked by digest, for a save of the changes only)."""
    from .models import loading

    name = recorded.get("name")
    if not name:
        raise ValueError(f"{path} was saved from a model with no timm name; pass the model it was made from: "
                         f"vk.load({str(path)!r}, base=model)")
    if full:
        model = loading.load_timm(name, pretrained=False, **model_args)
    else:
        try:
            model = loading.load_timm(name, pretrained=True, **model_args)
        except loading.HubUnreachableError:
            raise loading.HubUnreachableError(
                f"{path} holds only the changes to a `{name}` model that vitkit did not load, and its pretrained "
                f"weights cannot be downloaded; pass the base: vk.load({str(path)!r}, base=model)") from None
    model.__dict__.pop("_vitkit_base", None)
    model.__dict__.pop("_vitkit_base_hashes", None)
    loading.record_module_base(model)
    return model


def _check_base(path: Path, manifest: dict, model: nn.Module) -> None:
    """Refuse a base whose tensors differ from those the save relies on (every tensor it did not save)."""
    recorded = manifest["base"]
    if manifest.get("base_tensors") is None:  # saves before base_tensors was recorded: the whole-base digest
        got = (model.__dict__.get("_vitkit_base") or {}).get("digest")
        if got != recorded.get("digest"):
            raise ValueError(f"{path} was saved on base {_describe(recorded)} (digest {recorded.get('digest')}) but "
                             f"is being loaded onto {_describe(model.__dict__.get('_vitkit_base') or {})} (digest "
                             f"{got}): not the same weights")
        return
    check_base_tensors(path, manifest, model, set(manifest["tensors"]))


def check_base_tensors(path: Path, record: dict, model: nn.Module, saved: set[str]) -> None:
    """`record["base_tensors"]` (key -> digest of every base tensor not saved) must match `model`'s tensors."""
    from .models import loading

    want = record["base_tensors"]
    have = loading.unsaved_hashes(model.state_dict(), saved)
    have = {k: v for k, v in have.items() if k in want}  # others are replaced by saved tensors or unused
    if have != want:
        differ = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        missing = sorted(want.keys() - have.keys())
        parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                 for label, keys in (("different values:", differ), ("missing:", missing)) if keys]
        got = model.__dict__.get("_vitkit_base") or {"name": "the given model"}
        raise ValueError(f"{path} was saved on base {_describe(record['base'])} (digest "
                         f"{loading.hashes_digest(want)}) but is being loaded onto {_describe(got)} (digest "
                         f"{loading.hashes_digest(have)}): not the same weights; tensors " + "; ".join(parts))


def _tuples(cfg: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _describe(base: dict) -> str:
    return base.get("name") or base.get("path") or base.get("kind", "?")
