"""accelerate: put a pruned loader on the device without a second split (extra ``accelerate``).

``accelerator.prepare(loader)`` shards a loader once more across processes
(``accelerate/data_loader.py``, ``prepare_data_loader``): ``BatchSamplerShard`` for map-style data,
``DataLoaderDispatcher`` (the default for an ``IterableDataset``: process 0 iterates and slices its
batches over the processes) or ``IterableDatasetShard`` (``dispatch_batches=False``). Our loaders
already give every rank its own equal share, so each of those drops part of every epoch (the loaders
refuse them: :mod:`rsprune_data.wrappers`). :func:`prepare_loader` calls accelerate's own
``prepare_data_loader`` with ``num_processes=1``, the documented "no change if no multiprocess"
branch: the result is accelerate's ``DataLoaderShard`` (device placement, ``GradientState``,
``set_epoch`` from its ``iteration``) over this rank's share, wrapped in
:class:`~rsprune_data.integrations.PrunedLoader` and registered with
``accelerator.register_for_checkpointing`` so that ``accelerator.save_state``/``load_state`` carry
the mid-epoch position (accelerate's ``skip_first_batches`` is not needed and, for an iterable
dataset, would read and throw away every skipped batch)::

    accelerator = Accelerator()
    sampler = PrunedSampler(index, schedule)            # after Accelerator(): sees the process group
    loader = prepare_loader(accelerator, DataLoader(ds, sampler=sampler, batch_size=8, num_workers=2))
    model, opt = accelerator.prepare(model, opt)        # the loader is not passed to prepare
    accelerator.load_state(ckpt)                        # optional: resumes mid-epoch exactly
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for images, keys in loader: ...
        accelerator.save_state(ckpt)

``DataLoaderConfiguration`` options do not apply to it: ``split_batches``, ``dispatch_batches`` and
``even_batches`` describe accelerate's split, which this loader replaces by the plan's (every rank
gets ``ceil(n / R)`` samples, ``DistributedSampler`` padding, so step counts are always equal).
"""

from __future__ import annotations

from typing import Any

from .._deps import lazy_import
from ._loader import PrunedLoader

__all__ = ["prepare_loader"]


def prepare_loader(
    accelerator: Any, loader: Any, *, batch_size: int | None = None, register: bool = True
) -> PrunedLoader:
    """``loader`` on ``accelerator``'s device, unsplit, with epoch, ``len()`` and checkpointing.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        loader: a plain ``DataLoader`` over a :class:`~rsprune_data.PrunedSampler` or a
            :class:`~rsprune_data.PrunedWebDataset` pipeline (not one accelerate already prepared).
        batch_size: samples per batch of a streaming pipeline when neither the ``DataLoader`` nor a
            ``.batched(n)`` stage says it (see :class:`PrunedLoader`).
        register: register the loader's position with ``accelerator.register_for_checkpointing``.

    Returns:
        A :class:`~rsprune_data.integrations.PrunedLoader` over accelerate's ``DataLoaderShard``.
    """
    data_loader = lazy_import("accelerate.data_loader")
    if type(loader).__name__ in ("DataLoaderShard", "DataLoaderDispatcher"):
        from ..errors import ConfigError

        raise ConfigError(
            f"prepare_loader got a loader accelerate already prepared "
            f"({type(loader).__name__}): pass the plain DataLoader instead"
        )
    config = getattr(accelerator, "dataloader_config", None)
    shard = data_loader.prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,  # accelerate's "no change if no multiprocess": no second split
        process_index=0,
        split_batches=False,
        put_on_device=bool(getattr(accelerator, "device_placement", True)),
        rng_types=None,
        dispatch_batches=False,
        even_batches=True,
        non_blocking=bool(getattr(config, "non_blocking", False)),
        use_stateful_dataloader=False,
    )
    pruned = PrunedLoader(shard, batch_size=batch_size)
    if register:
        accelerator.register_for_checkpointing(pruned)
    return pruned
