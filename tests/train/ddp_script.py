"""Run by test_ddp.py under `torchrun --nproc_per_node=N`: the same vk.fit call as a single process would make.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/ddp_script.py OUT BATCH [nan]
Writes OUT/final.pt (rank 0): the trained state dict. With `nan`, the loss of rank 1 (only) becomes NaN at its
second batch; every rank that stops with NonFiniteLossError writes OUT/stopped-RANK.txt (the message), exit 3.
"""
import os
import sys
from pathlib import Path

import torch

import vitkit as vk
from vitkit.train.fit import NonFiniteLossError

if __name__ == "__main__":
    out, batch = sys.argv[1], int(sys.argv[2])
    poison = len(sys.argv) > 3 and sys.argv[3] == "nan"
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=2,
                    num_heads=4, num_classes=10)
    vk.adapt(model, "full")
    rank, calls = int(os.environ.get("RANK", "0")), []
    if poison:
        def nan_on_rank_1(model, images, logits, targets):
            calls.append(1)
            return logits.sum() * (float("nan") if rank == 1 and len(calls) >= 2 else 0.0)

        vk.train.add_loss(model, nan_on_rank_1)
    parts = vk.data.split(vk.data.digits(), seed=0, train=6, val=2)
    tf = vk.data.transform(model)  # no random augmentation, no dropout: the runs must agree numerically
    try:
        result = vk.fit(model, parts["train"].with_transform(tf), parts["val"].with_transform(tf), epochs=2,
                        lr=3e-3, batch_size=batch, out_dir=out, progress=False, save_model=False)
    except NonFiniteLossError as err:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"stopped-{rank}.txt").write_text(str(err))
        sys.exit(3)
    world = 1
    if torch.distributed.is_initialized():  # every rank leaves the group before exiting: a rank that exits with
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()  # gloo's threads alive
        torch.distributed.barrier()  # aborts ("terminate called without an active exception", SIGABRT)
        torch.distributed.destroy_process_group()
        if rank != 0:
            sys.exit(0)
    torch.save({"state": model.state_dict(), "history": result.history, "world": world}, f"{out}/final.pt")
