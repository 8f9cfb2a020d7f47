"""The toy datasets: layouts, determinism, idempotence, and loading through the real readers."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from ctbench.errors import UserError
from ctbench.toydata import MARKER, content_fingerprint, counts_for, generate, read_marker, spec_for
from ctbench.toydata.imagenet import CLASSES
from pretrain.imagefolder import ImageFolder


def test_imagenet_layout(toy_datasets):
    root = toy_datasets / "imagenet"
    counts = counts_for("imagenet", tiny=True)
    wnids = [w for w, _, _ in CLASSES]
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(wnids)
    for split in ("train", "val"):
        ds = ImageFolder(root / split)
        assert ds.classes == sorted(wnids)
        assert len(ds) == counts["classes"] * counts[split]
        img, target = ds[0]
        assert img.mode == "RGB" and min(img.size) == 96 and max(img.size) <= 120
        assert 0 <= target < 10
    assert (root / "train" / wnids[0] / f"{wnids[0]}_1.JPEG").is_file()
    assert next((root / "val" / wnids[0]).iterdir()).name.startswith("ILSVRC2012_val_")
    mapping = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == "n01440764 tench, Tinca tinca" and len(mapping) == 10
    assert read_marker(root) == spec_for("imagenet", tiny=True)


def test_torchvision_imagefolder_reads_it(toy_datasets):
    from torchvision.datasets import ImageFolder as TVImageFolder

    ds = TVImageFolder(str(toy_datasets / "imagenet" / "val"))
    assert len(ds.classes) == 10 and len(ds) == 40
    assert isinstance(ds[0][0], Image.Image)


def test_deterministic_and_seed_dependent(tmp_path):
    small = dict(tiny=True, only="imagenet", scale=0.25)  # 2 train + 1 val per class
    generate(tmp_path / "a", seed=3, **small)
    generate(tmp_path / "b", seed=3, workers=2, **small)
    generate(tmp_path / "c", seed=4, **small)
    fa = content_fingerprint(tmp_path / "a", only="imagenet")
    assert fa == content_fingerprint(tmp_path / "b", only="imagenet")
    assert fa != content_fingerprint(tmp_path / "c", only="imagenet")


def test_idempotent_respec_and_force(tmp_path):
    small = dict(tiny=True, only="imagenet")
    assert generate(tmp_path, scale=0.25, **small)["imagenet"]["status"] == "generated"
    marker = tmp_path / "imagenet" / MARKER
    t0 = time.time()
    assert generate(tmp_path, scale=0.25, **small)["imagenet"]["status"] == "up to date"
    assert time.time() - t0 < 1.0
    # a different spec regenerates, and leaves no build directory behind
    assert generate(tmp_path, scale=0.125, **small)["imagenet"]["status"] == "generated"
    assert json.loads(marker.read_text())["counts"]["train"] == 1
    assert len(list((tmp_path / "imagenet" / "train" / CLASSES[0][0]).iterdir())) == 1
    assert generate(tmp_path, scale=0.125, force=True, **small)["imagenet"]["status"] == "generated"
    assert [p.name for p in tmp_path.iterdir()] == ["imagenet"]


def test_interrupted_build_is_redone(tmp_path):
    # a run killed mid-build leaves only its build directory (no final directory, no marker)
    stale = tmp_path / ".tmp-toy-imagenet-999999999"
    (stale / "imagenet" / "train").mkdir(parents=True)
    small = dict(tiny=True, only="imagenet", scale=0.25)
    assert generate(tmp_path, **small)["imagenet"]["status"] == "generated"
    assert not stale.exists()
    # a copy from an older generator version is regenerated
    marker = tmp_path / "imagenet" / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "version": 0}))
    assert generate(tmp_path, **small)["imagenet"]["status"] == "generated"
    assert read_marker(tmp_path / "imagenet") == spec_for("imagenet", tiny=True, scale=0.25)


def test_refuses_real_data_and_bad_args(tmp_path):
    real = tmp_path / "imagenet" / "train" / "n01440764"
    real.mkdir(parents=True)
    (real / "x.JPEG").write_bytes(b"")
    with pytest.raises(UserError, match="not toy data"):
        generate(tmp_path, tiny=True, only="imagenet", force=True)
    assert (real / "x.JPEG").exists()
    with pytest.raises(UserError, match="unknown dataset 'imagnet'"):
        generate(tmp_path, only="imagnet")
    with pytest.raises(UserError, match="scale"):
        generate(tmp_path, scale=0)
