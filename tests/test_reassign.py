"""Embeddings sidecar + ``reassign`` on real tar shards of the shipped JPEG tiles, real encoder.

The claim under test: index once with ``--store-embeddings``, then ``reassign`` to centroids built on
another reference set with another K gives the indexes a fresh ``index`` with those centroids writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_DATA
from test_indexer import harvey_files, write_shards

from rsprune_data.centroids import Centroids, build_centroids
from rsprune_data.cli import main as cli_main
from rsprune_data.embeddings import (
    PcaBasis,
    canonical,
    cosine_error,
    decode_form,
    encode_form,
    fit_pca,
    read_sidecar,
    sidecar_path_for,
    write_sidecar,
)
from rsprune_data.errors import IndexMismatchError, IndexNotFoundError, StaleIndexError
from rsprune_data.index import PruneIndex, index_path_for, read_index, shard_metadata
from rsprune_data.indexer import index_shards
from rsprune_data.reassign import reassign_shards


def _centroids(emb, k, seed, enc, ref):
    from rsprune_data.centroids import spherical_kmeans

    return Centroids(
        centroids=spherical_kmeans(emb, k, seed=seed),
        encoder=enc.name,
        seed=seed,
        ref_dirs=[ref],
        ref_counts=[len(emb)],
        class_names=["all"],
        composition=np.ones((k, 1), np.float32),
    )


def _index(shards, cents, enc, out, **kw):
    report = index_shards(
        shards,
        centroids=cents,
        encoder=enc,
        index_dir=out,
        workers=0,
        batch_size=8,
        progress=False,
        **kw,
    )
    assert report.ok, report.failed
    return report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rsprune_data.centroids import embed_images
    from rsprune_data.encoders import load_encoder

    tmp = tmp_path_factory.mktemp("reassign")
    shards = write_shards(tmp, harvey_files(36), 12, corrupt={5})
    enc = load_encoder("efficientnet-lite0", image_size=64, device="cpu")
    ucm = SAMPLE_DATA / "ucmerced"
    cents_a = build_centroids([ucm], enc, k=8, seed=0, progress=False, num_workers=0)
    # other reference sets (K = 5 and 12): half of UC Merced + Harvey damage tiles, and all of both
    ucm_emb = embed_images(sorted(ucm.rglob("*.jpg")), enc, num_workers=0, progress=False)
    dmg = sorted((SAMPLE_DATA / "harvey" / "damage").glob("*.jpeg"))[::4]
    dmg_emb = embed_images(dmg, enc, num_workers=0, progress=False)
    cents_b = _centroids(np.concatenate([ucm_emb[::2], dmg_emb]), 5, 1, enc, "ucm/2+damage")
    cents_c = _centroids(np.concatenate([ucm_emb, dmg_emb]), 12, 2, enc, "ucm+damage")
    for name, c in (("a", cents_a), ("b", cents_b), ("c", cents_c)):
        c.save(tmp / f"{name}.safetensors")
    cents = {k: Centroids.load(tmp / f"{k}.safetensors") for k in "abc"}
    _index(shards, cents["a"], enc, tmp / "stored", store_embeddings="float16")
    return tmp, shards, enc, cents


def _stored_copy(tmp: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(tmp / "stored", out)
    return out


def _same_index(shards, dir_x, dir_y):
    for s in shards:
        ax, mx = read_index(index_path_for(s, dir_x))
        ay, my = read_index(index_path_for(s, dir_y))
        for k in ax:
            if k == "similarity":
                # the same float16 inputs and product: equal up to summation order
                np.testing.assert_allclose(ax[k], ay[k], rtol=0, atol=1e-6)
            else:
                np.testing.assert_array_equal(ax[k], ay[k], err_msg=k)
        for k in ("encoder", "centroids_digest", "num_clusters", "shard_fingerprint", "reasons"):
            assert mx[k] == my[k], k


@pytest.mark.parametrize("target", ["b", "c"])
def test_reassign_equals_a_fresh_index_with_the_new_centroids(setup, target):
    tmp, shards, enc, cents = setup
    stored = _stored_copy(tmp, f"stored_{target}")
    fresh = tmp / f"fresh_{target}"
    _index(shards, cents[target], enc, fresh)
    before = PruneIndex.load(shards, stored)
    rep = reassign_shards(shards, cents[target], index_dir=stored, progress=False)
    assert rep.ok and rep.samples == 36 and len(rep.reassigned) == 3
    _same_index(shards, stored, fresh)
    after = PruneIndex.load(shards, stored)
    assert after.num_clusters == cents[target].k != before.num_clusters
    assert (after.cluster_ids != before.cluster_ids).any()
    # and back: the original assignment is reassign with the original centroids
    reassign_shards(shards, cents["a"], index_dir=stored, progress=False)
    np.testing.assert_array_equal(PruneIndex.load(shards, stored).cluster_ids, before.cluster_ids)


def test_reassign_refuses_another_encoder_before_writing(setup):
    tmp, shards, _enc, cents = setup
    out = _stored_copy(tmp, "enc_mismatch")
    c = cents["b"]
    alien = Centroids(
        centroids=c.centroids,
        encoder="open_clip:ViT-B-32",
        seed=0,
        ref_dirs=c.ref_dirs,
        ref_counts=c.ref_counts,
        class_names=c.class_names,
        composition=c.composition,
    )
    stamp = [index_path_for(s, out).stat().st_mtime_ns for s in shards]
    with pytest.raises(IndexMismatchError, match="same encoder"):
        reassign_shards(shards, alien, index_dir=out, progress=False)
    assert stamp == [index_path_for(s, out).stat().st_mtime_ns for s in shards]


def test_reassign_cli_rank_split_and_missing_sidecar(setup, capsys):
    tmp, shards, _enc, cents = setup
    out = _stored_copy(tmp, "cli")
    before = {s: read_index(index_path_for(s, out))[1]["centroids_digest"] for s in shards}
    args = [
        "reassign",
        *shards,
        "--centroids",
        str(tmp / "b.safetensors"),
        "--index-dir",
        str(out),
        "-q",
    ]
    assert cli_main([*args, "--rank", "1", "--world-size", "2"]) == 0
    after = {s: read_index(index_path_for(s, out))[1]["centroids_digest"] for s in shards}
    assert [after[s] == cents["b"].digest for s in shards] == [False, True, False]
    assert after[shards[0]] == before[shards[0]]
    assert "reassigned 1 shard(s)" in capsys.readouterr().out
    sidecar_path_for(shards[2], out).unlink()
    assert cli_main(args) == 2
    assert "--store-embeddings" in capsys.readouterr().err


def test_index_is_redone_when_the_sidecar_is_missing_and_sidecar_validates(setup):
    tmp, shards, enc, cents = setup
    out = _stored_copy(tmp, "resume")
    for s in shards[1:]:
        sidecar_path_for(s, out).unlink()
    rep = _index(shards, cents["a"], enc, out, store_embeddings="float16")
    assert rep.skipped == shards[:1] and rep.indexed == shards[1:]  # sidecar missing: again
    assert len(_index(shards, cents["a"], enc, out, store_embeddings="float16").skipped) == 3
    arrays, meta = read_index(index_path_for(shards[0], out))
    side = read_sidecar(sidecar_path_for(shards[0], out), index_meta=meta, valid=arrays["valid"])
    assert side.form == "float16" and side.encoder == enc.name and not side.valid[5]
    assert side.embeddings().shape == (12, enc.dim) and not side.embeddings()[5].any()
    # the stored rows are the indexer's assignment inputs
    z = np.argmax(side.embeddings()[side.valid] @ cents["a"].centroids.T, axis=1)
    np.testing.assert_array_equal(z, arrays["cluster_id"][side.valid])
    # damaged bytes, another version of the shard: refused with the fix
    path = sidecar_path_for(shards[1], out)
    blob = bytearray(path.read_bytes())
    blob[-7] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StaleIndexError, match="damaged"):
        read_sidecar(path)
    other_meta = {**meta, "shard_fingerprint": "0" * 32}
    with pytest.raises(StaleIndexError, match="different shard contents"):
        read_sidecar(sidecar_path_for(shards[0], out), index_meta=other_meta)
    with pytest.raises(IndexNotFoundError, match="store-embeddings"):
        read_sidecar(tmp / "nothing.rsemb.safetensors")


def test_reduced_forms_are_within_their_stated_cosine_error(setup, tmp_path):
    _, shards, enc, _cents = setup
    side = read_sidecar(sidecar_path_for(shards[0], setup[0] / "stored"))
    rng = np.random.default_rng(0)
    # real embeddings of the shipped tiles plus random unit rows, so d' < n holds for the PCA
    emb = np.concatenate(
        [side.embeddings()[side.valid], rng.standard_normal((200, enc.dim)).astype(np.float32)]
    )
    ref = canonical(emb).astype(np.float32)
    assert cosine_error(emb, ref)[0] < 1e-6  # float16 itself
    err8 = cosine_error(ref, decode_form(encode_form(emb, "int8"), "int8"))
    assert err8[0] < 1e-4
    basis = fit_pca(emb, 64, encoder=enc.name)
    errp = cosine_error(ref, decode_form(encode_form(emb, "pca", basis), "pca"))
    full = fit_pca(emb, enc.dim, encoder=enc.name)
    assert cosine_error(ref, decode_form(encode_form(emb, "pca", full), "pca"))[0] < 1e-5
    assert errp[0] > err8[0]
    valid = np.ones(len(emb), bool)
    meta = shard_metadata(shards[0])
    for form, b, err in (("int8", None, err8), ("pca", basis, errp)):
        path = tmp_path / f"{form}.rsemb.safetensors"
        stated = write_sidecar(
            path, emb, valid, shard_meta=meta, encoder=enc.name, form=form, basis=b
        )
        assert float(stated["cos_error_max"]) == pytest.approx(err[0], rel=1e-6, abs=1e-9)
        back = read_sidecar(path)
        assert cosine_error(ref, back.embeddings())[0] <= float(stated["cos_error_max"]) + 1e-9


def test_dedup_threshold_on_stored_embeddings_removes_planted_copies(setup, tmp_path, capsys):
    import io

    import webdataset as wds
    from PIL import Image

    from rsprune_data import PruneConfig
    from rsprune_data.dedup_cache import cache_path_of_index

    _, _, enc, cents = setup
    files = harvey_files(24)
    planted = {}  # copy key -> original key: exact byte copies and re-encoded, flipped-pixel copies
    shards = []
    for s in range(2):
        path = tmp_path / f"d-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i, f in enumerate(files[s * 12 : (s + 1) * 12], start=s * 12):
                w.write({"__key__": f"t{i:03d}", "jpeg": f.read_bytes()})
            for i in (s * 12 + 1, s * 12 + 4):
                w.write({"__key__": f"copy{i:03d}", "jpeg": files[i].read_bytes()})
                planted[f"copy{i:03d}"] = f"t{i:03d}"
                img = Image.open(files[i]).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=95)
                w.write({"__key__": f"near{i:03d}", "jpeg": buf.getvalue()})
                planted[f"near{i:03d}"] = f"t{i:03d}"
        shards.append(str(path))
    _index(shards, cents["a"], enc, None, store_embeddings="float16")
    index = PruneIndex.load(shards)
    cfg = PruneConfig(prune_ratio=0.0, entropy_filter="none", max_nodata=None, dedup_threshold=0.95)
    kept = {index.keys[i] for i in index.select(cfg)}
    groups = {index.keys[i] for i in np.flatnonzero(index.duplicate_of(0.95) >= 0)}
    families: dict[str, set[str]] = {}
    for copy, orig in planted.items():
        families.setdefault(orig, {orig}).add(copy)
    for family in families.values():  # each planted family: one survivor, the rest duplicates
        assert len(family - groups) == 1 and len(family & kept) == 1, family
    assert len(kept) == len(index) - len(groups)
    cache = cache_path_of_index(index_path_for(shards[0]))
    stamp = cache.stat().st_mtime_ns
    again = PruneIndex.load(shards)
    np.testing.assert_array_equal(again.duplicate_of(0.95), index.duplicate_of(0.95))
    assert cache.stat().st_mtime_ns == stamp  # read from the cache
    again.duplicate_of(0.99)
    assert cache.stat().st_mtime_ns != stamp  # another tau: computed and cached again
    # the CLI counts what it removed
    import json

    assert (
        cli_main(
            [
                "select",
                *shards,
                "--prune-ratio",
                "0",
                "--no-entropy-filter",
                "--max-nodata",
                "-1",
                "--dedup-threshold",
                "0.95",
                "--json",
                "-q",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["duplicates_dropped"] == len(groups) and printed["selected"] == len(kept)
    text_args = ["select", *shards, "--prune-ratio", "0", "--no-entropy-filter"]
    text_args += ["--max-nodata", "-1", "--dedup-threshold", "0.95", "-q"]
    assert cli_main(text_args) == 0  # the text summary counts them too
    text = capsys.readouterr()
    assert f"near-duplicates (tau 0.95) dropped {len(groups):,}" in text.out + text.err
    # a PCA basis from the stored embeddings, then a pca sidecar that reassigns nearly the same
    basis_path = tmp_path / "basis.safetensors"
    assert cli_main(["pca-basis", *shards, "-o", str(basis_path), "--dims", "16", "-q"]) == 0
    pca_dir = tmp_path / "pca"
    _index(
        shards,
        cents["a"],
        enc,
        pca_dir,
        store_embeddings="pca",
        pca_basis=PcaBasis.load(basis_path),
    )
    assert read_sidecar(sidecar_path_for(shards[0], pca_dir)).tensors["codes"].shape[1] == 16
    assert reassign_shards(shards, cents["b"], index_dir=pca_dir, progress=False).ok
    # the report: ratio sweep from the stored embeddings and the near-duplicate sheet
    from rsprune_data.report import write_report

    html = write_report(
        shards, tmp_path / "report", cfg.replace(prune_ratio=0.6), progress=False
    ).read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    sweep = summary["ratio_sweep"]
    assert sweep["ratios"] == [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95] and sweep["chosen"] == 0.6
    assert sweep["selected"][0] > sweep["selected"][-1] > 0
    assert all(np.isfinite(sweep[m]).all() for m in ("coverage", "balance", "frechet", "radius"))
    assert sweep["radius"][-1] >= sweep["radius"][0]
    assert "Choosing the ratio" in html and "Near-duplicate groups at cosine &gt;= 0.95" in html
    assert "dropped: near-duplicates" in html  # a row of the counts per stage
    for png in ("ratio-sweep", "near-duplicates"):
        assert (tmp_path / "report" / "img" / f"{png}.png").stat().st_size > 1000
