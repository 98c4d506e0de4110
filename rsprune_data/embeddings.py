"""The per-shard embeddings sidecar: ``<shard>.rsemb.safetensors`` beside the shard's index.

With ``index --store-embeddings`` the indexer keeps, per sample and in tar order, the embedding it
assigned the sample from, so centroids, K, the reference set and near-duplicate removal can change
later without decoding or encoding a single image again (:mod:`rsprune_data.reassign`,
:mod:`rsprune_data.dedup`).

The assignment representation. The indexer and ``reassign`` assign from exactly the same numbers:
the encoder's output l2-normalised in float32 and rounded to float16 (:func:`canonical`), then
widened back to float32 for the matrix product. So a float16 sidecar reproduces the indexer's
cluster ids bit for bit (up to the matrix product's own summation order), whether or not embeddings
are stored. Against assigning from the float32 output this moves each cosine by at most ~1e-3
(float16 has an 11-bit mantissa); ``benchmarks/reassign_speed.py --images`` counts how many cluster ids
that flips on the shipped images.

Forms (``form`` metadata), each with its measured cosine error against the float32 embedding
(``cos_error_max``/``cos_error_mean`` = ``1 - cos(x, x_hat)`` over the shard's rows, in metadata):

- ``float16`` (default): ``embeddings [n, d]`` float16, the canonical representation itself.
- ``int8``: ``codes [n, d]`` int8 and ``scales [n]`` float32, ``x_hat = codes * scale`` with one
  symmetric scale per row (``max |x| / 127``): half the bytes.
- ``pca``: ``codes [n, d']`` float16 coefficients in a :class:`PcaBasis` fitted once on a sample
  (``mean [d]``, ``components [d', d]``, stored in every sidecar so each file reads alone),
  ``x_hat = mean + codes @ components``: ``d / d'`` times fewer bytes than float16.

Rows of samples that could not be decoded are all zeros, ``valid`` = 0. Metadata ties the file to
its shard (``shard_size``, ``shard_mtime_ns``, ``shard_fingerprint``, as the index) and to the encoder;
``digest`` (xxh3-128 of the tensors) is checked on every read and keys the near-duplicate cache.
Written atomically (``_fsio.atomic_write_bytes``: temporary sibling, fsync, rename, fsync folder);
no pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import index as idx
from .errors import ConfigError, IndexMismatchError, IndexNotFoundError, StaleIndexError

FORMAT_NAME = "rsprune-embeddings"
FORMAT_VERSION = "1"
SIDECAR_SUFFIX = ".rsemb.safetensors"
FORMS = ("float16", "int8", "pca")
_PCA_FORMAT = "rsprune-pca-basis"


def sidecar_path_for(
    shard: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the embeddings sidecar of ``shard`` lives: beside its index.

    Example:
        >>> sidecar_path_for("data/shard-000001.tar", "idx").as_posix()
        'idx/shard-000001.tar.rsemb.safetensors'
    """
    return sidecar_path_of_index(idx.index_path_for(shard, index_dir))


def sidecar_path_of_index(index_path: str | os.PathLike[str]) -> Path:
    """The sidecar beside an index file ``X.rsidx.safetensors`` -> ``X.rsemb.safetensors``."""
    p = Path(index_path)
    return p.with_name(p.name.removesuffix(idx.INDEX_SUFFIX) + SIDECAR_SUFFIX)


def canonical(emb: NDArray[Any]) -> NDArray[np.float16]:
    """The representation clusters are assigned from: rows l2-normalised in float32, then float16.

    Zero rows (undecodable samples) stay zero.

    Example:
        >>> canonical(np.array([[3.0, 4.0]])).tolist()
        [[0.60009765625, 0.7998046875]]
    """
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"embeddings must be a 2-D [n, d] array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: NDArray[np.float16] = (x / np.where(norms > 0, norms, 1.0)).astype(np.float16)
    return unit


