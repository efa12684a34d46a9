"""`vk.save` / `vk.load(folder)`: a base reference, the applied methods, and only the tensors that changed.

A save folder holds `vitkit.json` (base model reference: timm name with pretrained tag, or the sha256 of a
weights file; the applied methods with their configs; the vitkit version) and `weights.safetensors` with the
tensors that differ from the base (trained, changed, or added by methods). A base that cannot be rebuilt
exactly (random initialisation) is saved whole. Every file is written atomically: temporary file, then rename.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import registry

MANIFEST = "vitkit.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1


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
    """Key of a tensor in the base model: wrappers keep the wrapped layer as `base_layer` (PEFT convention)."""
    return key.replace(".base_layer.", ".")


def changed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors to save (those that differ from the base) and whether that is the whole model."""
    from .models.loading import tensor_digest

    hashes = model.__dict__.get("_vitkit_base_hashes")
    state = model.state_dict()
    if hashes is None:
        return state, True
    return {k: v for k, v in state.items() if hashes.get(base_key(k)) != tensor_digest(v)}, False


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save `model` to folder `path`: manifest + changed tensors (adapters alone stay small)."""
    from safetensors.torch import save_file

    from . import __version__

    base = model.__dict__.get("_vitkit_base")
    if base is None:
        raise ValueError("vk.save: this model has no base reference; create it with vk.load(...) so that vitkit "
                         "knows which weights it started from")
    tensors, full = changed_state(model)
    manifest = {
        "format": FORMAT,
        "vitkit_version": __version__,
        "base": base,
        "methods": [{"name": a.name, "config": registry.config_dict(a.config)} for a in registry.applied(model)],
        "weights": "full" if full else "changed",
        "tensors": sorted(tensors),
    }
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write(path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, default=str)))
    return path


def load_dir(path: str | os.PathLike, base: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Rebuild a saved model: base, then each method in order, then the saved tensors.

    Args:
        path: a folder written by `vk.save`.
        base: load onto this base instead of the recorded one (a timm name or weights file); it must be the
            same weights, else a `ValueError` names both.
    """
    from safetensors.torch import load_file

    from .models import loading

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a vitkit save folder (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    recorded = manifest["base"]
    model_args = {**recorded.get("model_args", {}), **overrides}
    if base is not None:
        model = loading.load(base, arch=recorded.get("arch"), **model_args)
    elif recorded["kind"] == "timm":
        model = loading.load_timm(recorded["name"], pretrained=recorded["pretrained"], **model_args)
    elif recorded["kind"] == "embedded":
        model = loading.load(recorded["name"], pretrained=recorded.get("pretrained", True), **overrides)
    else:
        file = Path(recorded["path"])
        if not file.is_file():
            raise FileNotFoundError(f"{path}: base weights {file} are gone; pass base='path/to/the/same/file'")
        model = loading.load_file(file, arch=recorded.get("arch"), **model_args)
    got = model.__dict__["_vitkit_base"]
    if manifest["weights"] != "full" and got.get("digest") != recorded.get("digest"):
        raise ValueError(f"{path} was saved on base {_describe(recorded)} (digest {recorded.get('digest')}) but is "
                         f"being loaded onto {_describe(got)} (digest {got.get('digest')}): not the same weights")
    for entry in manifest["methods"]:
        registry.apply(model, entry["name"], **entry["config"])
    tensors = load_file(str(path / WEIGHTS))
    expected = model.state_dict()
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in tensors if k in expected and expected[k].shape != tensors[k].shape]
    if unexpected or shapes:
        raise ValueError(f"{path}: saved tensors do not fit the rebuilt model: unexpected {unexpected[:5]} "
                         f"({len(unexpected)}), shape mismatch {shapes[:5]} ({len(shapes)})")
    model.load_state_dict(tensors, strict=manifest["weights"] == "full")
    return model


def _describe(base: dict) -> str:
    return base.get("name") or base.get("path") or base.get("kind", "?")
