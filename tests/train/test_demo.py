"""`vitkit demo`: every registered adapt method runs with the same budget; a failing method is a row, not a crash."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import vitkit as vk
from vitkit import registry
from vitkit.train.demo import DemoConfig, run_demo


@dataclass(frozen=True)
class _BrokenConfig:
    pass


def _broken_apply(model, cfg):
    raise RuntimeError("this method always fails")


@pytest.mark.slow
def test_demo_runs_every_adapt_method_and_reports_failures(tmp_path, monkeypatch):
    registry.METHODS.discover()
    monkeypatch.setitem(registry.METHODS.entries, "zz-broken", registry.Method("zz-broken", "adapt", _BrokenConfig,
                                                                               _broken_apply, None, "always fails"))
    cfg = DemoConfig(train_per_class=3, test_per_class=2, epochs=1, batch_size=16)
    summary = run_demo(cfg, tmp_path, progress=False)
    names = [r["method"] for r in summary["rows"]]
    assert names == [m.name for m in vk.methods("adapt")  # methods added later appear by existing; input
                     if not getattr(m.config, "INPUT", None)  # adapters (docs/applications.md) take no images
                     and not getattr(m.config, "OUTPUT", None)], names  # dense predicts maps, not classes
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["zz-broken"]["status"] == "error" and "always fails" in rows["zz-broken"]["error"]
    assert rows["linear"]["status"] == "ok" and rows["full"]["status"] == "ok"
    assert rows["linear"]["trainable_params"] == 128 * 10 + 10  # the new head: D * classes + classes
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["linear"]["adapter_bytes"] < rows["full"]["adapter_bytes"] / 20  # adapters alone stay small
    for name in ("results.json", "results.md", "accuracy_vs_params.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["method"] == names[0]
    assert "error: RuntimeError" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_cli_help():
    from vitkit.cli import build_parser

    parser = build_parser()
    for command in ("train", "eval", "demo"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0


def test_demo_table_with_an_error_row_fits_80_columns(monkeypatch, capsys):
    from vitkit.train.demo import print_table

    monkeypatch.setenv("COLUMNS", "80")
    ok = {"status": "ok", "accuracy": 0.8771, "lr": 1e-3, "trainable_params": 811_146, "adapter_bytes": 3_254_784,
          "train_time_s": 11.5, "inference_img_per_s": 1166.0}
    rows = [{"method": "adaptformer", **ok}, {"method": "linear", **ok, "accuracy": 0.5},
            {"method": "zz-broken", "status": "error", "error": "RuntimeError: " + "a long reason " * 12}]
    print_table({"model": "vitkit/vit-tiny-cifar", "total_time_s": 64.0, "rows": rows})
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    table = [line for line in lines if line.startswith("│")]
    assert "0.877" in table[0] and "811,146" in table[0] and "3178.5 KiB" in table[0] and "…" not in "".join(table), out
    assert "zz-broken: RuntimeError: a long reason" in out  # the whole message, below the table
