"""Semi-supervised: SimCLR-format lists, the balanced subset generator, the epoch order, one tiny fine-tuning.

``tests/fixtures/semisup/subset_simclr_format.txt`` is a list in the format of SimCLR's ``1percent.txt`` /
``10percent.txt`` (one train file name per line, ``<wnid>_<n>.JPEG``) naming images of the tiny toy ImageNet: two
per class, three for the last class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from ctbench.errors import UserError
from ctbench.imagefolder import ImageFolder
from ctbench.records import load_record
from transfer import semisup
from transfer.classify.backbone import BackboneSource
from transfer.classify.config import SemisupConfig, resolve
from transfer.classify.data import EpochSampler, balanced_subset, read_subset, subset_sha256, write_subset

FIXTURE = Path(__file__).parent / "fixtures" / "semisup" / "subset_simclr_format.txt"


def test_simclr_list_is_parsed_with_labels_from_the_wnid(toy_datasets):
    train = toy_datasets / "imagenet" / "train"
    files = read_subset(FIXTURE, train)
    assert len(files) == 21 and files[0] == "n01440764_1.JPEG"
    folder = ImageFolder(train, files=files)
    counts = Counter(folder.targets)
    assert [counts[i] for i in range(10)] == [2] * 9 + [3]
    assert folder.samples[2] == ("n02102040/n02102040_2.JPEG", 1)
    img, label = folder[20]
    assert label == 9 and img.size[0] > 0


def test_bad_lists_are_one_line_errors(toy_datasets, tmp_path):
    train = toy_datasets / "imagenet" / "train"
    cases = {"missing.txt": ("n01440764_1.JPEG\nn01440764_999.JPEG\n", "1 of 2 listed images are not under"),
             "dups.txt": ("n01440764_1.JPEG\nn01440764_1.JPEG\n", "listed more than once"),
             "labels.txt": ("n01440764_1.JPEG 0\n", "not an image file name"),
             "empty.txt": ("\n\n", "no file names")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_subset(tmp_path / name, train)
    with pytest.raises(UserError, match="subset list not found"):
        read_subset(tmp_path / "nope.txt", train)


def test_balanced_subset_is_exact_and_deterministic(toy_datasets, tmp_path):
    train = toy_datasets / "imagenet" / "train"  # 10 classes x 8 images
    a = balanced_subset(train, 25, seed=0)
    assert a == balanced_subset(train, 25, seed=0)
    assert a != balanced_subset(train, 25, seed=1)
    per_class = Counter(n.split("_")[0] for n in a)
    assert len(per_class) == 10 and set(per_class.values()) == {2}  # round(0.25 * 80 / 10) = 2 each
    assert all((train / n.split("_")[0] / n).is_file() for n in a)
    assert set(Counter(n.split("_")[0] for n in balanced_subset(train, 1, seed=0)).values()) == {1}  # at least 1
    with pytest.raises(UserError, match="has only 8"):
        balanced_subset(train, 200, seed=0)
    write_subset(tmp_path / "s.txt", a)  # written in SimCLR's format: it reads back identically
    assert read_subset(tmp_path / "s.txt", train) == a
    assert subset_sha256(tmp_path / "s.txt").startswith("sha256:")


def test_epoch_order_does_not_depend_on_the_number_of_processes():
    n, batch = 23, 8
    single = EpochSampler(n, batch, seed=5)
    single.set_epoch(3)
    ref = list(single)
    assert [len(b) for b in ref] == [8, 8, 7] and single.global_size(2) == 7
    parts = []
    for rank in range(3):
        s = EpochSampler(n, batch, world_size=3, rank=rank, seed=5)
        s.set_epoch(3)
        parts.append(list(s))
    for step, batch_items in enumerate(ref):
        merged = sorted(item for p in parts for item in p[step])
        assert merged == sorted(batch_items)
    resumed = EpochSampler(n, batch, seed=5)
    resumed.set_epoch(3, start_step=1)
    assert list(resumed) == ref[1:]
    other = EpochSampler(n, batch, seed=5)
    other.set_epoch(4)
    assert list(other) != ref
    assert EpochSampler(17, 8, world_size=2).steps_per_epoch == 2  # a last batch of 1 cannot feed 2 processes


def test_tiny_finetune_with_a_simclr_list(toy_datasets, tmp_path):
    # 21 of the 80 tiny train images (26 %): a 10 % list (a 1 % list must hold 0.32-3.2 %, test_semisup_subsets.py)
    cfg = resolve(SemisupConfig, "semisup_10pct", "toy", None,
                  ["data.image_size=32", "data.workers=0", "train.epochs=2", "optim.milestones=[1]",
                   "train.batch_size=8", "train.eval_batch_size=40", "train.device=cpu", "optim.head_lr_mult=10"],
                  fixed={"pct": 10, "data": {"path": str(toy_datasets / "imagenet")},
                         "subset": {"file": str(FIXTURE)}})
    out = tmp_path / "run"
    metrics = semisup.run(cfg, BackboneSource(None, "random"), out)
    assert metrics["complete"] and metrics["labelled_images"] == 21 and metrics["val_images"] == 40
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["steps"] == 2 * 3
    rec = load_record(out)
    assert rec["kind"] == "semisup" and rec["name"] == "random" and rec["metrics"]["pct"] == 10
    assert rec["subset"]["source"] == "given" and rec["subset"]["sha256"] == subset_sha256(FIXTURE)
    assert (out / "subset.txt").read_text() == FIXTURE.read_text()
    ckpt = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 10)  # the classifier's lr multiplier
    assert groups[0]["lr"] == pytest.approx(0.01 * 8 / 256 * 0.2)  # scaled to the batch, after the milestone
    assert semisup.run(cfg, BackboneSource(None, "random"), out)["top1"] == metrics["top1"]  # finished: reused


def test_missing_data_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "out"))
    assert semisup.main(["--ckpt", "random", "--pct", "1", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere/train not found" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
