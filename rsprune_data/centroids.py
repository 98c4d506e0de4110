"""Reference-guided prior centroids (RS-Prune Stage II, step 1) and nearest-centroid assignment.

Wei, Dong et al., "RS-Prune: Training-Free Data Pruning at High Ratios for Efficient Remote Sensing
Diffusion Foundation Models": embed every image of one or more labelled remote-sensing scene datasets
(the reference set: UC Merced, NWPU-RESISC45, AID, ...) with an encoder f, l2-normalise, and run
spherical k-means with K clusters over the whole reference set (K = 200 by default; over-clustering,
not one cluster per labelled class). Each unlabelled image x then gets

    z(x) = argmax_k <f(x) / |f(x)|, mu_k>,   s(x) = that cosine.

Data flow of :func:`build_centroids`::

    reference folders DIR/CLASS/IMAGE -> (path, class id)            sorted, deterministic
      -> DataLoader workers: read -> images.decode_rgb -> encoder.preprocess -> [3, S, S]
      -> main process: encoder.encode -> [n, d] unit rows
      -> faiss spherical k-means -> mu [K, d] unit rows
      -> assign -> per-cluster class composition [K, C]

The result is a :class:`Centroids`, saved as safetensors (no pickle) with a digest that indexes record,
so that indexes built against different centroids are never mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._fsio import atomic_write_with
from ._validate import check_int, is_int
from .errors import ConfigError, CorruptImageError
from .images import IMAGE_EXTS, decode_rgb

if TYPE_CHECKING:
    import torch

    from .encoders import Encoder

__all__ = [
    "Centroids",
    "assign",
    "build_centroids",
    "embed_images",
    "reference_images",
    "spherical_kmeans",
]

FORMAT = "rsprune-centroids"
VERSION = "1"
#: Rows per product in :func:`assign`: a float32 chunk of 2048 x 1280 (10 MB) and its scores stay
#: near the caches. Every product has exactly this many rows (short chunks are padded), so a
#: row's result does not depend on its batch and the indexer and ``reassign`` agree bitwise.
ASSIGN_CHUNK = 2048

ImageItem = str | os.PathLike[str] | bytes | tuple[bytes, str]


# --------------------------------------------------------------------------------------------- embedding


def _sniff_ext(data: bytes) -> str:
    """Extension for raw bytes; :func:`images.decode_rgb` picks the decoder from the bytes anyway."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


def _describe(item: ImageItem, i: int) -> str:
    return os.fspath(item) if isinstance(item, str | os.PathLike) else f"item {i}"


class _DecodedItems:
    """Map-style dataset (run in DataLoader workers): item i -> (``[3, S, S]`` tensor, ok, why).

    Holds only the items and ``preprocess`` (picklable, without the model). A corrupt or unreadable
    image gives a zero tensor, ``ok=False`` and the reason, so one bad file does not end the run.
    """

    def __init__(self, items: Sequence[ImageItem], preprocess: Any, size: int) -> None:
        self.items, self.preprocess, self.size = items, preprocess, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        import torch

        item = self.items[i]
        try:
            if isinstance(item, tuple):
                data, ext = item
            elif isinstance(item, bytes):
                data, ext = item, _sniff_ext(item)
            else:
                path = Path(item)
                data, ext = path.read_bytes(), path.suffix.lstrip(".").lower()
            return self.preprocess(decode_rgb(data, ext)), True, ""
        except CorruptImageError as exc:
            why = f"{exc.reason}: {exc}"
        except OSError as exc:
            why = f"unreadable: {exc}"
        return torch.zeros(3, self.size, self.size), False, why


