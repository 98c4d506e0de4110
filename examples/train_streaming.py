"""Train on a pruned WebDataset stream with DataLoader workers, changing the pruning ratio per epoch.

    python examples/train_streaming.py [--images examples/data/harvey] [--workdir /tmp/rsprune_example]
        [--ratios 0.5 0.7 0.85] [--workers 2]

1. pack the image folder into tar shards (``rsprune_data.pack.pack_folder``; ``rsprune-data pack``);
2. index them once (``rsprune_data.indexer.index_shards``; ``rsprune-data index``). This example
   indexes entropy-only, so it prunes with ``strategy="entropy"`` (Stage I alone); with reference
   centroids (``rsprune-data centroids`` then ``index --centroids``) use the default ``"rsprune"``;
3. stream only the selected samples with :class:`rsprune_data.PrunedWebDataset`, chained with
   webdataset's own stages, through a ``DataLoader`` whose workers persist across epochs, and train
   a tiny denoiser (the objective of a diffusion model, in miniature). Before each epoch the loop
   calls ``set_epoch`` and ``set_prune_ratio``: both reach the persistent workers, and each epoch
   delivers the new selection, the same number of samples on every rank.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from rsprune_data import PruneConfig, PrunedWebDataset
from rsprune_data.indexer import index_shards
from rsprune_data.pack import pack_folder

SIZE = 64  # train at 64x64 to keep the example fast on a CPU


def to_input(image: torch.Tensor) -> torch.Tensor:
    """CHW float image in [0, 1] -> SIZE x SIZE in [-1, 1]."""
    image = nn.functional.interpolate(
        image[None], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
    )[0]
    return image * 2 - 1


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=Path, default=Path(__file__).parent / "data" / "harvey")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rsprune_example"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    shards = sorted(str(p) for p in (args.workdir / "shards").glob("shard-*.tar"))
    if not shards:
        packed = pack_folder(args.images, args.workdir / "shards", shard_size=50, progress=False)
        shards = [str(p) for p in packed.shards]
    report = index_shards(shards, workers=args.workers, progress=False)  # skips current indexes
    if not report.ok:
        raise SystemExit(f"indexing failed: {report.failed}")

    ds = PrunedWebDataset(
        shards, PruneConfig(prune_ratio=args.ratios[0], strategy="entropy"), seed=0
    )
    # webdataset stages, exactly as after wds.WebDataset(...): decode, pick the image, batch in
    # the workers. Harvey tiles are .jpeg, UC Merced .jpg: "jpg;jpeg;png" takes whichever exists.
    pipeline = (
        ds.decode("torchrgb")
        .to_tuple("jpg;jpeg;png")
        .map_tuple(to_input)
        .shuffle(64)
        .batched(args.batch_size)
    )
    loader = DataLoader(
        pipeline, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0
    )

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 3, 3, padding=1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch, ratio in enumerate(args.ratios):
        ds.set_epoch(epoch)  # before iter(loader): reaches the persistent workers
        ds.set_prune_ratio(ratio)
        t0, seen, total = time.perf_counter(), 0, 0.0
        for (images,) in loader:
            noise = torch.randn_like(images)
            sigma = torch.rand(images.shape[0], 1, 1, 1)
            loss = nn.functional.mse_loss(model(images + sigma * noise), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += images.shape[0]
            total += loss.item() * images.shape[0]
        print(
            f"epoch {epoch}: prune_ratio {ratio:.2f} -> {seen} of {len(ds.index)} samples "
            f"(expected {ds.num_samples}), denoising loss {total / max(seen, 1):.4f}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
        if seen != ds.num_samples:
            raise SystemExit(f"expected every selected sample once, got {seen}")


if __name__ == "__main__":
    main()