# --- PCA basis ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PcaBasis:
    """A PCA basis for the ``pca`` form: ``x_hat = mean + codes @ components``.

    Attributes:
        mean: float32 ``[d]``.
        components: float32 ``[d', d]`` orthonormal rows, largest variance first.
        encoder: the encoder id of the embeddings it was fitted on.
    """

    mean: NDArray[np.float32]
    components: NDArray[np.float32]
    encoder: str

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def digest(self) -> str:
        import xxhash

        h = xxhash.xxh3_128()
        h.update(self.encoder.encode())
        h.update(np.ascontiguousarray(self.mean, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.components, "<f4").tobytes())
        return h.hexdigest()

    def project(self, x: NDArray[Any]) -> NDArray[np.float32]:
        return np.asarray((np.asarray(x, np.float32) - self.mean) @ self.components.T, np.float32)

    def reconstruct(self, codes: NDArray[Any]) -> NDArray[np.float32]:
        return np.asarray(self.mean + np.asarray(codes, np.float32) @ self.components, np.float32)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file atomically."""
        _atomic_save(
            Path(path),
            {"mean": self.mean, "components": self.components},
            {
                "format": _PCA_FORMAT,
                "version": FORMAT_VERSION,
                "encoder": self.encoder,
                "digest": self.digest,
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PcaBasis:
        """Read a file written by :meth:`save` (checks format and digest)."""
        arrays, meta = _read_safetensors(Path(path), "PCA basis")
        if meta.get("format") != _PCA_FORMAT or not {"mean", "components"} <= set(arrays):
            raise ConfigError(
                f"{os.fspath(path)!r} is not an rsprune PCA basis: write one with "
                "PcaBasis.save(fit_pca(...))"
            )
        out = cls(
            arrays["mean"].astype(np.float32),
            arrays["components"].astype(np.float32),
            meta.get("encoder", ""),
        )
        if out.digest != meta.get("digest"):
            raise ConfigError(
                f"PCA basis {os.fspath(path)!r} is damaged (digest mismatch): fit it again"
            )
        return out


def fit_pca(
    emb: NDArray[Any], dims: int, *, encoder: str, max_rows: int = 50_000, seed: int = 0
) -> PcaBasis:
    """Fit a :class:`PcaBasis` with ``dims`` components on (a seeded sample of) ``emb``.

    Args:
        emb: ``[n, d]`` embeddings (zero rows are ignored); normalised with :func:`canonical` first.
        dims: number of components, ``1 <= dims <= d``.
        encoder: the encoder id (a sidecar refuses a basis of another encoder).
        max_rows: fit on at most this many rows, drawn with ``default_rng(seed)``.
        seed: the sampling seed.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(200, 16))
        >>> fit_pca(x, 4, encoder="e").components.shape
        (4, 16)
    """
    x = canonical(emb).astype(np.float32)
    x = x[np.any(x != 0, axis=1)]
    d = x.shape[1]
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= d:
        raise ConfigError(
            f"`dims` must be an int in [1, {d}] (the embedding dimension), got {dims!r}"
        )
    if x.shape[0] < 2:
        raise ConfigError(f"fit_pca needs at least 2 non-zero rows, got {x.shape[0]}")
    if x.shape[0] > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return PcaBasis(mean.astype(np.float32), np.ascontiguousarray(vt[:dims], np.float32), encoder)


# --- forms -------------------------------------------------------------------------------------


def encode_form(
    emb: NDArray[Any], form: str = "float16", basis: PcaBasis | None = None
) -> dict[str, NDArray[Any]]:
    """The tensors of ``form`` for embeddings ``emb`` (normalised with :func:`canonical` first)."""
    x16 = canonical(emb)
    if form == "float16":
        return {"embeddings": x16}
    x = x16.astype(np.float32)
    if form == "int8":
        scale = np.abs(x).max(axis=1) / 127.0
        codes = np.rint(x / np.where(scale > 0, scale, 1.0)[:, None]).astype(np.int8)
        return {"codes": codes, "scales": scale.astype(np.float32)}
    if form == "pca":
        if basis is None:
            raise ConfigError(
                "form='pca' needs a PCA basis: pass basis=fit_pca(sample, dims, ...) "
                "(CLI: --pca-basis FILE)"
            )
        if basis.mean.shape[0] != x.shape[1]:
            raise ConfigError(
                f"the PCA basis is for d={basis.mean.shape[0]}, embeddings have "
                f"d={x.shape[1]}: fit the basis on this encoder's embeddings"
            )
        codes = basis.project(x).astype(np.float16)
        codes[~np.any(x != 0, axis=1)] = 0
        return {"codes": codes, "pca_mean": basis.mean, "pca_components": basis.components}
    raise ConfigError(f"`form` must be one of {list(FORMS)}, got {form!r}")


def decode_form(tensors: Mapping[str, NDArray[Any]], form: str) -> NDArray[np.float32]:
    """float32 ``[n, d]`` rows back from the tensors of ``form`` (not renormalised)."""
    if form == "float16":
        return np.asarray(tensors["embeddings"], dtype=np.float32)
    if form == "int8":
        return (
            np.asarray(tensors["codes"], np.float32)
            * np.asarray(tensors["scales"], np.float32)[:, None]
        )
    if form == "pca":
        codes = np.asarray(tensors["codes"], np.float32)
        out = np.asarray(tensors["pca_mean"], np.float32) + codes @ np.asarray(
            tensors["pca_components"], np.float32
        )
        out[~np.any(codes != 0, axis=1)] = 0
        return out
    raise ConfigError(f"`form` must be one of {list(FORMS)}, got {form!r}")


def cosine_error(reference: NDArray[Any], approx: NDArray[Any]) -> tuple[float, float]:
    """``(max, mean)`` of ``1 - cos(reference_i, approx_i)`` over the non-zero rows."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(approx, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return 0.0, 0.0
    err = 1.0 - (a[ok] * b[ok]).sum(axis=1) / (na[ok] * nb[ok])
    return float(max(err.max(), 0.0)), float(max(err.mean(), 0.0))


