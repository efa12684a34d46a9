"""Run by test_ddp.py under `torchrun --nproc_per_node=N`: the same vk.fit call as a single process would make.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/ddp_script.py OUT BATCH
Writes OUT/final.pt (rank 0): the trained state dict.
"""
import sys

import torch

import vitkit as vk

if __name__ == "__main__":
    out, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=2,
                    num_heads=4, num_classes=10)
    vk.adapt(model, "full")
    parts = vk.data.split(vk.data.digits(), seed=0, train=6, val=2)
    tf = vk.data.transform(model)  # no random augmentation, no dropout: the runs must agree numerically
    result = vk.fit(model, parts["train"].with_transform(tf), parts["val"].with_transform(tf), epochs=2, lr=3e-3,
                    batch_size=batch, out_dir=out, progress=False, save_model=False)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    torch.save({"state": model.state_dict(), "history": result.history,
                "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1},
               f"{out}/final.pt")