def _default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def embed_images(
    items: Iterable[ImageItem],
    encoder: Encoder,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    skip_corrupt: bool = False,
) -> NDArray[np.float32]:
    """Embed images with ``encoder``: decoding and preprocessing in DataLoader workers, the model here.

    Args:
        items: Image file paths, ``(bytes, ext)`` pairs, or raw bytes (format found from the bytes).
        encoder: An :class:`~rsprune_data.encoders.Encoder`.
        batch_size: Images per ``encoder.encode`` call.
        num_workers: Decoding processes; ``None`` = ``min(4, cpu_count - 1)``; 0 decodes in this process.
        progress: Show a tqdm bar.
        skip_corrupt: Give undecodable images an all-zero row (with a warning listing them) instead of
            raising. Zero rows are easy to drop: ``emb[np.any(emb != 0, axis=1)]``.

    Returns:
        float32 ``[n, d]``, l2-normalised rows in the order of ``items``.

    Raises:
        CorruptImageError: An image cannot be decoded (unless ``skip_corrupt``); names the item.

    Example:
        >>> emb = embed_images(sorted(Path("ref/airplane").glob("*.jpg")), enc)  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    items = list(items)
    batch_size = check_int("batch_size", batch_size, 1)
    workers = (
        _default_workers() if num_workers is None else check_int("num_workers", num_workers, 0)
    )
    out = np.zeros((len(items), encoder.dim), np.float32)
    if not items:
        return out
    dataset = _DecodedItems(items, encoder.preprocess, encoder.image_size)
    loader = torch.utils.data.DataLoader(  # type: ignore[var-annotated]
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
    )
    failed: list[tuple[str, str]] = []
    pos = 0
    with tqdm(total=len(items), unit="img", desc="embedding", disable=not progress) as bar:
        for images, ok, why in loader:
            n = len(ok)
            good = ok.numpy().astype(bool)
            if good.any():
                out[pos : pos + n][good] = encoder.encode(images[torch.from_numpy(good)])
            failed += [
                (_describe(items[pos + j], pos + j), why[j]) for j in np.flatnonzero(~good).tolist()
            ]
            pos += n
            bar.update(n)
    if failed:
        listing = "; ".join(f"{name} ({reason})" for name, reason in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        if not skip_corrupt:
            raise CorruptImageError(
                f"{len(failed)} image(s) cannot be decoded: {listing}{more}; remove them "
                "or pass skip_corrupt=True",
                reason="decode_error",
            )
        warnings.warn(
            f"skipped {len(failed)} undecodable image(s) (zero rows): {listing}{more}", stacklevel=2
        )
    return out


# ---------------------------------------------------------------------------------------------- k-means


def spherical_kmeans(
    x: NDArray[np.floating[Any]], k: int, *, seed: int = 0, niter: int = 25, gpu: bool | None = None
) -> NDArray[np.float32]:
    """Spherical k-means (faiss): ``k`` unit centroids maximising the summed cosine to their members.

    Every row is used for training (faiss would otherwise subsample to 256 points per centroid).
    Deterministic for a seed on one machine with one faiss build and thread count; another BLAS or
    the GPU may give slightly different centroids.

    Args:
        x: ``[n, d]`` embeddings (normalised here if they are not).
        k: Number of clusters, ``1 <= k <= n``.
        seed: faiss's random seed (initial centroids).
        niter: Lloyd iterations.
        gpu: ``None`` uses a GPU when faiss has one, ``True`` requires one, ``False`` stays on CPU.

    Returns:
        float32 ``[k, d]`` with unit rows.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
        >>> spherical_kmeans(x, 4).shape
        (4, 8)
    """
    import faiss

    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(
            f"`x` must be a non-empty 2-D float array of embeddings, got {x.dtype} {x.shape}"
        )
    n, d = x.shape
    k = check_int("k", k, 1)
    if k > n:
        raise ConfigError(
            f"k={k} clusters need at least k reference images, got n={n}: lower k "
            f"(--k {max(1, n // 10)} gives ~10 images per cluster) or add reference images"
        )
    niter = check_int("niter", niter, 1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ConfigError(
            "`x` has zero or non-finite rows: drop them first (embed_images(skip_corrupt=True) "
            "marks undecodable images with zero rows)"
        )
    xn = np.ascontiguousarray(x / norms, dtype=np.float32)
    has_gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    if gpu is True and not has_gpu:
        raise ConfigError(
            "gpu=True but faiss sees no GPU: install faiss-gpu (`pip install "
            "'rsprune-data[gpu]'`) or pass gpu=None"
        )
    km = faiss.Kmeans(
        d,
        int(k),
        niter=niter,
        seed=int(seed),
        spherical=True,
        verbose=False,
        gpu=bool(has_gpu if gpu is None else gpu),
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, math.ceil(n / k)),
    )
    km.train(xn)
    c = np.asarray(km.centroids, dtype=np.float32).reshape(int(k), d)
    return np.ascontiguousarray(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12))


# ------------------------------------------------------------------------------------------- assignment


def assign(
    emb: NDArray[np.float32],
    centroids: NDArray[np.float32] | Centroids,
    device: Any = None,
    *,
    chunk_size: int = ASSIGN_CHUNK,
) -> tuple[NDArray[np.int16], NDArray[np.float32]]:
    """Nearest centroid by cosine: ``z = argmax_k <e, mu_k>`` and ``s = <e, mu_z>``.

    ``emb`` rows should be unit vectors (``encoder.encode`` returns them); they are not renormalised.
    Ties go to the lower cluster id. Works in chunks of ``chunk_size`` rows.

    Args:
        emb: ``[n, d]`` float32 embeddings (float16, e.g. a sidecar's, is widened chunk by chunk:
            the same result as passing ``emb.astype(np.float32)``, without the copy).
        centroids: ``[K, d]`` unit centroids, or a :class:`Centroids`.
        device: ``None`` computes with numpy; a torch device (e.g. ``encoder.device``) uses torch there.
        chunk_size: Rows per matrix product.

    Returns:
        ``(cluster ids int16 [n], cosine float32 [n])``.

    Example:
        >>> z, s = assign(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[::-1].copy())
        >>> z.tolist(), s.tolist()
        ([2, 1, 0], [1.0, 1.0, 1.0])
    """
    c = (
        centroids.centroids
        if isinstance(centroids, Centroids)
        else np.asarray(centroids, dtype=np.float32)
    )
    emb = np.asarray(emb)
    if emb.dtype.kind != "f":
        emb = emb.astype(np.float32)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ConfigError(f"`centroids` must be a [K, d] array with K >= 1, got shape {c.shape}")
    if c.shape[0] > np.iinfo(np.int16).max:
        raise ConfigError(
            f"K={c.shape[0]} clusters do not fit the int16 cluster ids: use K <= 32767"
        )
    if emb.ndim != 2 or emb.shape[1] != c.shape[1]:
        raise ConfigError(
            f"`emb` must be [n, {c.shape[1]}] (the centroids' dimension), got {emb.shape}: "
            "embed with the encoder the centroids were built with"
        )
    chunk_size = check_int("chunk_size", chunk_size, 1)
    n = emb.shape[0]
    ids = np.empty(n, np.int16)
    sims = np.empty(n, np.float32)
    if device is None:
        _assign_numpy(emb, np.ascontiguousarray(c.T), chunk_size, ids, sims)
        return ids, sims
    import torch

    ct_t = torch.from_numpy(np.ascontiguousarray(c)).to(device).T
    for lo in range(0, n, chunk_size):
        s_t = torch.from_numpy(emb[lo : lo + chunk_size]).to(device).float() @ ct_t
        best_t = s_t.argmax(dim=1)
        ids[lo : lo + chunk_size] = best_t.cpu().numpy()
        sims[lo : lo + chunk_size] = s_t.gather(1, best_t[:, None])[:, 0].cpu().numpy()
    return ids, sims


def _assign_numpy(
    emb: NDArray[np.floating[Any]],
    ct: NDArray[np.float32],
    chunk_size: int,
    ids: NDArray[np.int16],
    sims: NDArray[np.float32],
) -> None:
    """:func:`assign` with numpy, chunk by chunk into reused buffers.

    Rows that are not float32 (a float16 sidecar) are widened chunk by chunk by torch's vectorised
    copy on one thread (widening is exact, so the product sees the same float32 values as
    ``emb.astype(np.float32)`` would give). One thread, because torch's OpenMP workers spin after
    a parallel copy and take the cores from the OpenBLAS product that follows: measured
    (``benchmarks/reassign_speed.py --widen-variants``, 2 cores, d = 1280, K = 200) 204-206k
    samples/s end to end with torch's default threads, 207-231k with numpy's ``copyto``, 284-343k
    with torch on one thread (two runs).
    """
    n = emb.shape[0]
    if n == 0:
        return
    # Every product has exactly `chunk_size` rows (a short chunk is padded with zero rows): BLAS
    # picks its kernel by shape (OpenBLAS has a separate path for small products), and a row's
    # cosines must not depend on how many rows came with it, so that the indexer's small batches
    # and reassign's long shards give bitwise the same result (tests/test_centroids.py).
    m = chunk_size
    scores = np.empty((m, ct.shape[1]), np.float32)
    wide = np.zeros((m, emb.shape[1]), np.float32)
    with _widener(wide, emb.dtype) as widen:
        for lo in range(0, n, m):
            hi = min(lo + m, n)
            k = hi - lo
            widen(emb[lo:hi])
            if k < m:
                wide[k:] = 0.0
            np.matmul(wide, ct, out=scores)
            s = scores[:k]
            best = s.argmax(axis=1)
            ids[lo:hi] = best
            sims[lo:hi] = s[np.arange(k), best]


@contextlib.contextmanager
def _widener(
    wide: NDArray[np.float32], dtype: np.dtype[Any]
) -> Iterator[Callable[[NDArray[Any]], None]]:
    """A function copying ``[m', d]`` rows of ``dtype`` into ``wide[:m']`` as float32 (see above)."""
    if dtype == np.float32:

        def assign_rows(x: NDArray[Any]) -> None:
            wide[: x.shape[0]] = x

        yield assign_rows
        return
    import torch

    target = torch.from_numpy(wide)

    def copy(x: NDArray[Any]) -> None:
        target[: x.shape[0]].copy_(torch.from_numpy(np.ascontiguousarray(x)))

    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield copy
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------- centroids


def _digest(centroids: NDArray[np.float32], encoder: str) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}\0{encoder}\0{centroids.shape[0]}\0".encode())
    h.update(np.ascontiguousarray(centroids, dtype="<f4").tobytes())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class Centroids:
    """Prior centroids of a reference set and what is known about each cluster.

    Attributes:
        centroids: float32 ``[K, d]`` unit rows.
        encoder: Id of the encoder that embedded the reference set (``Encoder.name``).
        seed: k-means seed.
        ref_dirs: Reference folders, in the order given.
        ref_counts: Images used from each folder.
        class_names: Sorted reference class names (sub-folder names, merged across folders).
        composition: float32 ``[K, C]``: the share of each class among the reference images of each
            cluster; all zeros for a cluster with none.
        encoder_spec: A ``load_encoder`` spec that rebuilds the encoder (add the same ``checkpoint``).
        cluster_sizes: int64 ``[K]`` reference images per cluster.

    ``digest`` (16 hex digits of sha256 over the centroid bytes, the encoder id and K) is what indexes
    record. Example::

        cents = build_centroids(["data/ucmerced"], load_encoder(), k=200)
        cents.save("ucm.centroids.safetensors")
        Centroids.load("ucm.centroids.safetensors").digest == cents.digest  # True
    """

    centroids: NDArray[np.float32]
    encoder: str
    seed: int
    ref_dirs: list[str]
    ref_counts: list[int]
    class_names: list[str]
    composition: NDArray[np.float32]
    encoder_spec: str = ""
    cluster_sizes: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        k = self.centroids.shape[0] if self.centroids.ndim == 2 else 0
        if k == 0:
            raise ConfigError(
                f"`centroids` must be a [K, d] array with K >= 1, got {self.centroids.shape}"
            )
        self.composition = np.ascontiguousarray(self.composition, dtype=np.float32)
        if self.composition.shape != (k, len(self.class_names)):
            raise ConfigError(
                f"`composition` must be [K={k}, C={len(self.class_names)}], "
                f"got {self.composition.shape}"
            )
        if len(self.ref_dirs) != len(self.ref_counts):
            raise ConfigError(
                f"`ref_counts` ({len(self.ref_counts)}) must match `ref_dirs` ({len(self.ref_dirs)})"
            )
        self.cluster_sizes = np.asarray(self.cluster_sizes, dtype=np.int64)
        if self.cluster_sizes.size == 0:
            self.cluster_sizes = np.zeros(k, np.int64)
        if self.cluster_sizes.shape != (k,):
            raise ConfigError(
                f"`cluster_sizes` must have K={k} entries, got {self.cluster_sizes.shape}"
            )
        self.encoder_spec = self.encoder_spec or self.encoder

    @property
    def k(self) -> int:
        """Number of clusters K."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.centroids.shape[1])

    @property
    def digest(self) -> str:
        """16 hex digits identifying these centroids for this encoder."""
        return _digest(self.centroids, self.encoder)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file atomically (temporary sibling, fsync, rename, fsync folder)."""
        from safetensors.numpy import save_file

        path = Path(path)
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": self.encoder,
            "encoder_spec": self.encoder_spec,
            "k": str(self.k),
            "dim": str(self.dim),
            "seed": str(self.seed),
            "ref_dirs": json.dumps(self.ref_dirs),
            "ref_counts": json.dumps(self.ref_counts),
            "class_names": json.dumps(self.class_names),
            "digest": self.digest,
        }
        tensors: dict[str, NDArray[Any]] = {
            "centroids": self.centroids,
            "composition": self.composition,
            "cluster_sizes": self.cluster_sizes,
        }
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Centroids:
        """Read a file written by :meth:`save`; checks the format, version and digest."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"centroids file {os.fspath(path)!r} does not exist: build it with "
                "`rsprune-data centroids REF_DIR -o FILE` (or build_centroids)"
            )
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(
                f"{os.fspath(path)!r} is not a readable safetensors file ({exc}): build the "
                "centroids again"
            ) from exc
        if meta.get("format") != FORMAT or "centroids" not in arrays:
            raise ConfigError(
                f"{os.fspath(path)!r} is not an rsprune centroids file "
                f"(format={meta.get('format')!r}): pass the file written by `rsprune-data centroids`"
            )
        if meta.get("version") != VERSION:
            raise ConfigError(
                f"{os.fspath(path)!r} has centroids format version {meta.get('version')!r}, this "
                f"rsprune_data reads version {VERSION}: upgrade rsprune-data or rebuild the centroids"
            )
        out = cls(
            centroids=arrays["centroids"],
            encoder=meta["encoder"],
            seed=int(meta["seed"]),
            ref_dirs=json.loads(meta["ref_dirs"]),
            ref_counts=json.loads(meta["ref_counts"]),
            class_names=json.loads(meta["class_names"]),
            composition=arrays["composition"],
            encoder_spec=meta.get("encoder_spec", ""),
            cluster_sizes=arrays.get("cluster_sizes", np.zeros(0, np.int64)),
        )
        if out.digest != meta.get("digest"):
            raise ConfigError(
                f"{os.fspath(path)!r} is damaged: its digest {meta.get('digest')!r} does not match "
                f"its contents ({out.digest}); build the centroids again"
            )
        return out


