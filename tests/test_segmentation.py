"""voc_seg (MoCo's PASCAL VOC semantic segmentation on detectron2's SemanticSegmentor): the config resolves to the
protocol's values; the model (res5 dilated, output stride 16, DilatedFCNHead) loads a converted .pkl with every
backbone tensor exactly; the training pipeline (label PNGs read as class indices, scale / crop / pad / flip); the toy
ground truth scores 100 mIoU with SemSegEvaluator; a 2-iteration toy run writes a record with sem_seg/mIoU, its
schedule and protocol; the dataset registration's one-line errors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

pytest.importorskip("detectron2")

from ctbench.records import FINGERPRINT_CACHE, RECORD_NAME, load_record  # noqa: E402
from transfer import convert as conv  # noqa: E402
from transfer import tasks  # noqa: E402
from transfer.detection import __main__ as launcher  # noqa: E402
from transfer.detection import config as C  # noqa: E402
from transfer.detection import data  # noqa: E402
from transfer.detection.sem_seg import SemSegDatasetMapper, read_label_png  # noqa: E402

pytestmark = pytest.mark.detectron2
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.NUM_ITER", "1"]


def _cfg(*opts: str, toy: bool = False, world: int = 1):
    cfg = C.load_config(C.config_file("voc_seg"), toy=toy, opts=["MODEL.DEVICE", "cpu", *opts])
    C.adapt(cfg, world, set())
    return cfg


def test_config_resolves_to_the_moco_protocol():
    """Every value MoCo's appendix gives, the detection protocol's shared ones, and what one process and the toy
    override change; detection configs do not get the segmentation keys."""
    cfg = C.load_config(C.config_file("voc_seg"), toy=False, opts=[])
    m, head, inp, s = cfg.MODEL, cfg.MODEL.SEM_SEG_HEAD, cfg.INPUT, cfg.SOLVER
    assert m.META_ARCHITECTURE == "SemanticSegmentor" and m.BACKBONE.NAME == "build_resnet_backbone"
    assert m.RESNETS.DEPTH == 50 and m.RESNETS.RES5_DILATION == 2 and list(m.RESNETS.OUT_FEATURES) == ["res5"]
    assert m.RESNETS.NORM == "naiveSyncBN" and m.RESNETS.STRIDE_IN_1X1 is False and m.BACKBONE.FREEZE_AT == 0
    assert inp.FORMAT == "RGB" and list(m.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(m.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert (head.NAME, list(head.IN_FEATURES), head.COMMON_STRIDE) == ("DilatedFCNHead", ["res5"], 16)
    assert (head.NUM_CONVS, head.CONVS_DIM, head.DILATION, head.NORM) == (2, 256, 6, "naiveSyncBN")
    assert (head.NUM_CLASSES, head.IGNORE_VALUE, head.LOSS_WEIGHT) == (21, 255, 1.0)
    assert tuple(inp.RANDOM_SCALE) == (0.5, 2.0) and inp.CROP.ENABLED and inp.CROP.TYPE == "absolute"
    assert tuple(inp.CROP.SIZE) == (513, 513) and inp.RANDOM_FLIP == "horizontal" and inp.MIN_SIZE_TEST == 0
    assert cfg.DATASETS.TRAIN == ("voc_2012_seg_train_aug",) and cfg.DATASETS.TEST == ("voc_2012_seg_val",)
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.WEIGHT_DECAY, s.MAX_ITER) == (16, 0.003, 0.0001, 30000)
    assert tuple(s.STEPS) == (0.7 * 30000, 0.9 * 30000) and s.GAMMA == 0.1 and s.REFERENCE_WORLD_SIZE == 0
    assert cfg.TEST.PRECISE_BN.ENABLED and s.AMP.ENABLED is False
    assert tasks.TASK_INFO["voc_seg"].schedule == "30k" and "voc_seg" in tasks.SEM_SEG_TASKS
    assert "voc_seg" not in tasks.DETECTION_TASKS and set(tasks.TASKS) == {*tasks.DETECTION_TASKS, *tasks.SEM_SEG_TASKS}

    one = _cfg()  # one process: BN over the 16 images in the backbone and the head, batch / lr / schedule kept
    assert one.MODEL.RESNETS.NORM == one.MODEL.SEM_SEG_HEAD.NORM == "BN"
    assert (one.SOLVER.IMS_PER_BATCH, one.SOLVER.BASE_LR, one.SOLVER.MAX_ITER) == (16, 0.003, 30000)
    assert C.adapt(C.load_config(C.config_file("voc_seg"), toy=False, opts=["MODEL.DEVICE", "cpu"]), 1,
                   set()).deviations == ["1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)",
                                         "naiveSyncBN -> BN (MODEL.SEM_SEG_HEAD.NORM, MODEL.RESNETS.NORM)"]
    toy = C.load_config(C.config_file("voc_seg"), toy=True, opts=[])  # toy_seg.yaml, not the detection toy.yaml
    assert tuple(toy.INPUT.CROP.SIZE) == (64, 64) and tuple(toy.INPUT.RANDOM_SCALE) == (0.5, 2.0)
    assert (toy.SOLVER.IMS_PER_BATCH, toy.SOLVER.MAX_ITER, toy.SOLVER.BASE_LR) == (2, 8, 0.003)
    assert toy.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000  # toy.yaml's detection keys are not merged
    det = C.load_config(C.config_file("voc_det"), toy=False, opts=[])
    assert "RANDOM_SCALE" not in det.INPUT and "DILATION" not in det.MODEL.SEM_SEG_HEAD


def test_model_is_dilated_fcn_at_stride_16_and_its_loss():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_cfg())
    res5 = model.backbone.res5
    assert model.backbone.output_shape()["res5"].stride == 16
    assert all(b.conv2.dilation == (2, 2) and b.conv2.stride == (1, 1) for b in res5)
    assert res5[0].shortcut.stride == (1, 1)
    head = model.sem_seg_head
    assert type(head).__name__ == "DilatedFCNHead" and len(head.convs) == 2
    for layer in head.convs:
        assert (layer.kernel_size, layer.dilation, layer.padding, layer.out_channels) == ((3, 3), (6, 6), (6, 6), 256)
        assert isinstance(layer.norm, torch.nn.BatchNorm2d) and layer.bias is None
    assert head.predictor.kernel_size == (1, 1) and head.predictor.out_channels == 21

    # inference: logits at the input's size (cut and resized by SemanticSegmentor)
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 100, 130) * 255, "height": 50, "width": 65}])
    assert out[0]["sem_seg"].shape == (21, 50, 65)

    # training: cross-entropy on the logits upsampled x16 and cut to the target, void (255) ignored
    feats = {"res5": torch.randn(2, 2048, 3, 4, requires_grad=True)}  # a 37 x 50 crop: 3 x 4 features
    target = torch.randint(0, 21, (2, 37, 50))
    target[:, :10] = 255
    head.train()
    _, losses = head(feats, target)
    x = torch.nn.functional.interpolate(head.predictor(head.convs(feats["res5"])), scale_factor=16,
                                        mode="bilinear", align_corners=False)[..., :37, :50]
    keep = target != 255
    ref = torch.nn.functional.cross_entropy(x.permute(0, 2, 3, 1)[keep], target[keep])
    assert torch.allclose(losses["loss_sem_seg"], ref)
    losses["loss_sem_seg"].backward()
    assert feats["res5"].grad is not None and feats["res5"].grad.abs().sum() > 0


def _random_resnet50(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state_dict in which every tensor holds distinct seeded values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in torchvision.models.resnet50().state_dict().items():
        if v.is_floating_point():
            v = v + torch.randn(v.shape, generator=g) * 0.05
            out[k] = v.abs() + 0.5 if k.endswith("running_var") else v
        else:  # num_batches_tracked
            out[k] = torch.tensor(int(torch.randint(1, 10_000, (), generator=g)), dtype=v.dtype)
    return out


def test_converted_pkl_loads_every_backbone_tensor_exactly(tmp_path):
    """python -m transfer.convert's .pkl, loaded as the launcher loads MODEL.WEIGHTS (DetectionCheckpointer): each of
    the 318 ResNet-50 tensors lands in backbone.<name> bit for bit, res5 included (it is in the backbone here, in
    the ROI head of R50-C4); the head keeps its own init."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    sd = _random_resnet50(7)
    src = tmp_path / "resnet50.pth"
    torch.save(sd, src)
    pkl = tmp_path / "model_d2.pkl"
    assert conv.main([str(src), str(pkl)]) == 0
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    DetectionCheckpointer(model).load(str(pkl))
    state = model.state_dict()
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert len(backbone) == 318
    for k, v in backbone.items():
        key = "backbone." + conv.detectron2_name(k)
        assert state[key].dtype == v.dtype and torch.equal(state[key], v), key
    assert {k for k in state if k.startswith("backbone.")} == {"backbone." + conv.detectron2_name(k) for k in backbone}
    assert torch.equal(state["sem_seg_head.predictor.bias"], torch.zeros(21))


