"""Centroids: embedding through DataLoader workers, spherical k-means, assignment, the file format."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DATA
from safetensors.numpy import save_file

from rsprune_data.centroids import (
    Centroids,
    assign,
    build_centroids,
    embed_images,
    reference_images,
    spherical_kmeans,
)
from rsprune_data.encoders import Encoder
from rsprune_data.encoders._base import ImageTransform
from rsprune_data.errors import ConfigError, CorruptImageError

UCM = SAMPLE_DATA / "ucmerced"


class ProjectionEncoder:
    """A tiny deterministic Encoder: 8x8 thumbnail -> fixed random projection -> unit vector."""

    name = "test-projection"
    dim = 12
    image_size = 8
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.preprocess = ImageTransform(
            size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash"
        )
        self._w = torch.from_numpy(
            np.random.default_rng(0).normal(size=(192, self.dim)).astype(np.float32)
        )

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(batch.flatten(1) @ self._w, dim=1).numpy()


@pytest.fixture(scope="module")
def enc() -> ProjectionEncoder:
    return ProjectionEncoder()


def _unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- k-means


def test_kmeans_is_deterministic_and_unit_norm() -> None:
    x = _unit_rows(300, 16)
    a = spherical_kmeans(x, 12, seed=3)
    assert a.shape == (12, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, spherical_kmeans(x, 12, seed=3))
    assert not np.array_equal(a, spherical_kmeans(x, 12, seed=4))
    np.testing.assert_allclose(
        a, spherical_kmeans(x * 3.0, 12, seed=3), atol=1e-5
    )  # inputs are normalised


def test_kmeans_finds_separated_groups() -> None:
    centres = np.eye(4, 8, dtype=np.float32)
    x = np.repeat(centres, 25, axis=0) + 0.01 * _unit_rows(100, 8)
    mu = spherical_kmeans(x, 4, seed=0)
    np.testing.assert_allclose(np.sort(np.abs(mu @ centres.T).max(axis=0)), 1.0, atol=1e-3)


def test_kmeans_errors() -> None:
    x = _unit_rows(5, 4)
    with pytest.raises(ConfigError, match=r"k=6 .*n=5"):
        spherical_kmeans(x, 6)
    for bad_k in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="`k`"):
            spherical_kmeans(x, bad_k)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zero"):
        spherical_kmeans(np.vstack([x, np.zeros((1, 4), np.float32)]), 2)
    with pytest.raises(ConfigError, match="2-D"):
        spherical_kmeans(x[0], 1)
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(ConfigError, match="gpu=True"):
            spherical_kmeans(x, 2, gpu=True)


# -------------------------------------------------------------------------------------------- assignment


def test_assign_is_argmax_of_cosine() -> None:
    emb, mu = _unit_rows(500, 16, seed=1), _unit_rows(20, 16, seed=2)
    sims = emb @ mu.T
    ids, cos = assign(emb, mu)
    assert ids.dtype == np.int16 and cos.dtype == np.float32
    np.testing.assert_array_equal(ids, sims.argmax(axis=1))
    np.testing.assert_allclose(cos, sims.max(axis=1), atol=1e-6)
    for kwargs in (
        {"chunk_size": 7},
        {"device": "cpu"},
        {"device": torch.device("cpu"), "chunk_size": 64},
    ):
        ids2, cos2 = assign(emb, mu, **kwargs)  # type: ignore[arg-type]
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_allclose(cos2, cos, atol=1e-6)


def test_assign_ties_go_to_the_lower_id_and_empty_input() -> None:
    mu = np.eye(3, dtype=np.float32)[[0, 0, 1]]
    for device in (None, "cpu"):
        ids, cos = assign(np.eye(3, dtype=np.float32)[:2], mu, device)
        assert ids.tolist() == [0, 2] and cos.tolist() == [1.0, 1.0]
        ids, cos = assign(np.zeros((0, 3), np.float32), mu, device)
        assert ids.shape == cos.shape == (0,)


def test_assign_errors() -> None:
    with pytest.raises(ConfigError, match=r"\[n, 4\]"):
        assign(_unit_rows(3, 5), _unit_rows(2, 4))
    with pytest.raises(ConfigError, match="int16"):
        assign(_unit_rows(1, 2), np.ones((40_000, 2), np.float32))


# ------------------------------------------------------------------------------------- Centroids file


def _centroids(**overrides) -> Centroids:
    fields = dict(
        centroids=_unit_rows(4, 6),
        encoder="test-projection",
        seed=7,
        ref_dirs=["a", "b"],
        ref_counts=[3, 5],
        class_names=["x", "y", "z"],
        composition=np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0, 0.25, 0.75]], np.float32),
        encoder_spec="test-projection@8px",
        cluster_sizes=np.array([1, 2, 0, 4]),
    )
    fields.update(overrides)
    return Centroids(**fields)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path) -> None:
    c = _centroids()
    path = tmp_path / "ref.centroids.safetensors"
    c.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    d = Centroids.load(path)
    np.testing.assert_array_equal(d.centroids, c.centroids)
    np.testing.assert_array_equal(d.composition, c.composition)
    np.testing.assert_array_equal(d.cluster_sizes, c.cluster_sizes)
    for attr in (
        "encoder",
        "encoder_spec",
        "seed",
        "ref_dirs",
        "ref_counts",
        "class_names",
        "digest",
        "k",
        "dim",
    ):
        assert getattr(d, attr) == getattr(c, attr), attr
    c.save(path)  # overwriting is atomic too
    assert Centroids.load(path).digest == c.digest


def test_digest_depends_on_centroids_and_encoder_only() -> None:
    c = _centroids()
    assert len(c.digest) == 16 and c.digest == _centroids().digest
    assert c.digest == _centroids(seed=8, ref_dirs=["q", "r"]).digest
    assert c.digest != _centroids(encoder="other").digest
    assert c.digest != _centroids(centroids=_unit_rows(4, 6, seed=9)).digest


def test_load_refuses_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Centroids.load(tmp_path / "missing.safetensors")
    save_file(
        {"centroids": np.zeros((2, 2), np.float32)},
        str(tmp_path / "index.safetensors"),
        metadata={"format": "rsprune-index"},
    )
    with pytest.raises(ConfigError, match="not an rsprune centroids file"):
        Centroids.load(tmp_path / "index.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="safetensors"):
        Centroids.load(tmp_path / "junk.safetensors")
    c = _centroids()
    meta = {
        "format": "rsprune-centroids",
        "version": "1",
        "encoder": c.encoder,
        "seed": "0",
        "ref_dirs": "[]",
        "ref_counts": "[]",
        "class_names": '["x", "y", "z"]',
        "digest": "0" * 16,
    }
    save_file(
        {"centroids": c.centroids, "composition": c.composition},
        str(tmp_path / "edited.safetensors"),
        metadata=meta,
    )
    with pytest.raises(ConfigError, match="damaged"):
        Centroids.load(tmp_path / "edited.safetensors")


def test_centroids_validation() -> None:
    with pytest.raises(ConfigError, match="composition"):
        _centroids(composition=np.zeros((4, 2), np.float32))
    with pytest.raises(ConfigError, match="ref_counts"):
        _centroids(ref_counts=[1])


# ------------------------------------------------------------------------------------- reference folders


def _copy_images(dst, n: int, src_class: str = "airplane"):
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted((UCM / src_class).glob("*.jpg"))[:n]:
        shutil.copy(f, dst / f.name)


def test_reference_layout(tmp_path) -> None:
    _copy_images(tmp_path / "ds1" / "beach", 2, "beach")
    _copy_images(tmp_path / "ds1" / "airplane" / "nested", 1)
    _copy_images(tmp_path / "ds2" / "airplane", 2)
    _copy_images(
        tmp_path / "forest", 3, "forest"
    )  # images directly in the folder: class = folder name
    (tmp_path / "ds2" / "airplane" / "notes.txt").write_text("not an image")
    paths, labels, names, counts = reference_images(
        [tmp_path / "ds1", tmp_path / "ds2", tmp_path / "forest"]
    )
    assert names == ["airplane", "beach", "forest"]
    assert counts == [3, 2, 3]
    assert [names[i] for i in labels] == ["airplane", "beach", "beach", "airplane", "airplane"] + [
        "forest"
    ] * 3
    assert paths[0].parent.name == "nested"
    with pytest.raises(ConfigError, match="does not exist"):
        reference_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        reference_images([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="non-empty list"):
        reference_images(str(tmp_path / "forest"))  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- embedding


def test_embed_images_workers_and_item_kinds(enc) -> None:
    assert isinstance(enc, Encoder)
    files = sorted((UCM / "airplane").glob("*.jpg"))
    inline = embed_images(files, enc, batch_size=2, num_workers=0, progress=False)
    assert inline.shape == (5, enc.dim) and inline.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(inline, axis=1), 1.0, atol=1e-5)
    workers = embed_images(files, enc, batch_size=2, num_workers=1, progress=False)
    np.testing.assert_array_equal(workers, inline)
    data = [f.read_bytes() for f in files]
    np.testing.assert_array_equal(
        embed_images(data, enc, batch_size=2, num_workers=0, progress=False), inline
    )
    pairs = [(d, "jpg") for d in data]
    np.testing.assert_allclose(
        embed_images(pairs, enc, batch_size=3, num_workers=0, progress=False), inline, atol=1e-6
    )
    assert embed_images([], enc, progress=False).shape == (0, enc.dim)


def test_embed_images_corrupt(enc, tmp_path) -> None:
    files = sorted((UCM / "airplane").glob("*.jpg"))[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(files[0].read_bytes()[:200])
    items = [files[0], bad, files[1]]
    with pytest.raises(CorruptImageError, match=r"broken\.jpg"):
        embed_images(items, enc, num_workers=0, progress=False)
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        emb = embed_images(items, enc, num_workers=0, progress=False, skip_corrupt=True)
    assert not emb[1].any()
    np.testing.assert_allclose(np.linalg.norm(emb[[0, 2]], axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------- build_centroids


def test_build_centroids_on_sample_tiles(enc, tmp_path) -> None:
    c = build_centroids([UCM], enc, k=12, seed=0, num_workers=0, progress=False)
    assert (
        c.centroids.shape == (12, enc.dim) and c.encoder == enc.name and c.encoder_spec == enc.name
    )
    np.testing.assert_allclose(np.linalg.norm(c.centroids, axis=1), 1.0, atol=1e-5)
    assert (
        len(c.class_names) == 21
        and c.class_names == sorted(c.class_names)
        and c.ref_counts == [105]
    )
    assert c.cluster_sizes.sum() == 105
    sums = c.composition.sum(axis=1)
    np.testing.assert_allclose(sums[c.cluster_sizes > 0], 1.0, atol=1e-5)
    assert not c.composition[c.cluster_sizes == 0].any()
    again = build_centroids([UCM], enc, k=12, seed=0, num_workers=0, progress=False)
    assert again.digest == c.digest
    c.save(tmp_path / "c.safetensors")
    assert Centroids.load(tmp_path / "c.safetensors").digest == c.digest


def test_build_centroids_skips_corrupt_references(enc, tmp_path) -> None:
    _copy_images(tmp_path / "ref" / "airplane", 3)
    _copy_images(tmp_path / "ref" / "beach", 3, "beach")
    (tmp_path / "ref" / "beach" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = build_centroids([tmp_path / "ref"], enc, k=2, num_workers=0, progress=False)
    assert any("zz-broken.jpg" in str(w.message) for w in caught)
    assert c.ref_counts == [6] and c.cluster_sizes.sum() == 6


def test_build_centroids_k_larger_than_the_reference_set(enc) -> None:
    with pytest.raises(ConfigError, match=r"k=200 .*n=5"):
        build_centroids([UCM / "airplane"], enc, k=200, progress=False)


def test_assign_does_not_depend_on_batching_or_float16_widening() -> None:
    """The indexer (float32 batches of a few dozen images) and reassign (a shard's float16 rows at
    once) must agree bitwise: a row's result does not depend on the rows that came with it."""
    from rsprune_data.centroids import assign
    from rsprune_data.embeddings import canonical

    rng = np.random.default_rng(0)
    for d, k in ((96, 37), (1280, 50)):
        mu = canonical(rng.standard_normal((k, d))).astype(np.float32)
        emb16 = canonical(rng.standard_normal((3000, d)))
        z, s = assign(emb16, mu)  # float16 rows, widened chunk by chunk
        for step in (1, 7, 64, 100, 2048):
            parts = [
                assign(emb16[i : i + step].astype(np.float32), mu) for i in range(0, 3000, step)
            ]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), z)
            assert np.array_equal(np.concatenate([p[1] for p in parts]), s)