def reference_images(
    ref_dirs: Sequence[str | os.PathLike[str]],
) -> tuple[list[Path], NDArray[np.int64], list[str], list[int]]:
    """Images of labelled reference folders laid out as ``DIR/CLASS/IMAGE``.

    The class of an image is its sub-folder's name (images anywhere below ``DIR/CLASS``); images
    directly in ``DIR`` belong to a class named after ``DIR``. Equal class names in several folders are
    one class. Files are sorted, so the order does not depend on the file system.

    Returns:
        ``(paths, class id per path, sorted class names, images per folder)``.
    """
    if isinstance(ref_dirs, str | os.PathLike) or len(ref_dirs) == 0:
        raise ConfigError(f"`ref_dirs` must be a non-empty list of folders, got {ref_dirs!r}")
    exts = {f".{e}" for e in IMAGE_EXTS}
    found: list[tuple[Path, str]] = []
    counts: list[int] = []
    for d in ref_dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise ConfigError(
                f"reference folder {os.fspath(d)!r} does not exist or is not a folder: pass "
                "folders laid out as DIR/CLASS/IMAGE"
            )
        before = len(found)
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in exts and p.is_file():
                rel = p.relative_to(root).parts
                found.append((p, rel[0] if len(rel) > 1 else root.resolve().name))
        counts.append(len(found) - before)
        if counts[-1] == 0:
            raise ConfigError(
                f"reference folder {os.fspath(d)!r} holds no images ({', '.join(IMAGE_EXTS)}): "
                "pass folders laid out as DIR/CLASS/IMAGE"
            )
    names = sorted({cls for _, cls in found})
    lookup = {name: i for i, name in enumerate(names)}
    labels = np.array([lookup[cls] for _, cls in found], dtype=np.int64)
    return [p for p, _ in found], labels, names, counts


