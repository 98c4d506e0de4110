"""Train a tiny denoiser with accelerate on the RS-Prune selection, one pruning ratio per epoch.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/train_accelerate.py --shards 'shards/pool-{000000..000009}.tar' \\
        --loader stream --ratios 0.85 0.7 0.5 --batch-size 8 --workers 2 --log-delivered delivered/

(``--multi_gpu`` is what makes ``accelerate launch`` start several processes; on a machine without
GPUs the script's ``Accelerator(cpu=True)`` then runs them on CPU over gloo. ``--cpu
--num_processes 2`` starts a single process. ``torchrun --nproc_per_node 2`` works too.)

The shards must be indexed (``rsprune-data index``). ``--loader sampler`` reads them by random access
(``PrunedShardDataset`` + ``PrunedSampler``), ``--loader stream`` streams them
(``PrunedWebDataset(...).decode("rgb8").map(...).batched(n)``). Either way the loader goes through
``rsprune_data.integrations.accelerate.prepare_loader``, never ``accelerator.prepare``, which would
split it a second time. ``--log-delivered DIR`` writes ``DIR/rank<r>.jsonl``: per epoch one line
``{"epoch": e, "ratio": r, "keys": [every __key__ this rank trained on, in order]}``.
``--checkpoint DIR`` saves ``accelerator.save_state`` there after every epoch and, with ``--stop-after
K``, after step ``K`` of the run, where it then stops (a crash); ``--resume`` starts from it.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from rsprune_data import (
    PruneConfig,
    PrunedSampler,
    PrunedShardDataset,
    PrunedWebDataset,
    PruneIndex,
)


def to_input(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x size x size in [-1, 1]."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255  # writable copy
    return (
        nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0] * 2 - 1
    )


def image_member(sample: dict[str, Any]) -> np.ndarray:
    return next(v for k, v in sample.items() if k in ("jpg", "jpeg", "png", "tif", "tiff"))


def item(sample: dict[str, Any], size: int) -> tuple[torch.Tensor, str]:
    return to_input(image_member(sample), size), sample["__key__"]


def config_of(epoch: int, ratios: list[float], strategy: str) -> PruneConfig:
    """The schedule: epoch -> its config (the last ratio repeats)."""
    return PruneConfig(prune_ratio=ratios[min(epoch, len(ratios) - 1)], strategy=strategy)


def build_loader(args: argparse.Namespace) -> DataLoader[Any]:
    shards: str | list[str] = args.shards[0] if len(args.shards) == 1 else args.shards
    schedule = functools.partial(config_of, ratios=args.ratios, strategy=args.strategy)
    to_item = functools.partial(item, size=args.image_size)
    if args.loader == "sampler":
        index = PruneIndex.load(shards, args.index_dir)
        sampler = PrunedSampler(index, schedule, seed=args.seed)  # sees the process group
        dataset = PrunedShardDataset(index, decode="rgb", transform=to_item)
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=args.batch_size,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
    stream = PrunedWebDataset(shards, schedule, index_dir=args.index_dir, seed=args.seed)
    pipeline = stream.decode("rgb8").map(to_item).batched(args.batch_size)
    return DataLoader(
        pipeline, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", nargs="+", required=True, help="shard paths or one brace pattern")
    ap.add_argument(
        "--index-dir", default=None, help="folder of the index files (default: beside each shard)"
    )
    ap.add_argument("--loader", choices=("sampler", "stream"), default="stream")
    ap.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.85, 0.7, 0.5],
        help="pruning ratio of each epoch (one epoch per ratio)",
    )
    ap.add_argument(
        "--strategy",
        default="rsprune",
        help="selection strategy (entropy for an index built without centroids)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--log-delivered", type=Path, default=None, metavar="DIR")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="DIR")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="K",
        help="save --checkpoint after step K and stop (to test resuming)",
    )
    ap.add_argument("--resume", action="store_true", help="start from --checkpoint")
    args = ap.parse_args()

    from accelerate import Accelerator

    from rsprune_data.integrations.accelerate import prepare_loader

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = prepare_loader(accelerator, build_loader(args))
    model, opt = accelerator.prepare(model, opt)
    if args.resume:
        accelerator.load_state(str(args.checkpoint))

    log = None
    if args.log_delivered is not None:
        args.log_delivered.mkdir(parents=True, exist_ok=True)
        log = open(args.log_delivered / f"rank{accelerator.process_index}.jsonl", "a")  # noqa: SIM115
    step = 0
    for epoch in range(loader.epoch, len(args.ratios)):
        loader.set_epoch(epoch)
        keys: list[str] = []
        for images, batch_keys in loader:
            noise = torch.randn_like(images)
            loss = nn.functional.mse_loss(model(images + noise), noise)  # predict the noise
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            keys.extend(batch_keys)
            step += 1
            if args.stop_after is not None and step == args.stop_after:
                break
        if log is not None:
            log.write(
                json.dumps({"epoch": epoch, "ratio": args.ratios[epoch], "keys": keys}) + "\n"
            )
            log.flush()
        accelerator.print(
            f"epoch {epoch}: prune_ratio={args.ratios[epoch]} rank "
            f"{accelerator.process_index} trained on {len(keys)} samples"
        )
        if args.checkpoint is not None:
            accelerator.save_state(str(args.checkpoint))
        if args.stop_after is not None and step == args.stop_after:
            break
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
