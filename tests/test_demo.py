"""The main job end to end (shortened: smaller encoder input, two epochs)."""

from __future__ import annotations

import json

from rsprune_data.cli import main as cli_main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--quick", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "4/6 select at 85% pruning: kept 45 of 300" in printed
    assert (out / "report" / "index.html").exists()
    assert len(list((out / "shards").glob("harvey-*.tar"))) == 3
    assert len(list((out / "index").glob("*.rsidx.safetensors"))) == 3
    summary = json.loads((out / "selection.json").read_text())
    assert summary["selected"] == 45 and summary["nodata_dropped"] > 0
    log = json.loads((out / "train_log.json").read_text())
    for name in ("streaming", "sampler"):
        epochs = log[name]
        # the ratio changes between epochs and each epoch sees exactly its budget of samples
        assert [e["prune_ratio"] for e in epochs] == [0.85, 0.7]
        assert [e["samples"] for e in epochs] == [45, 90]
        assert all(e["steps"] > 0 and e["mean_loss"] == e["mean_loss"] for e in epochs)
