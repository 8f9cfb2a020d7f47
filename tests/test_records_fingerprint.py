"""The dataset fingerprint: computed once per run (rank 0 only), cached in the run directory keyed on the listing,
recomputed when the listing changes; its value is the one other code compares (format unchanged)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from ctbench import records
from ctbench.records import FINGERPRINT_CACHE, TOY_MARKER, RunRecord, fingerprint


def _reference(path) -> str:
    """The fingerprint as computed before the cache existed: sha256 over every file's (relative path, size)."""
    h = hashlib.sha256()
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        entries += [f"{rel}/{f}\0{os.stat(os.path.join(root, f)).st_size}" for f in files
                    if f != TOY_MARKER and not f.startswith(".tmp-")]
    for e in sorted(entries):
        h.update(e.encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()[:16]}:{len(entries)}files"


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "imagenet" / "train"
    for c, n in (("n01", 3), ("n02", 2)):
        (d / c).mkdir(parents=True)
        for i in range(n):
            (d / c / f"{c}_{i}.JPEG").write_bytes(b"x" * (i + 1))
    (d / "top.txt").write_text("t")
    return d


@pytest.fixture
def stats(monkeypatch):
    """Counts the calls that stat every file (the expensive part)."""
    calls = []
    real = records._sized_fingerprint

    def counted(path, names):
        calls.append(str(path))
        return real(path, names)

    monkeypatch.setattr(records, "_sized_fingerprint", counted)
    return calls


def test_value_and_format_unchanged(data, tmp_path):
    ref = _reference(data)
    assert fingerprint(data) == ref == fingerprint(data, tmp_path / "run")
    assert ref.endswith(":6files")
    assert fingerprint(data, tmp_path / "run") == ref  # from the cache: the same string
    f = data / "top.txt"
    assert fingerprint(f) == "sha256:" + hashlib.sha256(b"top.txt\x001\n").hexdigest()[:16]
    assert fingerprint(tmp_path / "missing") is None


def test_computed_once_per_run_on_the_writing_rank_only(data, tmp_path, stats):
    out = tmp_path / "run"
    # a 2-process run: rank 0 writes the record, rank 1 keeps it in memory and must not stat the dataset
    with RunRecord("pretrain", "x", out, dataset=data, write=True) as rec0:
        rec0.metrics["loss"] = 1.0
    rank1 = RunRecord("pretrain", "x", out, dataset=data, write=False)
    assert rank1.data["dataset"] is None
    assert len(stats) == 1
    saved = json.loads((out / "record.json").read_text())
    assert saved["dataset"]["fingerprint"] == _reference(data)
    cache = json.loads((out / FINGERPRINT_CACHE).read_text())
    assert cache["entries"][str(data.resolve())]["fingerprint"] == _reference(data)

    # the run resumed (a new process, same run directory): the listing is unchanged, nothing is statted again
    with RunRecord("pretrain", "x", out, dataset=data) as again:
        pass
    assert len(stats) == 1 and again.data["dataset"]["fingerprint"] == _reference(data)
    # a second stage writing into the same run directory reads the cache too
    assert fingerprint(data, out) == _reference(data) and len(stats) == 1


def test_cache_recomputed_when_the_listing_changes(data, tmp_path, stats):
    out = tmp_path / "run"
    before = fingerprint(data, out)
    (data / "n02" / "n02_9.JPEG").write_bytes(b"new")  # a file added
    after = fingerprint(data, out)
    assert len(stats) == 2 and after != before and after == _reference(data) and after.endswith(":7files")
    (data / "n01" / "n01_0.JPEG").unlink()  # a file removed
    assert fingerprint(data, out) == _reference(data) and len(stats) == 3
    assert fingerprint(data, out) == _reference(data) and len(stats) == 3  # unchanged again: cached


def test_unreadable_cache_is_recomputed_and_other_datasets_kept(data, tmp_path, stats):
    out = tmp_path / "run"
    out.mkdir()
    (out / FINGERPRINT_CACHE).write_text("{not json")
    assert fingerprint(data, out) == _reference(data) and len(stats) == 1
    other = tmp_path / "val"
    (other / "n01").mkdir(parents=True)
    (other / "n01" / "v.JPEG").write_bytes(b"v")
    assert fingerprint(other, out) == _reference(other) and len(stats) == 2
    # both datasets are in the one cache file: neither is statted again
    assert fingerprint(data, out) == _reference(data) and fingerprint(other, out) == _reference(other)
    assert len(stats) == 2


def test_save_of_a_memory_only_record_fills_the_dataset(data, tmp_path):
    rec = RunRecord("linear", "x", tmp_path / "run", dataset=data, write=False)
    rec.__enter__()
    path = rec.save()
    assert json.loads(path.read_text())["dataset"]["fingerprint"] == _reference(data)
