"""Trainer integrations: accelerate and Lightning, above the framework-free loaders.

* :class:`PrunedLoader` (no framework): a loader over :class:`~rsprune_data.PrunedSampler` or
  :class:`~rsprune_data.PrunedWebDataset` that drives ``set_epoch`` every pass, has the right
  ``len()`` for every epoch, checks each pass's batch count against the plan and saves/loads its
  mid-epoch position.
* :mod:`rsprune_data.integrations.accelerate` (extra ``accelerate``): :func:`prepare_loader`.
* :mod:`rsprune_data.integrations.lightning` (extra ``lightning``): ``PrunedDataModule``.

The framework modules are imported only when used: ``import rsprune_data.integrations`` imports
neither accelerate nor Lightning.
"""

from __future__ import annotations

from ._loader import PrunedLoader

__all__ = ["PrunedLoader"]
