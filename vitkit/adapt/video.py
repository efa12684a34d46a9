"""Video: an image-pretrained ViT on clips, by inflating its patch embedding to tubelets (Conv2d -> Conv3d).

Paper: *VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking* (Wang et al., CVPR 2023,
arXiv:2303.16727), on the ViViT / VideoMAE tubelet embedding; kernel inflation from I3D (Carreira & Zisserman,
CVPR 2017) and ViViT's "central frame" initialisation (Arnab et al., ICCV 2021, arXiv:2103.15691).

Claim implemented: a clip `(B, C, T, H, W)` is cut into tubelets of `t` frames x P x P pixels by a Conv3d whose
kernel is the pretrained 2-D kernel replicated over the `t` frames and divided by `t` (`init="replicate"`, I3D) or
placed in the centre frame with zeros around (`init="centre"`, ViViT); each token gets the pretrained 2-D position
embedding of its patch plus a temporal position embedding of its time slot, initialised to zero. So on a static
clip every time slot's tokens are exactly the image's tokens: with one time slot (`T = t`) the model is the 2-D
model; with more, a model without prefix tokens (average pooling) still gives the image's outputs (attention over
T' identical copies of every key is unchanged); a class token sees its own key once among T' copies of the
patches, so it moves. Tokens run through the pretrained blocks unchanged (joint space-time attention); the token
grid recorded for token methods and `forward_intermediates` is the time slots stacked vertically, (T'·gh, gw).
`vitkit.pretrain` objective `video-mae` (tube masking) continues pretraining on clips.

Plugs in at: the whole patch embedding (`vitkit.models.inflate.install_embed`, a `Tubelets` module) and the
model's `_pos_embed`. Composes with LoRA / VPT / ToMe (they act on the token sequence, whatever its length).
Trainable: the tubelet embedding and the temporal position embedding (`train_embed`) and the head.
Hand-written here, and why: no maintained library inflates a timm ViT to clips (timm has no video ViT;
VideoMAE V2's code builds its own model from scratch). Differs from the reference: VideoMAE uses a fixed sin-cos
position embedding over (T', gh, gw) trained from scratch; here the pretrained 2-D embedding is kept and only
time is learned. Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from vitkit.models.inflate import check_ndim, grid_pos_at, input_conv, install_embed
from vitkit.registry import register

from ._common import earlier_trainable, freeze_except


@dataclass(frozen=True)
class Config:
    INPUT: ClassVar[str] = "clips (B, C, T, H, W)"  # bench: its procedural task only
    num_frames: int = field(default=16, metadata={"help": "clip length T in frames (VideoMAE: 16); shorter clips "
                                                          "(multiples of `tubelet`) are accepted"})
    tubelet: int = field(default=2, metadata={"help": "frames t per tubelet (VideoMAE: 2)"})
    init: Literal["replicate", "centre"] = field(default="replicate", metadata={
        "help": "replicate: the 2-D kernel on every frame, divided by t (I3D); centre: on the centre frame, zeros "
                "elsewhere (ViViT)"})
    train_embed: bool = field(default=True, metadata={
        "help": "train the tubelet embedding and the temporal position embedding"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's video "
                "task, with `full`; not swept)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})

    def __post_init__(self):
        if self.tubelet < 1 or self.num_frames < self.tubelet or self.num_frames % self.tubelet:
            raise ValueError(f"video: `num_frames` ({self.num_frames}) must be a positive multiple of `tubelet` "
                             f"({self.tubelet})")


class Tubelets(nn.Module):
    """Clips `(B, C, T, H, W)` -> tubelet tokens `(B, T/t, gh, gw, D)` (Conv3d), + space and time positions."""

    def __init__(self, patch_embed: nn.Module, cfg: Config):
        super().__init__()
        conv = patch_embed.proj
        (ph, pw), t = tuple(conv.kernel_size), cfg.tubelet
        self.proj = nn.Conv3d(conv.in_channels, conv.out_channels, (t, ph, pw), (t, ph, pw),
                              bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            w = torch.zeros_like(self.proj.weight)
            if cfg.init == "replicate":
                w.copy_(conv.weight.unsqueeze(2).expand_as(w) / t)
            else:
                w[:, :, t // 2] = conv.weight
            self.proj.weight.copy_(w)
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)
        self.norm = patch_embed.norm
        self.num_frames, self.tubelet, self.in_chans = cfg.num_frames, t, conv.in_channels
        slots, (gh, gw) = cfg.num_frames // t, patch_embed.grid_size
        self.time_embed = nn.Parameter(torch.zeros(1, slots, conv.out_channels, device=conv.weight.device,
                                                   dtype=conv.weight.dtype))
        self.patch_size, self.grid_size, self.num_patches = (ph, pw), (slots * gh, gw), slots * gh * gw
        self.img_size = (slots * gh * ph, gw * pw)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        check_ndim(x, 5, f"clips (B, {self.in_chans}, T, H, W)", "video")
        _, c, frames, h, w = x.shape
        (ph, pw), t = self.patch_size, self.tubelet
        if c != self.in_chans or frames % t or frames > self.num_frames or h % ph or w % pw:
            raise ValueError(f"video: expected clips (B, {self.in_chans}, T, H, W) with T a multiple of {t} up to "
                             f"{self.num_frames} and H, W multiples of {ph}x{pw}, got {tuple(x.shape)}")
        return (frames // t * h // ph, w // pw)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A blank clip of the configured size (`vk.info` counts FLOPs on it)."""
        gh, (ph, pw) = self.grid_size[0] // (self.num_frames // self.tubelet), self.patch_size
        return self.proj.weight.new_zeros(batch, self.in_chans, self.num_frames, gh * ph, self.grid_size[1] * pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> (B, T', gh, gw, D)
        self.token_grid(x)
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))

    def position(self, out: torch.Tensor, model: nn.Module) -> torch.Tensor:
        B, T, gh, gw, D = out.shape
        pos = grid_pos_at(model, (gh, gw)).reshape(1, 1, gh, gw, D)
        return (out + pos + self.time_embed[:, :T, None, None]).reshape(B, T * gh * gw, D)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    input_conv(model, "video")
    keep = earlier_trainable(model)
    install_embed(model, Tubelets(model.patch_embed, cfg), "video")
    train = {f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()} if cfg.train_embed else set()
    freeze_except(model, keep | train, cfg.train_head)
    return model


register("video", kind="adapt", config=Config, apply=apply, identity={"num_frames": 2, "tubelet": 2})
