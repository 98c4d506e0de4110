"""Lightning: a DataModule that delivers a pruned loader exactly under DDP (extra ``lightning``).

What Lightning does to a plain ``DataLoader`` (``lightning/pytorch/trainer/connectors/
data_connector.py``, ``loops/fit_loop.py``) and why each breaks a pruned loader:

* ``use_distributed_sampler=True`` wraps a custom sampler in ``DistributedSamplerWrapper``, which
  splits the rank's share again and fixes its length when the loader is built;
* the training loop takes ``len()`` right after ``train_dataloader()`` and keeps it until the loader
  is reloaded (``reload_dataloaders_every_n_epochs``), so later epochs of a schedule are cut to the
  first epoch's length;
* it calls ``set_epoch`` only on ``dataloader.sampler``, after taking ``len()``, and never on an
  ``IterableDataset``.

:class:`PrunedDataModule` returns a :class:`~rsprune_data.integrations.PrunedLoader`, which is not a
``DataLoader``, so Lightning wraps nothing (``_prepare_dataloader`` returns other iterables as they
are). Its ``train_dataloader()`` sets the epoch to ``trainer.current_epoch`` *before* Lightning takes
``len()``, and with ``Trainer(reload_dataloaders_every_n_epochs=1)`` (checked in ``setup``) that
happens every epoch. Its ``state_dict``/``load_state_dict`` (saved in every checkpoint) hold the
epoch and the batches trained in it, read from the fit loop's batch progress rather than from the
iterator, which Lightning's fetcher runs one batch ahead::

    def make_loader():  # called in setup(), after the process group exists
        return DataLoader(PrunedWebDataset(shards, schedule).decode("rgb8").map(f).batched(8),
                          batch_size=None, num_workers=2)

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3,
                        reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=PrunedDataModule(make_loader))   # ckpt_path=... resumes exactly
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._deps import lazy_import
from ..errors import ConfigError
from ._loader import PrunedLoader

__all__ = ["PrunedDataModule"]

_LightningDataModule: Any = lazy_import("lightning.pytorch").LightningDataModule


class PrunedDataModule(_LightningDataModule):  # type: ignore[misc]
    """A ``LightningDataModule`` whose training loader is a pruned loader (module docstring).

    Args:
        train_loader: a zero-argument function that builds the ``DataLoader`` (over a
            :class:`~rsprune_data.PrunedSampler` or a :class:`~rsprune_data.PrunedWebDataset`
            pipeline), called in ``setup()`` after the process group exists so that the loader sees
            the right rank; or the ``DataLoader`` itself when it was built with explicit ranks.
        batch_size: see :class:`~rsprune_data.integrations.PrunedLoader`.
    """

    def __init__(
        self, train_loader: Callable[[], Any] | Any, *, batch_size: int | None = None
    ) -> None:
        super().__init__()
        self._make = (
            train_loader
            if callable(train_loader) and not hasattr(train_loader, "__iter__")
            else (lambda: train_loader)
        )
        self._batch_size = batch_size
        self.loader: PrunedLoader | None = None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                "PrunedDataModule needs Trainer(reload_dataloaders_every_n_epochs=1), got "
                f"{trainer.reload_dataloaders_every_n_epochs}: Lightning keeps the first epoch's "
                "len() until the loader is reloaded, so later epochs of a ratio change would be "
                "cut short"
            )
        if self.loader is None:
            self.loader = PrunedLoader(self._make(), batch_size=self._batch_size)

    def train_dataloader(self) -> PrunedLoader:
        if self.loader is None:
            self.setup("fit")
        assert self.loader is not None
        epoch = int(self.trainer.current_epoch) if self.trainer is not None else self.loader.epoch
        self.loader.set_epoch(epoch)  # before Lightning takes len()
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if self.loader is None or trainer is None:
            return {}
        epoch = int(trainer.current_epoch)
        if self.loader.epoch != epoch:  # the pass of this epoch is over (the loader moved on)
            return {"epoch": epoch, "complete": True}
        trained = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {
            "epoch": epoch,
            "complete": False,
            "loader": self.loader.state_dict(batches=min(trained, len(self.loader))),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or state_dict.get("complete", True):
            return
        if self.loader is None:
            self.setup("fit")
        assert self.loader is not None
        self.loader.load_state_dict(state_dict["loader"])