def test_labels_are_class_indices_and_the_training_crop(toy_detectron2):
    """The mapper reads VOC's palette PNGs as class indices (detectron2's DatasetMapper reads them as grey levels:
    the reason for our mapper); the protocol's training view is a 513 x 513 crop of the scaled image, padded with the
    mean pixel and label 255, flipped or not."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    data.register(["voc_2012_seg_train_aug"], toy_detectron2)
    dicts = DatasetCatalog.get("voc_2012_seg_train_aug")
    d = dicts[0]
    with Image.open(d["sem_seg_file_name"]) as im:
        assert im.mode == "P"
        raw = np.array(im)
    assert len(set(np.unique(raw)) - {0, 255}) >= 1 and (raw == 255).any()
    assert not np.array_equal(utils.read_image(d["sem_seg_file_name"], "L")[..., 0], raw)  # grey levels, not ids

    plain = SemSegDatasetMapper(_cfg("INPUT.RANDOM_SCALE", "(1.0, 1.0)", "INPUT.CROP.ENABLED", "False",
                                     "INPUT.RANDOM_FLIP", "none"), True)(d)
    assert torch.equal(plain["sem_seg"], torch.from_numpy(raw.astype(np.int64)))
    assert plain["image"].shape == (3, *raw.shape) and plain["image"].dtype == torch.uint8
    assert "sem_seg_file_name" not in plain

    mapper = SemSegDatasetMapper(_cfg(), True)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1)
    np.random.seed(0)  # detectron2's augmentations draw from NumPy's global generator
    flipped = set()
    for i in range(6):
        out = mapper(dicts[i % len(dicts)])
        image, label = out["image"], out["sem_seg"]
        assert image.shape == (3, 513, 513) and image.dtype == torch.float32 and label.shape == (513, 513)
        assert set(label.unique().tolist()) <= set(np.unique(read_label_png(dicts[i % len(dicts)]
                                                                            ["sem_seg_file_name"])).tolist())
        # toy images scale to <= 320 px: padded at the bottom, and at the right (or, flipped, the left)
        col = -1 if label[:, -1].eq(255).all() else 0
        assert label[-1].eq(255).all() and label[:, col].eq(255).all()
        assert torch.equal(image[:, -1], mean.expand(3, 513)) and torch.equal(image[:, :, col], mean.expand(3, 513))
        flipped.add(col)
    assert flipped == {0, -1}  # 6 views: both flips (seeded)
    test = SemSegDatasetMapper(_cfg(), False)(d)  # original size, no label read (the evaluator reads it)
    assert test["image"].shape == (3, *raw.shape) and "sem_seg" not in test


def test_toy_ground_truth_scores_100_miou(toy_detectron2, tmp_path):
    """SemSegEvaluator on the toy val (and train_aug) masks fed back as predictions: 100 mIoU / fwIoU / mACC / pACC,
    100 IoU for every class present and None for the others; a one-pixel shift scores below 100."""
    from detectron2.data import DatasetCatalog

    from transfer.detection.evaluation import build_evaluator
    from transfer.detection.train import flatten

    names = ["voc_2012_seg_val", "voc_2012_seg_train_aug"]
    data.register(names, toy_detectron2)
    cfg = _cfg()
    for name in names:
        results = {}
        for shift in (0, 1):
            ev = build_evaluator(cfg, name, tmp_path / f"{name}-{shift}")
            ev.reset()
            present = set()
            for d in DatasetCatalog.get(name):
                gt = read_label_png(d["sem_seg_file_name"]).astype(np.int64)
                present |= set(np.unique(gt).tolist()) - {255}
                pred = np.roll(np.where(gt == 255, 0, gt), shift, axis=1)  # void pixels: any class, not scored
                logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 21).permute(2, 0, 1).float()
                ev.process([{"file_name": d["file_name"]}], [{"sem_seg": logits}])
            results[shift] = flatten(ev.evaluate())
        exact = results[0]
        assert len(present) > 2, present
        for key in ("mIoU", "fwIoU", "mACC", "pACC"):
            assert exact[f"sem_seg/{key}"] == pytest.approx(100.0), (name, key)
        for i, cls in enumerate(("background", *VOC_CLASSES)):
            assert exact[f"sem_seg/IoU-{cls}"] == (pytest.approx(100.0) if i in present else None), (name, cls)
        assert results[1]["sem_seg/mIoU"] < 100.0


@pytest.mark.slow
def test_voc_seg_run_writes_a_record_with_miou(toy_detectron2, tmp_path):
    """Two trials of 2 iterations on the tiny toy data from converted weights: per-trial records and the summary with
    sem_seg/mIoU, schedule 30k, the protocol; the dataset fingerprint is computed once, in the run directory (it was
    once per trial); --eval-only on a trial's model_final.pth reproduces that trial's scores."""
    src = tmp_path / "resnet50.pth"
    torch.save(_random_resnet50(3), src)
    out = tmp_path / "run"
    assert launcher.main(["--task", "voc_seg", "--weights", str(src), "--data-root", str(toy_detectron2), "--out",
                          str(out), "--eval-images", "2", "--trials", "2", "--save-model", *FAST]) == 0
    summary = load_record(out / RECORD_NAME)
    trials = [load_record(out / f"trial{t}" / RECORD_NAME) for t in range(2)]
    for rec in (*trials, summary):
        assert rec["kind"] == "transfer" and rec["task"] == "voc_seg" and rec["name"] == "resnet50"  # not a release
        assert rec["schedule"] == "30k" and rec["toy"] is True
        assert rec["protocol"] == {"recipe": tasks.TASK_INFO["voc_seg"].recipe, "deviations": [
            "toy scale", "8 -> 2 iters", "steps 6 -> 1", "warm-up 2 -> 1", "TEST.PRECISE_BN.NUM_ITER 2 -> 1",
            "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)",
            "naiveSyncBN -> BN (MODEL.SEM_SEG_HEAD.NORM, MODEL.RESNETS.NORM)", "eval on the first 2 test images"]}
        m = rec["metrics"]
        for key in ("mIoU", "fwIoU", "mACC", "pACC", "IoU-background"):
            assert isinstance(m[f"sem_seg/{key}"], float) and 0 <= m[f"sem_seg/{key}"] <= 100, (key, m)
        assert rec["dataset"]["path"] == str(toy_detectron2 / "VOC2012")
    assert [t["metrics"]["iters"] for t in trials] == [2, 2] and trials[0]["metrics"]["eval_images"] == 2
    assert summary["per_trial"]["sem_seg/mIoU"] == [t["metrics"]["sem_seg/mIoU"] for t in trials]
    assert trials[0]["dataset"]["fingerprint"] == summary["dataset"]["fingerprint"]
    assert (out / FINGERPRINT_CACHE).is_file()
    assert not any((out / f"trial{t}" / FINGERPRINT_CACHE).exists() for t in range(2))  # one per run, not per trial
    cfg = trials[0]["config"]
    assert cfg["MODEL"]["META_ARCHITECTURE"] == "SemanticSegmentor" and cfg["MODEL"]["SEM_SEG_HEAD"]["NORM"] == "BN"
    assert trials[0]["weights"]["kind"] == "converted" and trials[0]["inputs"][0]["kind"] == "convert"

    ev = tmp_path / "eval"
    assert launcher.main(["--task", "voc_seg", "--eval-only", "--weights", str(out / "trial1" / "model_final.pth"),
                          "--data-root", str(toy_detectron2), "--out", str(ev), "--eval-images", "2"]) == 0
    rec = load_record(ev / RECORD_NAME)
    assert rec["eval_only"] is True and rec["weights"]["kind"] == "detectron2"
    assert {k: v for k, v in rec["metrics"].items() if k.startswith("sem_seg/")} == {
        k: v for k, v in trials[1]["metrics"].items() if k.startswith("sem_seg/")}


def _copy_voc2012(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(root / "VOC2012", dst / "VOC2012")
    return dst


@pytest.mark.parametrize("remove, message", [
    ("SegmentationClassAug", "SegmentationClassAug not found under the data root"),
    ("ImageSets/Segmentation/train_aug.txt", "train_aug.txt not found under the data root"),
    ("one mask", "1 listed file(s) not found, e.g."),
])
def test_missing_files_are_one_line_errors(toy_detectron2, tmp_path, capsys, remove, message):
    root = _copy_voc2012(toy_detectron2, tmp_path)
    voc = root / "VOC2012"
    if remove == "one mask":
        first = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()[0]
        (voc / "SegmentationClassAug" / f"{first}.png").unlink()
    elif (voc / remove).is_dir():
        shutil.rmtree(voc / remove)
    else:
        (voc / remove).unlink()
    assert launcher.main(["--task", "voc_seg", "--weights", "random", "--data-root", str(root), "--out",
                          str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and message in err, err
