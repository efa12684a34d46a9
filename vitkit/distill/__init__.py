"""Distillation: `vk.distill(teacher, student, data, method="kd", **config)` and `vitkit distill`.

    import vitkit as vk
    teacher = vk.load("vit_base_patch16_224.augreg_in21k_ft_in1k")
    student = vk.load("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    train = vk.data.image_folder("train/").with_transform(vk.data.transform(student, train=True))
    vk.distill(teacher, student, train, method="kd", alpha=0.5, temperature=2.0, epochs=10, out_dir="runs/kd")

The contract (what a method module is and what the machinery guarantees)
--------------------------------------------------------------------------
A distillation method is **one module** in this package, file name = registry name with `-` → `_`
(`kd.py`, `logit_cache.py`, `scalekd.py`), holding in this order:

1. a docstring (paper, claim, *Plugs in at*, *Hand-written here, and why*, *Differs from the reference*, docs page);
2. `@dataclass(frozen=True) class Config` with the paper's defaults, `metadata={"help": ...}` on every field,
   checks in `__post_init__` raising `ValueError` that names the method and field. Fields must not reuse `vk.fit`
   keywords (`epochs`, `lr`, `batch_size`, `seed`, ...): `vk.distill` hands those to `fit`; the training settings
   a paper prescribes go to `register(..., fit_defaults={"lr": 1e-4, ...})` (a caller's keyword wins);
3. a loss class, subclass of `DistillLoss` (an `nn.Module`):
   - `__init__(self, cfg, teacher, student, example)`: builds the method's **trainable parts** (projectors,
     denoiser, ...) as sub-modules; `example` is a batch of two training images (probe shapes with
     `taps(student, example, indices)` / `teacher.taps(example, indices)`). Refuse what it cannot handle here
     (`ValueError` / `NotImplementedError`, one line naming the method and the fix).
   - `forward(self, student, teacher, images, targets) -> Step(logits, loss, labels)`: runs the student (with
     gradient) and the teacher, returns the scalar loss, the student's logits and the labels the training
     accuracy counts against (either may be None). `targets` is what the dataset yields (class labels, or what
     `prepare_data` made).
   - optional `prepare_data(self, data, teacher, *, epochs, seed, batch_size, progress) -> dataset`: replace the
     training data (the logit cache writes its cache here and returns a replaying dataset; a dataset with
     `set_epoch(epoch)` gets it called by `fit` before each epoch).
   - optional class attribute `needs_teacher = False`: training needs no teacher forward (`teacher` may be None).
   Pure tensor math (losses, DCT, ...) lives in `losses.py` or `<method>_algo.py` (torch only).
4. the last line: `register("name", config=Config, loss=LossClass)`. Discovery imports every module of this
   package except `base`, `run`, `commands`, `losses` and `*_algo` / `*_layer` / `*_io`; so a new method appears in
   `vitkit.distill.methods()`, `vk.distill(method=...)`, `vitkit distill --help` and the benchmark by existing.

What the machinery guarantees to a method:
- **Teacher** (`base.Teacher`): `eval()` and `requires_grad_(False)` once, outside the module tree (never in the
  optimizer, DDP, checkpoints or `train()` mode); `teacher(images)` → logits and `teacher.taps(images, idx)` →
  (logits, [NCHW maps]) run under `no_grad` on the **student's augmented view**, re-normalised from the data's
  mean/std (read from the transform's `Normalize`) to the teacher's and resized to a fixed-size teacher's input.
  A method that needs gradients *through* the teacher (ScaleKD's parameter perception) calls `teacher.model`
  itself on `teacher.input(images)`; its parameters still get no gradient.
- **Taps** (`base.taps(model, images, indices)`): logits and `(B, C, H, W)` maps after ViT blocks or CNN stages
  (timm `forward_intermediates`, prefix tokens removed, negative indices from the end); ViT → ViT and
  ViT → CNN alike.
- **Training** (`run.distill`): the student and the loss are wrapped in `base.Distiller` and trained by
  `vk.fit` (`computes_loss = True`: `fit` calls `distiller(images, targets) -> (logits, loss, labels)`), so the
  loop, lr schedule, gradient accumulation, clipping, exact resume, checkpoints (student + loss trainable
  tensors), metrics and multi-process runs (`accelerate launch` / `torchrun`) are `fit`'s. The resume check
  includes the method and its config. After training the student is written with `vk.save` to
  `out_dir/model` (loadable with `vk.load`, usable as a `vitkit bench` backbone).

Methods: `kd` (logit + feature KD baseline), `logit-cache` (TinyViT's sparse teacher-logit cache). Docs:
`docs/distill.md`.
"""
from .base import Distiller, DistillLoss, DistillMethod, Step, Teacher, get, methods, register, taps
from .run import distill

distill.methods, distill.get = methods, get  # `vk.distill.methods()`: vk.distill is the function

__all__ = ["distill", "methods", "get", "register", "DistillMethod", "DistillLoss", "Distiller", "Step", "Teacher",
           "taps"]
