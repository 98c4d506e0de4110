"""Train a tiny denoiser with Lightning DDP on the RS-Prune selection, one pruning ratio per epoch.

    python examples/train_lightning.py --shards 'shards/pool-{000000..000009}.tar' --loader stream \\
        --ratios 0.85 0.7 0.5 --batch-size 8 --workers 2 --log-delivered delivered/ [--devices 2]

``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` starts the second process itself (it
re-runs this script). The loader comes from ``rsprune_data.integrations.lightning.PrunedDataModule``
and the Trainer has ``reload_dataloaders_every_n_epochs=1``: Lightning then wraps nothing, and every
epoch gets its own selection, order and ``len()``. Options as in ``examples/train_accelerate.py``;
``--checkpoint DIR`` keeps Lightning checkpoints (``last.ckpt``) there, saved every step, and with
``--stop-after K`` the run stops after step ``K``; ``--resume`` continues from ``DIR/last.ckpt``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from train_accelerate import build_loader


class Denoiser(L.LightningModule):  # type: ignore[misc]
    def __init__(self, ratios: list[float], log_dir: Path | None, stop_after: int | None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1)
        )
        self.ratios, self.log_dir, self.stop_after = ratios, log_dir, stop_after
        self.keys: list[str] = []

    def on_train_epoch_start(self) -> None:
        self.keys = []

    def training_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int) -> torch.Tensor:
        images, keys = batch
        noise = torch.randn_like(images)
        self.keys.extend(keys)
        return nn.functional.mse_loss(self.net(images + noise), noise)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stop_after is not None and self.trainer.global_step >= self.stop_after:
            self._write()
            self.trainer.should_stop = True
            self.stop_after = None  # written once

    def on_train_epoch_end(self) -> None:
        if not self.trainer.should_stop:
            self._write()

    def _write(self) -> None:
        if self.log_dir is None:
            return
        epoch = self.trainer.current_epoch
        with open(self.log_dir / f"rank{self.global_rank}.jsonl", "a") as f:
            f.write(
                json.dumps({"epoch": epoch, "ratio": self.ratios[epoch], "keys": self.keys}) + "\n"
            )
        print(
            f"epoch {epoch}: prune_ratio={self.ratios[epoch]} rank {self.global_rank} trained "
            f"on {len(self.keys)} samples",
            flush=True,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", nargs="+", required=True, help="shard paths or one brace pattern")
    ap.add_argument("--index-dir", default=None)
    ap.add_argument("--loader", choices=("sampler", "stream"), default="stream")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.85, 0.7, 0.5])
    ap.add_argument("--strategy", default="rsprune")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--log-delivered", type=Path, default=None, metavar="DIR")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="DIR")
    ap.add_argument("--stop-after", type=int, default=None, metavar="K")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    from rsprune_data.integrations.lightning import PrunedDataModule

    if args.log_delivered is not None:
        args.log_delivered.mkdir(parents=True, exist_ok=True)
    callbacks = []
    if args.checkpoint is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(
                dirpath=args.checkpoint, save_last=True, save_top_k=0, every_n_train_steps=1
            )
        )
    torch.manual_seed(args.seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=len(args.ratios),
        reload_dataloaders_every_n_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = PrunedDataModule(functools.partial(build_loader, args))
    ckpt = str(args.checkpoint / "last.ckpt") if args.resume else None
    trainer.fit(
        Denoiser(args.ratios, args.log_delivered, args.stop_after), datamodule=data, ckpt_path=ckpt
    )


if __name__ == "__main__":
    main()