def _composition(
    ids: NDArray[np.int16], labels: NDArray[np.int64], k: int, c: int
) -> NDArray[np.float32]:
    counts = np.zeros((k, c), np.float64)
    np.add.at(counts, (ids.astype(np.int64), labels), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0).astype(np.float32)


def build_centroids(
    ref_dirs: Sequence[str | os.PathLike[str]],
    encoder: Encoder,
    *,
    k: int = 200,
    seed: int = 0,
    niter: int = 25,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    gpu: bool | None = None,
) -> Centroids:
    """Embed the reference folders, cluster them with spherical k-means, and describe the clusters.

    Undecodable reference images are skipped with a warning (they are not counted in ``ref_counts``).

    Args:
        ref_dirs: Labelled reference folders (see :func:`reference_images`).
        encoder: The encoder that will also embed the data to prune.
        k: Number of clusters (the paper's robust default is 200).
        seed: k-means seed.
        niter: k-means iterations.
        batch_size, num_workers, progress: As :func:`embed_images`.
        gpu: As :func:`spherical_kmeans`.

    Returns:
        :class:`Centroids`.

    Example:
        >>> cents = build_centroids(["examples/data/ucmerced"], load_encoder(), k=20)  # doctest: +SKIP
    """
    paths, labels, names, counts = reference_images(ref_dirs)
    if is_int(k) and k > len(paths):
        raise ConfigError(
            f"k={k} clusters need at least k reference images, got n={len(paths)} in "
            f"{[os.fspath(d) for d in ref_dirs]}: lower --k or add reference folders"
        )
    emb = embed_images(
        paths,
        encoder,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        skip_corrupt=True,
    )
    ok = np.any(emb != 0, axis=1)
    emb, labels = emb[ok], labels[ok]
    folder = np.repeat(np.arange(len(counts)), counts)  # reference_images lists folder by folder
    ref_counts = np.bincount(folder[ok], minlength=len(counts)).tolist()
    mu = spherical_kmeans(emb, k, seed=seed, niter=niter, gpu=gpu)
    ids, _ = assign(emb, mu)
    return Centroids(
        centroids=mu,
        encoder=encoder.name,
        seed=seed,
        ref_dirs=[os.fspath(d) for d in ref_dirs],
        ref_counts=ref_counts,
        class_names=names,
        composition=_composition(ids, labels, k, len(names)),
        encoder_spec=getattr(encoder, "spec", encoder.name),
        cluster_sizes=np.bincount(ids.astype(np.int64), minlength=k),
    )