# --- files -------------------------------------------------------------------------------------


def _digest(tensors: Mapping[str, NDArray[Any]]) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data)
    return h.hexdigest()


def _atomic_save(path: Path, tensors: Mapping[str, NDArray[Any]], meta: Mapping[str, str]) -> None:
    from safetensors.numpy import save

    from ._fsio import atomic_write_bytes

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(meta))
    atomic_write_bytes(path, data)  # the one home of atomic writes (fsync file and folder)


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, NDArray[Any]], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except FileNotFoundError:
        raise IndexNotFoundError(
            f"no {what} at {os.fspath(path)}: run `rsprune-data index SHARDS "
            "--centroids FILE --store-embeddings` first"
        ) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise StaleIndexError(
            f"{what} {os.fspath(path)} is unreadable ({exc}): delete it and run "
            "`rsprune-data index --store-embeddings --force` again"
        ) from None
    return arrays, meta


def write_sidecar(
    path: str | os.PathLike[str],
    emb: NDArray[Any],
    valid: NDArray[Any],
    *,
    shard_meta: Mapping[str, str],
    encoder: str,
    form: str = "float16",
    basis: PcaBasis | None = None,
) -> dict[str, str]:
    """Write the sidecar of one shard atomically and return its metadata.

    Args:
        path: the sidecar path (:func:`sidecar_path_for`).
        emb: ``[n, d]`` embeddings of every sample in tar order (rows of invalid samples ignored).
        valid: ``[n]`` bool, the index's validity column.
        shard_meta: :func:`rsprune_data.index.shard_metadata` of the shard, taken before reading it.
        encoder: the encoder id.
        form: one of :data:`FORMS`.
        basis: the PCA basis (``form="pca"``).
    """
    x = np.asarray(emb, np.float32)
    ok = np.asarray(valid).astype(bool)
    if x.ndim != 2 or x.shape[0] != ok.shape[0]:
        raise ConfigError(f"embeddings {x.shape} must be [n={ok.shape[0]}, d], one row per sample")
    if basis is not None and basis.encoder and basis.encoder != encoder:
        raise IndexMismatchError(
            f"PCA basis was fitted on {basis.encoder!r} embeddings, not "
            f"{encoder!r}: fit it on this encoder's embeddings"
        )
    x = np.where(ok[:, None], x, 0.0).astype(np.float32)
    tensors = {**encode_form(x, form, basis), "valid": ok.astype(np.uint8)}
    ref = canonical(x).astype(np.float32)
    err_max, err_mean = cosine_error(ref, decode_form(tensors, form))
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "form": form,
        "dim": str(x.shape[1]),
        "num_samples": str(x.shape[0]),
        "encoder": encoder,
        **{
            k: str(shard_meta[k])
            for k in ("shard", "shard_size", "shard_mtime_ns", "shard_fingerprint")
        },
        "pca_digest": basis.digest if form == "pca" and basis is not None else "",
        "cos_error_max": repr(err_max),
        "cos_error_mean": repr(err_mean),
        "digest": _digest(tensors),
    }
    _atomic_save(Path(path), tensors, meta)
    return meta


