"""Bad input to explain / segment / datasets: one line naming the file or value and what to do, exit code != 0,
no traceback; a clear exception type from the API (issue 12 item 5, the image part)."""
from __future__ import annotations

import shutil

import pytest
import torch

import vitkit as vk
from vitkit.cli import main

from conftest import CIFAR_JPEG, require

EMBEDDED = ["--model", "vitkit/vit-tiny-cifar"]


@pytest.fixture
def files(tmp_path):
    good = require(CIFAR_JPEG) / "automobile" / "0001.jpg"
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])  # PIL opens it; decoding fails: "Truncated File Read"
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")  # UnidentifiedImageError
    return {"good": good, "truncated": truncated, "not_image": not_image}


def _one_line_error(capsys, *names):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "error:" in lines[0]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["truncated", "not_image"])
def test_explain_api_names_the_unreadable_file(files, case):
    model = vk.load("vitkit/vit-tiny-cifar")
    with pytest.raises(vk.data.CorruptImageError, match=f"{files[case].name}.*(replace|remove)"):
        vk.explain(model, files[case])
    with pytest.raises(vk.data.CorruptImageError, match=files[case].name):
        vk.segment(model, files[case], point=(1, 1))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        vk.explain(model, files[case].parent / "missing.jpg")


@pytest.mark.parametrize("case", ["truncated", "not_image"])
@pytest.mark.parametrize("command", ["explain", "segment"])
def test_cli_unreadable_image_is_one_line(files, case, command, capsys, tmp_path):
    extra = ["--point", "1,1"] if command == "segment" else []
    rc = main([command, str(files[case]), *EMBEDDED, *extra, "--out", str(tmp_path / "o.png")])
    assert rc != 0
    line = _one_line_error(capsys, files[case])
    assert "truncated" in line if case == "truncated" else "not an image" in line


@pytest.mark.parametrize("case", ["truncated", "not_image"])
def test_dataset_folder_unreadable_image(files, case, tmp_path, capsys):
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        shutil.copy(files["good"], root / cls / "0000.jpg")
    bad = root / "b" / f"1_{files[case].name}"
    shutil.copy(files[case], bad)
    ds = vk.data.image_folder(root)
    with pytest.raises(vk.data.CorruptImageError, match=f"{bad.name}.*skip_bad=True"):
        ds[2]
    with pytest.raises(vk.data.CorruptImageError, match=bad.name):
        vk.data.image_folder(root, preload=True)
    # read in a DataLoader worker: torch re-raises the error with the worker's traceback as its message
    loader = torch.utils.data.DataLoader(ds.with_transform(vk.data.transform(vk.load("vitkit/vit-tiny-cifar"))),
                                         batch_size=3, num_workers=1)
    with pytest.raises(vk.data.CorruptImageError) as err:
        list(loader)
    assert "\n" not in str(err.value) and bad.name in str(err.value)
    assert main(["eval", "vitkit/vit-tiny-cifar", "--data", str(root)]) != 0
    _one_line_error(capsys, bad)
    assert len(vk.data.image_folder(root, skip_bad=True)) == 2


def test_gradcam_target_out_of_range(files, capsys, tmp_path):
    model = vk.load("vitkit/vit-tiny-cifar")
    for method in ("gradcam", "grad_rollout"):
        with pytest.raises(ValueError, match="`target` 99 .* 10 classes"):
            vk.explain(model, files["good"], method=method, target=99)
        with pytest.raises(ValueError, match="`target` -1"):
            vk.explain(model, files["good"], method=method, target=-1)
    rc = main(["explain", str(files["good"]), *EMBEDDED, "--method", "gradcam", "--target", "99", "--out",
               str(tmp_path / "o.png")])
    assert rc != 0
    _one_line_error(capsys, "99", "0..9")
    assert not (tmp_path / "o.png").exists()


# --- bad values: one line naming the value, exit 2 (before: tracebacks, torch's messages, or a silent empty mask)

@pytest.mark.parametrize("command, extra, words", [
    ("explain", ["--method", "gradcam", "--layer", "99"], ["gradcam: `layer` 99 out of range", "6 blocks"]),  # exit 1
    ("explain", ["--mean", "0.5,0.5"], ["`mean` has 2 values", "3 channel"]),  # torch's "size of tensor a (3)..."
    ("explain", ["--std", "0"], ["`std` must be > 0"]),
    ("explain", ["--out", "heat.txt"], ["cannot write an image to", "heat.txt", ".png"]),
    ("explain", ["--out", "heat.npy"], ["cannot write an image to", "heat.npy"]),  # was: a PNG named .npy, overwritten
    ("segment", ["--point", "1,1", "--threshold", "2"], ["`threshold`", "[-1, 1]", "got 2.0"]),  # an empty mask
    ("segment", ["--point", "1,1", "--threshold", "nan"], ["`threshold`", "got nan"]),  # an empty mask
], ids=["gradcam-layer", "mean-length", "std-zero", "out-txt", "out-npy", "threshold-2", "threshold-nan"])
def test_cli_bad_value_is_one_line_exit_2(files, command, extra, words, capsys, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    out = [] if "--out" in extra else ["--out", "o.png"]
    assert main([command, str(files["good"]), *EMBEDDED, *out, *extra]) == 2
    _one_line_error(capsys, *words)
    assert not any((tmp_path / "run").iterdir())  # nothing written


def test_cli_display_must_be_positive(files, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["explain", str(files["good"]), *EMBEDDED, "--display", "0"])
    assert exit_.value.code == 2
    assert "--display: must be a positive number of pixels, got 0" in capsys.readouterr().err


def test_api_bad_selection_and_threshold_are_value_errors(images):
    from vitkit.explain.attention import attention, select

    model = vk.load("vitkit/vit-tiny-cifar")
    with pytest.raises(ValueError, match=r"attention: layer 3 was not captured \(captured: \[5\]\)"):
        select(attention(model, images, layers=[-1]), 3)  # was a KeyError: "internal error", exit 1 in the CLI
    with pytest.raises(ValueError, match="segment_volume: `threshold` must be in"):
        vk.segment_volume(model, torch.rand(8, 8, 8).numpy(), (1, 1, 1), patches=2, threshold=float("nan"))


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_a_layer_given_to_a_method_that_uses_every_layer_is_refused(images, method):
    """`layer=` used to be ignored silently by rollout (a map of every layer returned for the one asked)."""
    model = vk.load("vitkit/vit-tiny-cifar")
    with pytest.raises(ValueError, match=f"{method!r} does not take one"):
        vk.explain(model, images, method=method, layer=2)
    assert vk.explain(model, images, method="attention", layer=2).patch_map.shape[-2:] == (8, 8)
