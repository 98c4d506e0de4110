"""Trainer integrations with the real frameworks: accelerate, Lightning, torchrun (issue 9).

In-process: the frameworks' own splitting wrappers (accelerate's ``BatchSamplerShard``,
``IterableDatasetShard``, ``DataLoaderDispatcher``; Lightning's ``DistributedSamplerWrapper``) around
our loaders raise a clear error, and ``PrunedLoader`` resumes exactly. Launched: the two example
scripts under ``accelerate launch`` (2 CPU processes), ``torchrun`` and Lightning ``ddp`` on CPU,
2 DataLoader workers, 3 epochs at ratios 0.85 -> 0.7 -> 0.5, some stopped mid-run and resumed from
the framework's checkpoint; every rank's delivered keys per epoch are compared with
``PruneIndex.select`` of that epoch's ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SAMPLE_DATA
from resume_conformance import run_resume_conformance
from torch.utils.data import BatchSampler, DataLoader

from rsprune_data import (
    ConfigError,
    DeliveryError,
    PruneConfig,
    PrunedSampler,
    PrunedShardDataset,
    PrunedWebDataset,
    PruneIndex,
)
from rsprune_data.indexer import index_shards
from rsprune_data.integrations import PrunedLoader
from rsprune_data.pack import pack_folder

RATIOS = ["0.85", "0.7", "0.5"]
STRATEGY = "entropy"  # the shards are indexed entropy-only
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """130 real Harvey JPEG tiles in 11 indexed shards; returns a brace pattern."""
    root = tmp_path_factory.mktemp("integrations")
    packed = pack_folder(
        SAMPLE_DATA / "harvey" / "damage", root / "shards", shard_size=12, progress=False
    )
    assert index_shards([str(p) for p in packed.shards], workers=1, progress=False).ok
    return str(root / "shards" / f"shard-{{000000..{len(packed.shards) - 1:06d}}}.tar")


def config(ratio: float) -> PruneConfig:
    return PruneConfig(prune_ratio=ratio, strategy=STRATEGY)


# --- the loud errors, in process with the real wrapper classes ------------------------------------


def test_accelerate_batch_sampler_shard_is_refused(shards: str) -> None:
    from accelerate.data_loader import BatchSamplerShard

    sampler = PrunedSampler(PruneIndex.load(shards), config(0.5), num_replicas=2, rank=0)
    wrapped = BatchSamplerShard(BatchSampler(sampler, 4, False), num_processes=2, process_index=0)
    with pytest.raises(ConfigError, match=r"BatchSamplerShard.*prepare_loader"):
        list(wrapped)
    single = PrunedSampler(PruneIndex.load(shards), config(0.5), num_replicas=1, rank=0)
    split = [
        list(BatchSamplerShard(BatchSampler(single, 4, False), num_processes=2, process_index=r))
        for r in range(2)
    ]
    # one global order dealt out by accelerate is exact (its even_batches padding aside)
    assert {i for part in split for b in part for i in b} == set(single.selected.tolist())


def test_accelerate_iterable_dataset_shard_is_refused(shards: str) -> None:
    from accelerate.data_loader import IterableDatasetShard

    ds = PrunedWebDataset(shards, config(0.5), rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"IterableDatasetShard.*prepare_loader"):
        list(IterableDatasetShard(ds, batch_size=4, num_processes=2, process_index=0))


def test_accelerate_dispatcher_is_refused(shards: str) -> None:
    from accelerate.data_loader import DataLoaderDispatcher

    ds = PrunedWebDataset(shards, config(0.5), rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"DataLoaderDispatcher"):
        list(DataLoaderDispatcher(ds, batch_size=4))


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_lightning_distributed_sampler_wrapper_is_refused(shards: str, num_replicas: int) -> None:
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = PrunedSampler(PruneIndex.load(shards), config(0.5), num_replicas=num_replicas, rank=0)
    with pytest.raises(ConfigError, match=r"DistributedSamplerWrapper.*PrunedDataModule"):
        DistributedSamplerWrapper(sampler, num_replicas=2, rank=0, shuffle=False)


def test_lightning_datamodule_needs_reload_every_epoch(shards: str) -> None:
    import lightning.pytorch as pl

    from rsprune_data.integrations.lightning import PrunedDataModule

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    module = PrunedDataModule(lambda: DataLoader(PrunedWebDataset(shards, 0.5), batch_size=4))
    module.trainer = trainer
    with pytest.raises(ConfigError, match="reload_dataloaders_every_n_epochs=1"):
        module.setup("fit")


def test_a_pass_that_loses_batches_raises(shards: str) -> None:
    ds = PrunedWebDataset(shards, config(0.5), sample_window=0)
    dropped = ds.select(lambda s: not s["__key__"].startswith("-95"))  # a stage that loses samples
    loader = PrunedLoader(DataLoader(dropped, batch_size=4))
    with pytest.raises(DeliveryError, match="plan has"):
        list(loader)


def test_an_epoch_cut_short_warns(shards: str) -> None:
    sampler = PrunedSampler(PruneIndex.load(shards), config(0.5))
    it = iter(sampler)
    _ = [next(it) for _ in range(5)]  # what a trainer with a cached, too short len() does
    with pytest.warns(RuntimeWarning, match=r"only 5 of its \d+ items.*PrunedDataModule"):
        sampler.set_epoch(1)


def test_pruned_loader_needs_a_pruned_loader() -> None:
    with pytest.raises(ConfigError, match="PrunedSampler"):
        PrunedLoader(DataLoader(list(range(4))))


# --- PrunedLoader: len and epoch per pass, exact resume -------------------------------------------


def _schedule(epoch: int) -> PruneConfig:
    return config([0.85, 0.7, 0.5][min(epoch, 2)])


def _sampler_loader(shards: str, workers: int) -> PrunedLoader:
    index = PruneIndex.load(shards)
    ds = PrunedShardDataset(index, transform=lambda s: s["__key__"])
    return PrunedLoader(
        DataLoader(
            ds, sampler=PrunedSampler(index, _schedule, seed=2), batch_size=4, num_workers=workers
        )
    )


def _stream_loader(shards: str, workers: int) -> PrunedLoader:
    pipeline = PrunedWebDataset(shards, _schedule, seed=2).map(lambda s: s["__key__"])
    return PrunedLoader(
        DataLoader(pipeline.batched(4, collation_fn=None), batch_size=None, num_workers=workers)
    )


@pytest.mark.parametrize("make", [_sampler_loader, _stream_loader])
def test_pruned_loader_len_and_epochs_follow_the_schedule(shards: str, make: Any) -> None:
    index = PruneIndex.load(shards)
    loader = make(shards, 0)
    for epoch, ratio in enumerate([0.85, 0.7, 0.5]):  # no set_epoch: each pass is the next epoch
        assert loader.epoch == epoch
        n = len(loader)
        keys = [k for batch in loader for k in batch]
        assert len(keys) == len(index.select(config(ratio))) and n == -(-len(keys) // 4)


@pytest.mark.parametrize("make", [_sampler_loader, _stream_loader])
def test_pruned_loader_resume_conformance(shards: str, make: Any) -> None:
    report = run_resume_conformance(
        lambda: make(shards, 2),
        set_epoch=lambda ld, e: ld.set_epoch(e),
        key=tuple,
        transport=lambda s: json.loads(json.dumps(s)),
        stop_points=("start", "middle", "last", "edge", "end"),
    )
    assert len(report.checked) == 10


# --- real launches --------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, check=False, cwd=cwd, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def check_delivered(shards: str, log: Path, *, world: int = 2) -> None:
    """Every epoch: the union over ranks is the selection of that epoch's ratio, plus only
    DistributedSampler-style padding (fewer than ``world`` duplicates), equal per-rank counts."""
    index = PruneIndex.load(shards)
    per_rank: list[dict[int, list[str]]] = []
    for r in range(world):
        epochs: dict[int, list[str]] = {}
        for line in (log / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert rec["ratio"] == float(RATIOS[rec["epoch"]])
            epochs.setdefault(rec["epoch"], []).extend(rec["keys"])  # a resumed epoch: two lines
        per_rank.append(epochs)
    assert all(sorted(e) == [0, 1, 2] for e in per_rank)
    for epoch, ratio in enumerate(RATIOS):
        want = [index.keys[int(g)] for g in index.select(config(float(ratio)))]
        got = [k for epochs in per_rank for k in epochs[epoch]]
        counts = Counter(got)
        assert set(counts) == set(want), f"epoch {epoch}: missing {set(want) - set(counts)}"
        assert len(got) - len(want) < world
        assert sum(c - 1 for c in counts.values()) == len(got) - len(want)
        assert len({len(epochs[epoch]) for epochs in per_rank}) == 1  # equal per-rank steps


def example_args(shards: str, loader: str, log: Path) -> list[str]:
    return [
        "--shards",
        shards,
        "--loader",
        loader,
        "--ratios",
        *RATIOS,
        "--strategy",
        STRATEGY,
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--image-size",
        "16",
        "--log-delivered",
        str(log),
    ]


ACCELERATE = [
    str(Path(sys.executable).with_name("accelerate")),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]


def test_accelerate_launch_sampler(shards: str, tmp_path: Path) -> None:
    run(
        [
            *ACCELERATE,
            str(EXAMPLES / "train_accelerate.py"),
            *example_args(shards, "sampler", tmp_path / "log"),
        ],
        tmp_path,
    )
    check_delivered(shards, tmp_path / "log")


def test_accelerate_launch_stream_resumes_from_save_state(shards: str, tmp_path: Path) -> None:
    args = [*example_args(shards, "stream", tmp_path / "log"), "--checkpoint", str(tmp_path / "ck")]
    out = run(
        [*ACCELERATE, str(EXAMPLES / "train_accelerate.py"), *args, "--stop-after", "6"], tmp_path
    )
    assert "epoch 2" not in out  # stopped inside epoch 1
    run([*ACCELERATE, str(EXAMPLES / "train_accelerate.py"), *args, "--resume"], tmp_path)
    check_delivered(shards, tmp_path / "log")


def test_torchrun_sampler_resumes_from_save_state(shards: str, tmp_path: Path) -> None:
    args = [
        *example_args(shards, "sampler", tmp_path / "log"),
        "--checkpoint",
        str(tmp_path / "ck"),
    ]
    run([*TORCHRUN, str(EXAMPLES / "train_accelerate.py"), *args, "--stop-after", "7"], tmp_path)
    run([*TORCHRUN, str(EXAMPLES / "train_accelerate.py"), *args, "--resume"], tmp_path)
    check_delivered(shards, tmp_path / "log")


def test_lightning_ddp_sampler(shards: str, tmp_path: Path) -> None:
    run(
        [
            sys.executable,
            str(EXAMPLES / "train_lightning.py"),
            *example_args(shards, "sampler", tmp_path / "log"),
        ],
        tmp_path,
    )
    check_delivered(shards, tmp_path / "log")


def test_lightning_ddp_stream_resumes_from_checkpoint(shards: str, tmp_path: Path) -> None:
    args = [*example_args(shards, "stream", tmp_path / "log"), "--checkpoint", str(tmp_path / "ck")]
    run(
        [sys.executable, str(EXAMPLES / "train_lightning.py"), *args, "--stop-after", "9"], tmp_path
    )
    run([sys.executable, str(EXAMPLES / "train_lightning.py"), *args, "--resume"], tmp_path)
    check_delivered(shards, tmp_path / "log")


NATURAL = """
import sys
sys.path.insert(0, {examples!r})
from accelerate import Accelerator
from train_accelerate import build_loader, main
import argparse
args = argparse.Namespace(shards=[{shards!r}], index_dir=None, loader={loader!r}, ratios=[0.5],
                          strategy="entropy", batch_size=4, workers=0, seed=0, image_size=16)
accelerator = Accelerator(cpu=True)
loader = accelerator.prepare(build_loader(args))   # the README of accelerate: prepare everything
for batch in loader:
    pass
"""


@pytest.mark.parametrize("loader", ["sampler", "stream"])
def test_accelerate_prepare_of_a_pruned_loader_fails_loudly(
    shards: str, tmp_path: Path, loader: str
) -> None:
    script = tmp_path / "natural.py"
    script.write_text(NATURAL.format(examples=str(EXAMPLES), shards=shards, loader=loader))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*ACCELERATE, str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode != 0
    wrapper = "BatchSamplerShard" if loader == "sampler" else "DataLoaderDispatcher"
    assert f"{wrapper} splits it again" in proc.stderr and "prepare_loader" in proc.stderr
