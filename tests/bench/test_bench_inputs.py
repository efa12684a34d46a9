"""The input adapters in `vitkit bench` (issue 19: "the adapters appear in vitkit bench"): procedural tasks of
other inputs (`vk.data.procedural`), which chains run on which task, the RGB views the baseline takes, recipe
refusals, and a small run end to end."""
from __future__ import annotations

import pytest
import torch

import vitkit as vk
from vitkit.bench import RecipeError, bench, load_recipe
from vitkit.bench.run import TensorInput, build, cell_transform, task_data

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
BACKBONE = {"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}


def recipe(**overrides):
    base = {"backbones": [BACKBONE], "chains": ["lora"], "tasks": ["digits"], "protocols": ["finetune"],
            "budget": {"epochs": 1, "batch_size": 8}, "perf": False}
    return load_recipe({**base, **overrides})


def test_generators_are_seeded_class_blocked_and_balanced():
    for name, classes, shape in [("sounds", 8, (1, 32, 64)), ("tiles", 4, (10, 32, 32)), ("clips", 8, (3, 4, 32, 32)),
                                 ("pairs", 4, (6, 32, 32)), ("points", 8, (256, 3))]:
        a, b = vk.data.procedural(name, 3), vk.data.procedural(name, 3)
        assert tuple(a.samples.shape[1:]) == shape and torch.equal(a.samples, b.samples)
        assert a.targets == [c for c in range(classes) for _ in range(3)]
    assert not torch.equal(vk.data.procedural("pairs", 3, seed=1).samples, vk.data.procedural("pairs", 3).samples)
    from vitkit.data.generators import pairs

    vk.data.procedural("pairs", 3).samples.mul_(0)  # a caller's in-place edit must not reach a later call
    assert torch.equal(vk.data.procedural("pairs", 3).samples, pairs(3)[0])
    with pytest.raises(ValueError, match="unknown procedural task `clip`"):
        vk.data.procedural("clip")


def test_pairs_and_clips_carry_their_label_in_motion():
    """Each label is the displacement between the two images / the frames (a wrong sign or axis fails)."""
    x, y = vk.data.procedural("pairs", 2).samples, vk.data.procedural("pairs", 2).targets
    first, second = x[:, 0], x[:, 3]  # one channel of each image
    moves = {0: (0, -4), 1: (0, 4), 2: (-4, 0), 3: (4, 0)}  # (rows, columns): left, right, up, down
    for i, label in enumerate(y):
        dy, dx = moves[label]
        assert torch.equal(torch.roll(first[i], shifts=(dy, dx), dims=(0, 1)), second[i])


def test_chains_run_on_their_input_and_image_chains_on_views():
    r = recipe(chains=["lora", "spectrogram", "points"], tasks=["digits", "sounds", "points"], perf=True)
    ran = {(c.chain.label, c.task.name, c.protocol) for c in r.cells()}
    assert ran == {("baseline", "digits", "finetune"), ("baseline", "sounds", "finetune"),
                   ("lora", "digits", "finetune"), ("lora", "sounds", "finetune"),
                   ("spectrogram", "sounds", "finetune"), ("points", "points", "finetune"),
                   ("baseline", "digits", "perf"), ("lora", "digits", "perf"),
                   ("spectrogram", "sounds", "perf"), ("points", "points", "perf")}
    assert [t.train for t in r.tasks] == [800, 20, 20]  # procedural tasks default to 20 / 20 per class


def test_all_chains_take_the_input_adapters_whose_task_is_listed():
    names = {c.label for c in recipe(chains="all").chains}
    assert "lora" in names and not names & {"spectrogram", "channels", "video", "paired", "points"}
    names = {c.label for c in recipe(chains="all", tasks=["clips"]).chains}
    assert "video" in names and not names & {"spectrogram", "channels", "paired", "points"}


@pytest.mark.parametrize("overrides,message", [
    ({"chains": ["video"]}, "add the task `clips`"),
    ({"chains": ["video+points"], "tasks": ["clips"]}, "a chain takes one kind of input"),
    ({"chains": ["channels:bands=[B04,B03,B02]"], "tasks": ["tiles"]}, "the tiles' bands are"),
    ({"chains": ["video:num_frames=2"], "tasks": ["clips"]}, "must be at least 4"),
    ({"tasks": ["sounds"], "protocols": ["quality"]}, "quality work on images"),
    ({"tasks": ["sounds"], "ood": ["invert"]}, "ood work on images"),
    ({"tasks": [{"name": "sounds", "train": 0}]}, "must be >= 1 samples per class"),
])
def test_recipe_refuses_what_cannot_run(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        recipe(**overrides)


@pytest.mark.parametrize("task,adapter", [("sounds", "spectrogram"), ("tiles", "channels"), ("pairs", "paired")])
def test_adapter_at_init_on_its_input_equals_the_baseline_on_the_view(task, adapter):
    """Through the bench's own cells and transforms: the spectrogram adapter's 1-channel sum on the spectrogram
    equals the RGB model on the replicated channel; `channels` (other bands zero) equals the RGB model on B04 B03
    B02; `paired` (second image's kernels zero) equals the RGB model on the first image. A wrong view (band order,
    the second image, the channel) fails."""
    cells = {c.chain.label: c for c in recipe(chains=[f"{adapter}:train_head=false"], tasks=[task]).cells()}
    base_cell, cell = cells["baseline"], cells[f"{adapter}:train_head=false"]
    samples = task_data(cell.task)[1]
    base = build(base_cell, num_classes=len(samples.classes)).eval()
    model = build(cell, num_classes=len(samples.classes)).eval()
    x = torch.stack([samples.with_transform(cell_transform(cell, model))[i][0] for i in range(4)])
    xv = torch.stack([samples.with_transform(cell_transform(base_cell, base))[i][0] for i in range(4)])
    assert xv.shape[1] == 3 and x.shape[1] != 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(xv), atol=1e-5, rtol=1e-4)


def test_tensor_input_resizes_spatial_dimensions_only():
    clip = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).view(2, 4, 8, 8)
    out = TensorInput(None, (16, 16))(clip)
    want = torch.nn.functional.interpolate(clip, size=(16, 16), mode="bilinear", align_corners=False)
    assert out.shape == (2, 4, 16, 16) and torch.equal(out, want)
    assert torch.equal(TensorInput(lambda x: x.mean(1), None)(clip), clip.mean(1))


