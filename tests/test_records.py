"""Run records: provenance fields, parent records embedded, toy data recognised, nothing written on failure."""

from __future__ import annotations

import json

import pytest

from ctbench.records import TOY_MARKER, RunRecord, find_input, iter_records, load_record, write_record


def test_record_has_provenance_and_traces_inputs(tmp_path):
    data = tmp_path / "imagenet"
    (data / "train" / "n01").mkdir(parents=True)
    (data / "train" / "n01" / "a.JPEG").write_bytes(b"x" * 10)
    (data / TOY_MARKER).write_text(json.dumps({"seed": 0}))

    pre_dir = tmp_path / "pretrain" / "moco_v2"
    with RunRecord("pretrain", "moco_v2", pre_dir, config={"loss": {"tau": 0.2}}, dataset=data / "train",
                   seed=3) as rec:
        rec.metrics["loss_final"] = 1.5
        rec.outputs["checkpoint"] = "checkpoint.pth.tar"
    (pre_dir / "checkpoint.pth.tar").write_bytes(b"ckpt")

    lin_dir = tmp_path / "linear" / "moco_v2"
    write_record("linear", "moco_v2", lin_dir, {"top1": 50.0}, inputs=[pre_dir / "checkpoint.pth.tar"])

    pre = load_record(pre_dir)
    for key in ("kind", "name", "metrics", "config", "dataset", "seed", "git", "versions", "hardware",
                "started", "ended", "wall_s", "inputs", "id"):
        assert key in pre, key
    assert pre["dataset"]["toy"] is True and pre["dataset"]["toy_spec"] == {"seed": 0}
    assert pre["dataset"]["fingerprint"].startswith("sha256:")
    assert pre["versions"]["torch"]

    lin = load_record(lin_dir / "record.json")
    parent = find_input(lin, "pretrain")
    assert parent["id"] == pre["id"] and parent["config"]["loss"]["tau"] == 0.2
    assert [r["kind"] for r in iter_records(tmp_path)] == ["linear", "pretrain"]
    assert [r["name"] for r in iter_records(tmp_path, kind="pretrain")] == ["moco_v2"]


def test_failed_run_writes_no_record(tmp_path):
    with pytest.raises(ValueError), RunRecord("pretrain", "x", tmp_path):
        raise ValueError("boom")
    assert not (tmp_path / "record.json").exists()


def test_fingerprint_tracks_content_not_location(tmp_path):
    from ctbench.records import fingerprint

    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "c").mkdir(parents=True)
        (root / "c" / "f.JPEG").write_bytes(b"123")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    (tmp_path / "b" / "c" / "g.JPEG").write_bytes(b"1")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")