@dataclass(frozen=True)
class Sidecar:
    """One shard's stored embeddings, validated."""

    path: Path
    form: str
    tensors: dict[str, NDArray[Any]]
    valid: NDArray[np.bool_]
    meta: dict[str, str]

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def encoder(self) -> str:
        return self.meta["encoder"]

    def embeddings(self) -> NDArray[np.float32]:
        """float32 ``[n, d]`` rows (zero rows for invalid samples)."""
        return decode_form(self.tensors, self.form)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The checked metadata of a sidecar (reads only its header)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        return {}
    return (
        meta if meta.get("format") == FORMAT_NAME and meta.get("version") == FORMAT_VERSION else {}
    )


def sidecar_is_current(
    shard: str, path: Path, *, encoder: str, form: str, pca_digest: str = ""
) -> bool:
    """True when ``path`` is a complete sidecar of ``shard`` as it is now, for this encoder/form."""
    meta = read_metadata(path)
    if (
        not meta
        or meta.get("encoder") != encoder
        or meta.get("form") != form
        or meta.get("pca_digest", "") != pca_digest
    ):
        return False
    return not idx.shard_is_stale(shard, meta)


def read_sidecar(
    path: str | os.PathLike[str],
    *,
    index_meta: Mapping[str, str] | None = None,
    valid: NDArray[Any] | None = None,
) -> Sidecar:
    """Read and validate one sidecar.

    Checks the format and version, every tensor's shape, the content digest, and, given the
    shard's index metadata and validity column, that both describe the same shard bytes (same
    ``shard_fingerprint`` and size) and the same samples.

    Raises:
        IndexNotFoundError: no sidecar (names the command that writes one).
        StaleIndexError: unreadable, damaged, or of another version of the shard than the index.
        IndexMismatchError: not a sidecar, or another format version.
    """
    p = Path(path)
    arrays, meta = _read_safetensors(p, "embeddings sidecar")
    if meta.get("format") != FORMAT_NAME:
        raise IndexMismatchError(
            f"{p} is not an rsprune embeddings sidecar (format={meta.get('format')!r})"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"embeddings sidecar {p} has version {meta.get('version')!r}, this "
            f"rsprune_data reads {FORMAT_VERSION}: index again with --store-embeddings"
        )
    form, n, d = (
        meta.get("form", ""),
        int(meta.get("num_samples", "-1")),
        int(meta.get("dim", "-1")),
    )
    want: dict[str, tuple[int, ...]] = {"valid": (n,)}
    if form == "float16":
        want["embeddings"] = (n, d)
    elif form == "int8":
        want.update(codes=(n, d), scales=(n,))
    elif form == "pca":
        dp = arrays["codes"].shape[1] if "codes" in arrays and arrays["codes"].ndim == 2 else -1
        want.update(codes=(n, dp), pca_mean=(d,), pca_components=(dp, d))
    else:
        raise StaleIndexError(f"embeddings sidecar {p} has unknown form {form!r}: index again")
    wrong = [k for k, shape in want.items() if k not in arrays or arrays[k].shape != shape]
    if wrong or _digest(arrays) != meta.get("digest"):
        raise StaleIndexError(
            f"embeddings sidecar {p} is damaged ({'bad ' + str(wrong) if wrong else 'digest mismatch'}):"
            " delete it and run `rsprune-data index --store-embeddings --force` again"
        )
    ok = arrays["valid"].astype(bool)
    if index_meta is not None:
        for key in ("shard_fingerprint", "shard_size"):
            if index_meta.get(key) != meta.get(key):
                raise StaleIndexError(
                    f"embeddings sidecar {p} and its index describe different shard contents "
                    f"({key} {meta.get(key)!r} vs {index_meta.get(key)!r}): run `rsprune-data index "
                    f"{meta.get('shard', '<shard>')} --store-embeddings --force` again"
                )
        if int(index_meta.get("num_samples", n)) != n:
            raise StaleIndexError(
                f"embeddings sidecar {p} has {n} rows, its index "
                f"{index_meta.get('num_samples')}: index again with --force"
            )
    if valid is not None and not np.array_equal(np.asarray(valid).astype(bool), ok):
        raise StaleIndexError(
            f"embeddings sidecar {p} marks other samples valid than its index: "
            "index again with --store-embeddings --force"
        )
    return Sidecar(p, form, arrays, ok, meta)


__all__ = [
    "FORMS",
    "PcaBasis",
    "Sidecar",
    "canonical",
    "cosine_error",
    "decode_form",
    "encode_form",
    "fit_pca",
    "read_sidecar",
    "sidecar_path_for",
    "write_sidecar",
]
