"""`rsprune-data demo`: the whole job on the real RS images shipped in ``examples/data``.

pack the Harvey sample into shards -> reference centroids from the UC Merced sample with the
default encoder -> index -> select at 85% pruning -> HTML report -> train a tiny denoising
diffusion model on CPU through ``PrunedWebDataset`` and again through
``DataLoader(sampler=PrunedSampler(...))``, changing the pruning ratio between epochs.

No network, nothing but the repository. Everything lands under ``--out`` (default ``demo_out``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

import numpy as np

from .config import PruneConfig

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
RATIOS = (0.85, 0.7, 0.5)  # pruning ratio of epoch 0, 1, 2: changed on the fly, no re-indexing
IMAGE_PX = 32  # the tiny model trains on 32 x 32 downsampled tiles
BATCH = 8


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def to_training_tensor(rgb: np.ndarray[Any, Any]) -> Any:
    """``HxWx3`` uint8 -> ``[3, 32, 32]`` float in [-1, 1] (area downsampling)."""
    import torch
    import torch.nn.functional as F

    x = (
        torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    )  # a copy: wds arrays are read-only
    return F.adaptive_avg_pool2d(x, IMAGE_PX)[0]


def _map_image(sample: dict[str, Any]) -> Any:
    """A raw sample dict of :class:`PrunedShardDataset` -> training tensor."""
    from .images import decode_rgb, pick_image_member

    picked = pick_image_member(sample)
    if picked is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image")
    return to_training_tensor(decode_rgb(picked[1], picked[0]))


class _Sized:
    """An iterable with a known length (a streaming DataLoader has none), for the progress bar."""

    def __init__(self, it: Iterable[Any], n: int) -> None:
        self.it, self.n = it, n

    def __iter__(self) -> Any:
        return iter(self.it)

    def __len__(self) -> int:
        return self.n


class TinyDenoiser:
    """A ~60k-parameter conv net predicting the noise of a DDPM step (Ho et al., 2020)."""

    def __new__(cls, ch: int = 32) -> Any:
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.t = nn.Sequential(nn.Linear(1, ch), nn.SiLU(), nn.Linear(ch, ch))
                self.inp = nn.Conv2d(3, ch, 3, padding=1)
                self.down = nn.Conv2d(ch, 2 * ch, 4, 2, 1)
                self.mid = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
                self.up = nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1)
                self.out = nn.Conv2d(2 * ch, 3, 3, padding=1)

            def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                act = nn.functional.silu
                h = act(self.inp(x) + self.t(t[:, None])[..., None, None])
                m = act(self.mid(act(self.down(h))))
                out: torch.Tensor = self.out(torch.cat([act(self.up(m)), h], 1))
                return out

        return Net()


def train_epochs(
    batches_per_epoch: Iterable[tuple[int, float, Iterable[Any]]],
    *,
    label: str,
    progress: bool,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train a fresh :class:`TinyDenoiser` with the DDPM loss on the given epochs of batches."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = TinyDenoiser()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps_t = 1000
    betas = torch.linspace(1e-4, 0.02, steps_t)
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    log = []
    for epoch, ratio, batches in batches_per_epoch:
        losses, seen = [], 0
        total = len(batches) if isinstance(batches, Sized) else None
        for batch in tqdm(
            batches,
            desc=f"{label} epoch {epoch} (prune {ratio:.2f})",
            unit="batch",
            total=total,
            disable=not progress,
            leave=True,
        ):
            x = batch[0] if isinstance(batch, list | tuple) else batch  # wds batches are tuples
            t = torch.randint(0, steps_t, (x.shape[0],))
            noise = torch.randn_like(x)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            noisy = ab.sqrt() * x + (1 - ab).sqrt() * noise
            loss = torch.nn.functional.mse_loss(model(noisy, t.float() / steps_t), noise)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(loss.item())
            seen += x.shape[0]
        log.append(
            {
                "epoch": epoch,
                "prune_ratio": ratio,
                "steps": len(losses),
                "samples": seen,
                "mean_loss": float(np.mean(losses)) if losses else math.nan,
            }
        )
    return log


def run_demo(
    out: Path, *, quick: bool = False, data: Path = SAMPLE_DATA, progress: bool = True
) -> int:
    """Run the whole job; returns the exit status. ``quick`` shortens it for tests."""
    import torch
    from torch.utils.data import DataLoader

    from .centroids import build_centroids
    from .datasets import PrunedShardDataset
    from .encoders import load_encoder
    from .index import PruneIndex
    from .indexer import index_shards
    from .pack import pack_folder
    from .report import write_report
    from .sampler import PrunedSampler
    from .wds import PrunedWebDataset

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out.mkdir(parents=True, exist_ok=True)
    pool, ref = data / "harvey", data / "ucmerced"
    if not pool.is_dir() or not ref.is_dir():
        from .errors import ConfigError

        raise ConfigError(
            f"demo data not found under {data}: run the demo from a checkout of the "
            "repository (it ships examples/data)"
        )

    _say(f"1/6 pack {pool} into WebDataset shards")
    res = pack_folder(
        pool, out / "shards", shard_size=100, prefix="harvey", progress=progress, overwrite=True
    )
    shards = [str(s) for s in res.shards]

    image_size = 64 if quick else None  # quick: a smaller encoder input for the test suite
    encoder = load_encoder("efficientnet-lite0", image_size=image_size, device="cpu")
    k = 12 if quick else 32
    _say(f"2/6 reference centroids: {ref} with {encoder.name} at {encoder.image_size} px, K={k}")
    cents_path = out / "centroids.safetensors"
    cents = build_centroids([ref], encoder, k=k, seed=0, progress=progress)
    cents.save(cents_path)

    _say("3/6 index the shards (entropy, no-data, cluster, similarity, byte ranges)")
    report = index_shards(
        shards,
        centroids=cents,
        encoder=encoder,
        index_dir=out / "index",
        workers=2,
        overwrite=True,
        progress=progress,
    )  # the demo owns its folder
    for line in report.lines():
        _say("    " + line)
    index = PruneIndex.load(shards, out / "index")

    config = PruneConfig(prune_ratio=0.85)
    summary = index.summary(config)
    _say(
        f"4/6 select at 85% pruning: kept {summary['selected']} of {summary['samples']} "
        f"(no-data dropped {summary['nodata_dropped']}, Stage I {summary['stage1_rule']} cut at "
        f"{summary['entropy_threshold']:.2f} bits dropped {summary['stage1_dropped']}, "
        f"clusters covered {summary['clusters_covered']}/{summary['clusters_in_pool']})"
    )
    (out / "selection.json").write_text(json.dumps(summary, indent=2))

    _say("5/6 report")
    page = write_report(
        shards,
        out / "report",
        config,
        index_dir=out / "index",
        centroids=cents_path,
        progress=progress,
    )
    _say(f"    open {page}")

    ratios = RATIOS[:2] if quick else RATIOS
    _say(f"6/6 train a tiny diffusion model, pruning ratio per epoch {list(ratios)}")
    schedule = {e: r for e, r in enumerate(ratios)}

    # (a) streaming: PrunedWebDataset with 2 workers; the ratio follows a schedule of the epoch
    stream = PrunedWebDataset(shards, lambda e: schedule[e], index_dir=out / "index", seed=0)
    # webdataset's own stages chain after it, exactly as after wds.WebDataset
    pipeline = stream.decode("rgb8").to_tuple("jpg;jpeg;png;tif;tiff").map_tuple(to_training_tensor)
    loader = DataLoader(pipeline.batched(BATCH), batch_size=None, num_workers=2)

    def stream_epochs() -> Iterable[tuple[int, float, Iterable[Any]]]:
        for e, r in schedule.items():
            stream.set_epoch(e)
            yield e, r, _Sized(loader, stream.num_batches(BATCH, num_workers=2))

    log_stream = train_epochs(stream_epochs(), label="PrunedWebDataset", progress=progress)

    # (b) map-style: DataLoader(sampler=PrunedSampler(...)); the ratio changed between epochs
    ds = PrunedShardDataset(index, transform=_map_image)
    sampler = PrunedSampler(index, PruneConfig(prune_ratio=ratios[0]), seed=0)
    map_loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=2)

    def map_epochs() -> Iterable[tuple[int, float, Iterable[Any]]]:
        for e, r in schedule.items():
            sampler.set_prune_ratio(r)
            sampler.set_epoch(e)
            yield e, r, map_loader

    log_map = train_epochs(map_epochs(), label="PrunedSampler", progress=progress)
    (out / "train_log.json").write_text(
        json.dumps({"streaming": log_stream, "sampler": log_map}, indent=2)
    )
    for name, log in (("PrunedWebDataset", log_stream), ("PrunedSampler", log_map)):
        steps = ", ".join(
            f"epoch {r['epoch']} @ {r['prune_ratio']:.2f}: {r['steps']} steps, "
            f"loss {r['mean_loss']:.3f}"
            for r in log
        )
        _say(f"    {name}: {steps}")
    _say(f"done in {time.perf_counter() - t_start:.0f} s; outputs in {out}")
    return 0
