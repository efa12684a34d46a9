"""Every `vk.<verb>` is the function, also after the registry's discovery and after every subpackage has been
imported, and every (sub)module imports, also through a dotted path that passes a verb (issue 12 item 12)."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

import vitkit as vk

from conftest import make_variant

VERBS = ("load", "save", "info", "methods", "apply", "adapt", "accelerate", "compress", "fit", "evaluate",
         "attention", "explain", "segment", "similarity_overlap", "bench", "token_layout", "get_runner")
ROOT = Path(__file__).resolve().parents[1]


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(vk.__path__, "vitkit.")]


def test_verbs_are_functions_after_discovery_and_imports(tmp_path):
    vk.methods()  # discovery imports vitkit.adapt.*, vitkit.tokens.*, vitkit.compress
    for name in _all_modules():
        importlib.import_module(name)
    for verb in VERBS:
        assert isinstance(getattr(vk, verb), types.FunctionType), (verb, type(getattr(vk, verb)))
    model = make_variant("plain", depth=2)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="adapt method"):
        vk.compress(model, "linear")  # the function runs: `linear` is not a compression method
    vk.adapt(model, "linear")
    vk.accelerate(model, "tome", r=1)
    assert [a.name for a in vk.applied(model)] == ["linear", "tome"]
    assert vk.info(model).trainable_params > 0
    assert vk.explain(model, x, method="rollout").patch_map.shape == (1, 8, 8)
    assert vk.segment(model, x, point=(3, 3)).patch == (0, 0)
    assert 1 in vk.attention(model, x)
    with pytest.raises(ValueError, match="backbone `no_such_model`"):  # the function runs: the recipe is checked
        vk.bench({"backbones": ["no_such_model"]}, out=tmp_path / "bench", progress=False)


def test_every_module_imports_by_every_form():
    for name in _all_modules():
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        exec(f"from {parent} import {leaf} as imported", ns := {})
        if isinstance(ns["imported"], types.ModuleType):
            assert ns["imported"] is module
        if name.count(".") >= 2:  # import a.b.c as m: attribute by attribute, through a verb when b is one
            exec(f"import {name} as imported", ns := {})
            got = ns["imported"]
            assert got is module or not isinstance(got, types.ModuleType) and name.rpartition(".")[2] in \
                vars(sys.modules[parent]), name
    import vitkit.bench.run as run
    import vitkit.explain.attention as attention

    assert isinstance(run, types.ModuleType) and isinstance(attention, types.ModuleType)
    from vitkit.bench import run as run2

    assert run2 is run and vk.bench.run is run and vk.explain.attention is attention
    with mock.patch("vitkit.bench.run.read_rows", return_value=[]) as patched:
        assert sys.modules["vitkit.bench.run"].read_rows is patched
    assert pkgutil.resolve_name("vitkit.explain.maps:explain") is vk.explain


@pytest.mark.slow
def test_compress_is_the_function_after_discovery_in_a_fresh_interpreter():
    code = ("import types, vitkit as vk; vk.methods(); import vitkit.compress, vitkit.explain.attention as a, "
            "vitkit.bench.run as r; assert isinstance(vk.compress, types.FunctionType), type(vk.compress); "
            "assert isinstance(vk.explain, types.FunctionType) and isinstance(vk.bench, types.FunctionType); "
            "assert isinstance(a, types.ModuleType) and isinstance(r, types.ModuleType); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
