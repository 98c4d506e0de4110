"""Train on a pruned subset with a map-style dataset, DDP, and a pruning ratio that changes per epoch.

    python examples/train_map_style_ddp.py                        # one process, CPU
    torchrun --nproc_per_node=2 examples/train_map_style_ddp.py   # two ranks (gloo on CPU)
    python examples/train_map_style_ddp.py --shards 'data/shard-{000000..000099}.tar'  # your shards

Without ``--shards`` rank 0 first builds a small demo set from the images shipped in
``examples/data``: it packs the Harvey pool into tar shards, builds prior centroids on the UC Merced
reference scenes and indexes the shards (the ``rsprune-data pack/centroids/index`` steps).

The loop is an ordinary DDP loop. The only additions are ``PrunedSampler`` and ``set_epoch``: the
ratio schedule is evaluated in ``set_epoch``, so every rank uses the same subset in every epoch, and
ranks get disjoint, equally long shares of it (``DistributedSampler`` padding).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rsprune_data import PruneConfig, PrunedSampler, PrunedShardDataset, PruneIndex

EXAMPLES = Path(__file__).resolve().parent


def prune_schedule(epoch: int) -> PruneConfig:
    """Keep half of the pool first, then prune harder (RS-Prune works at high ratios)."""
    return PruneConfig(prune_ratio=(0.5, 0.7, 0.85)[min(epoch, 2)])


def build_demo_shards(workdir: Path) -> list[str]:
    """pack -> centroids -> index on the images shipped with the examples (rank 0; cached in workdir)."""
    from rsprune_data.centroids import Centroids, build_centroids
    from rsprune_data.encoders import load_encoder
    from rsprune_data.indexer import index_shards
    from rsprune_data.pack import pack_folder

    shards = sorted(str(p) for p in (workdir / "shards").glob("shard-*.tar"))
    if not shards:
        shards = [
            str(p)
            for p in pack_folder(
                EXAMPLES / "data" / "harvey", workdir / "shards", shard_size=100, progress=False
            ).shards
        ]
    encoder = load_encoder("efficientnet-lite0", device="cpu")
    path = workdir / "centroids.safetensors"
    if path.exists():
        centroids = Centroids.load(path)
    else:
        centroids = build_centroids([EXAMPLES / "data" / "ucmerced"], encoder, k=8, progress=False)
        centroids.save(path)
    # skips shards whose index is already current
    # rank 0 indexes every shard (rank/world_size given, else torchrun's RANK/WORLD_SIZE would split)
    index_shards(
        shards,
        centroids=centroids,
        encoder=encoder,
        workers=2,
        progress=False,
        rank=0,
        world_size=1,
    )
    return shards


def to_tensor(sample: dict[str, object]) -> torch.Tensor:
    """Decoded ``HxWx3`` uint8 image -> ``3x32x32`` float in [-1, 1] (a stand-in for real augmentation)."""
    rgb = sample["jpeg"] if "jpeg" in sample else sample["jpg"]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return F.interpolate(x[None], size=(32, 32), mode="bilinear", antialias=True)[0]


class TinyDenoiser(nn.Module):
    """A toy stand-in for a diffusion backbone: predicts the noise added to an image."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", nargs="*", help="indexed tar shards (default: build a demo set)")
    ap.add_argument("--index-dir", help="where the shards' index files are (default: beside them)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rsprune_map_demo"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0

    shards = args.shards
    if not shards:
        if rank == 0:
            build_demo_shards(Path(args.workdir))
        if distributed:
            dist.barrier()  # the other ranks wait for rank 0's index files
        shards = sorted(str(p) for p in (Path(args.workdir) / "shards").glob("shard-*.tar"))

    index = PruneIndex.load(shards, args.index_dir)
    dataset = PrunedShardDataset(index, decode="rgb", transform=to_tensor)  # item i = position i
    # rank and world size come from the process group; the schedule is read in set_epoch
    sampler = PrunedSampler(index, prune_schedule, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    model: nn.Module = TinyDenoiser()
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # evaluates prune_schedule(epoch): same subset on every rank
        seen, total = 0, 0.0
        for x in loader:
            noise = torch.randn_like(x)
            loss = F.mse_loss(model(x + noise), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += x.shape[0]
            total += loss.item() * x.shape[0]
        print(
            f"rank {rank} epoch {epoch}: prune_ratio={sampler.config.prune_ratio} "
            f"kept {len(sampler.selected)}/{len(index)}, this rank trained on {seen} "
            f"(= len(sampler) {len(sampler)}), mean loss {total / max(seen, 1):.4f}",
            flush=True,
        )
        # a checkpoint would save sampler.state_dict() (or a StatefulDataLoader's) with the model
    if distributed:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