def test_bench_runs_input_adapters_end_to_end_and_resumes(tmp_path, monkeypatch):
    import functools

    from vitkit.bench import perf

    monkeypatch.setattr(perf, "compare", functools.partial(perf.compare, rounds=1, min_iters=1, min_seconds=0.0,
                                                           warmup=1))
    r = recipe(chains=["video:num_frames=4", "points:num_groups=8,group_size=8"],
               tasks=[{"name": "clips", "train": 2, "eval": 2}, {"name": "points", "train": 2, "eval": 2}], perf=True)
    result = bench(r, out=tmp_path / "run", progress=False)
    rows = {(x["chain"], x["task"], x["protocol"]): x for x in result.rows}
    assert all(x["status"] == "ok" for x in rows.values()), [x.get("error") for x in rows.values()]
    video = rows[("video:num_frames=4", "clips", "finetune")]
    assert video["baseline_acc"] == rows[("baseline", "clips", "finetune")]["acc"]
    assert video["delta_acc"] is not None and video["task_input"].startswith("clips")
    points = rows[("points:num_groups=8,group_size=8", "points", "finetune")]
    assert points["baseline_acc"] is None and points["n_eval"] == 16
    point_perf = rows[("points:num_groups=8,group_size=8", "points", "perf")]
    assert point_perf["baseline_input"].startswith("blank images") and point_perf["gmacs"] > 0
    table = result.table()
    assert "*Procedural* clips (3, 4, 32, 32)" in table and "the frame average" in table
    again = bench(r, out=tmp_path / "run", progress=False)
    assert again.computed == []
