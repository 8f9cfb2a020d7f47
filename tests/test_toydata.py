"""The toy datasets: layouts, determinism, idempotence, and loading through the real readers."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from ctbench.errors import UserError
from ctbench.imagefolder import ImageFolder
from ctbench.toydata import MARKER, content_fingerprint, counts_for, generate, read_marker, spec_for
from ctbench.toydata.imagenet import CLASSES


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
        assert img.mode == "RGB" and min(img.size) == 40 and max(img.size) <= 50
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


def test_imagenet_colours_do_not_depend_on_the_class():
    """The class sets the silhouette and the pattern only: an image seed gives the same background and object
    colours for every class (so colour carries no class information), and different class images differ."""
    import io

    import numpy as np

    from ctbench.toydata import imagenet

    for seed in range(4):
        imgs = [np.asarray(Image.open(io.BytesIO(imagenet.render(np.random.default_rng(seed), c))).convert("RGB"),
                           np.int16) for c in range(len(imagenet.CLASSES))]
        border = [np.concatenate([im[:2].reshape(-1, 3), im[-2:].reshape(-1, 3)]) for im in imgs]  # background
        same = [(np.abs(b - border[0]).max(1) <= 12).mean() for b in border]  # JPEG noise aside
        assert min(same) > 0.6, same
        assert all(np.abs(im - imgs[0]).mean() > 3 for im in imgs[1:])
        assert min(imgs[0].shape[:2]) == imagenet.SHORT_SIDE


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


def test_coco_files(toy_datasets):
    from ctbench.toydata.coco import COCO_CATEGORIES

    ann = toy_datasets / "coco" / "annotations"
    inst = json.loads((ann / "instances_val2017.json").read_text())
    kps = json.loads((ann / "person_keypoints_val2017.json").read_text())
    assert [c["id"] for c in inst["categories"]] == [c[0] for c in COCO_CATEGORIES] and len(COCO_CATEGORIES) == 80
    assert [c["name"] for c in kps["categories"]] == ["person"] and len(kps["categories"][0]["keypoints"]) == 17
    assert len(inst["images"]) == counts_for("coco", tiny=True)["val"] == len(kps["images"])
    for im in inst["images"]:
        with Image.open(toy_datasets / "coco" / "val2017" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and w > 0 and h > 0 and 0 < a["area"] <= w * h + 1
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
    for a in kps["annotations"]:
        v = a["keypoints"][2::3]
        assert len(a["keypoints"]) == 51 and a["num_keypoints"] == sum(x > 0 for x in v) >= 10
    assert len({a["id"] for a in inst["annotations"]}) == len(inst["annotations"])


def test_voc_files(toy_datasets):
    from ctbench.toydata.objects import VOC_CLASSES

    main = toy_datasets / "VOC2007" / "ImageSets" / "Main"
    test_ids = main.joinpath("test.txt").read_text().split()
    trainval = main.joinpath("trainval.txt").read_text().split()
    assert sorted(main.joinpath("train.txt").read_text().split() + main.joinpath("val.txt").read_text().split()) \
        == sorted(trainval) and not set(test_ids) & set(trainval)
    import xml.etree.ElementTree as ET

    names = set()
    for i in test_ids:
        root = ET.parse(toy_datasets / "VOC2007" / "Annotations" / f"{i}.xml").getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        for obj in root.findall("object"):
            b = [int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= b[0] < b[2] <= w and 1 <= b[1] < b[3] <= h
            assert obj.find("truncated").text in "01" and obj.find("pose").text
            if obj.find("difficult").text == "0":
                names.add(obj.find("name").text)
    assert names == set(VOC_CLASSES)  # every class has an AP in the VOC07 test evaluation
    assert (toy_datasets / "VOC2012" / "JPEGImages" / "2012_000001.jpg").is_file()


def _voc_objects(xml_path):
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    return root, [(o.find("name").text, o.find("difficult").text == "1") for o in root.findall("object")]


def test_voc_per_class_lists_follow_the_annotations(toy_datasets):
    from ctbench.toydata.objects import VOC_CLASSES

    for year, splits in (("VOC2007", ("trainval", "train", "val", "test")), ("VOC2012", ("trainval", "train", "val"))):
        main = toy_datasets / year / "ImageSets" / "Main"
        for split in splits:
            ids = main.joinpath(f"{split}.txt").read_text().split()
            for cls in VOC_CLASSES:
                lines = main.joinpath(f"{cls}_{split}.txt").read_text().splitlines()
                assert [ln.split()[0] for ln in lines] == ids
                for ln in lines:
                    file_id, label = ln.split()
                    _, objs = _voc_objects(toy_datasets / year / "Annotations" / f"{file_id}.xml")
                    want = 1 if (cls, False) in objs else 0 if (cls, True) in objs else -1
                    assert int(label) == want, (year, split, cls, file_id)
                    assert ln == f"{file_id} {want:2d}"  # VOC's format: "000005 -1", "000007  1"


def test_voc2012_segmentation_masks_come_from_the_annotated_objects(toy_datasets):
    import numpy as np

    from ctbench.toydata.objects import VOC_CLASSES
    from ctbench.toydata.voc import PALETTE

    voc = toy_datasets / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    main = voc / "ImageSets" / "Main"
    train, val = seg.joinpath("train.txt").read_text().split(), seg.joinpath("val.txt").read_text().split()
    assert train == main.joinpath("train.txt").read_text().split()
    assert val == main.joinpath("val.txt").read_text().split()
    assert seg.joinpath("train_aug.txt").read_text().split() == train  # no toy SBD: train_aug = train
    assert sorted(seg.joinpath("trainval.txt").read_text().split()) == sorted(train + val)
    for file_id in train + val:
        img = Image.open(voc / "JPEGImages" / f"{file_id}.jpg")
        for sub in ("SegmentationClass", "SegmentationClassAug"):
            m = Image.open(voc / sub / f"{file_id}.png")
            assert m.mode == "P" and m.size == img.size and m.getpalette()[:60] == PALETTE[:60]
        values = set(np.unique(np.asarray(m)).tolist())
        root, objs = _voc_objects(voc / "Annotations" / f"{file_id}.xml")
        assert root.find("segmented").text == "1"
        present = {VOC_CLASSES.index(n) + 1 for n, _ in objs}
        assert 0 in values and 255 in values and values - {0, 255} <= present and values - {0, 255}
    assert PALETTE[3:6] == [128, 0, 0] and PALETTE[15 * 3:15 * 3 + 3] == [192, 128, 128]  # aeroplane, person


@pytest.mark.detectron2
def test_detectron2_builtin_names_load(toy_detectron2):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    tiny = {k: counts_for(k, tiny=True) for k in ("coco", "voc")}
    expect = {"coco_2017_train": tiny["coco"]["train"], "coco_2017_val": tiny["coco"]["val"],
              "keypoints_coco_2017_train": tiny["coco"]["train"], "keypoints_coco_2017_val": tiny["coco"]["val"],
              "voc_2007_trainval": tiny["voc"]["trainval2007"], "voc_2012_trainval": tiny["voc"]["trainval2012"],
              "voc_2007_test": tiny["voc"]["test2007"]}
    for name, n in expect.items():
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == n, name
        assert all(str(toy_detectron2) in d["file_name"] for d in dicts)
        assert sum(len(d["annotations"]) for d in dicts) >= n
    coco = DatasetCatalog.get("coco_2017_train")
    assert len(MetadataCatalog.get("coco_2017_train").thing_classes) == 80
    assert all(isinstance(a["segmentation"], list) for d in coco for a in d["annotations"])
    kp = DatasetCatalog.get("keypoints_coco_2017_train")
    assert all(len(a["keypoints"]) == 51 for d in kp for a in d["annotations"])
    assert MetadataCatalog.get("voc_2007_test").evaluator_type == "pascal_voc"


@pytest.mark.detectron2
def test_evaluators_score_ground_truth_perfectly(toy_detectron2):
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann = toy_detectron2 / "coco" / "annotations"
    for fname, iou_type in (("instances_val2017.json", "bbox"), ("instances_val2017.json", "segm"),
                            ("person_keypoints_val2017.json", "keypoints")):
        gt = COCO(str(ann / fname))
        dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), (fname, iou_type)

    evaluator = PascalVOCDetectionEvaluator("voc_2007_test")
    evaluator.reset()
    for d in DatasetCatalog.get("voc_2007_test"):
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        inst.scores = torch.ones(len(d["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP50"] == pytest.approx(100.0)


def test_cli(tmp_path, capsys):
    from ctbench.toydata.__main__ import main

    assert main(["--root", str(tmp_path), "--only", "coco", "--tiny", "--scale", "0.5"]) == 0
    assert main(["--root", str(tmp_path), "--only", "coco", "--tiny", "--scale", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("coco: 4 train, 2 val images -> ") and "generated in" in out[0]
    assert out[1].endswith("(up to date)")
    assert main(["--root", str(tmp_path), "--only", "coco,imagenet", "--tiny", "--if-missing", "--scale", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("imagenet: 10 classes x (16 train, 8 val) images") and "generated in" in out[0]
    assert out[1].startswith("coco: 4 train, 2 val images") and out[1].endswith("(present)")  # kept: any toy spec
    assert main(["--root", str(tmp_path), "--only", "cocoa"]) == 2
    assert "unknown dataset 'cocoa'" in capsys.readouterr().err
