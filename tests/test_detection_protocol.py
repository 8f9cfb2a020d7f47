"""The detection protocol: each task resolves to its original config key for key; one process (on a faked GPU) keeps
MoCo's batch of 16, lr and schedule, ``--linear-scaling`` opts into the scaled variant; a CUDA out-of-memory error is
one line naming the flag; the supervised MSRA baseline task (its weights, its download error); the record's
``protocol`` (recipe and deviations) and ``schedule``.

Mostly ``prepare()`` (the launcher up to the point where processes start) and config arithmetic: no model is trained
here except the first steps of the out-of-memory test (which never run a step) and the MSRA weight loading.
"""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402

from transfer import tasks  # noqa: E402
from transfer.detection import __main__ as launcher  # noqa: E402
from transfer.detection import config as C  # noqa: E402
from transfer.detection.weights import resolve  # noqa: E402

pytestmark = pytest.mark.detectron2

# The original configs, as published (detectron2 yacs YAML; each on top of detectron2's get_cfg() defaults).
# facebookresearch/moco@132aea9 detection/configs/:
MOCO_FILES = {
    "Base-RCNN-C4-BN.yaml": """
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  RPN:
    PRE_NMS_TOPK_TEST: 6000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "Res5ROIHeadsExtraNorm"
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    NORM: "naiveSyncBN"
TEST:
  PRECISE_BN:
    ENABLED: True
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
""",
    "pascal_voc_R_50_C4_24k.yaml": """
_BASE_: "Base-RCNN-C4-BN.yaml"
MODEL:
  MASK_ON: False
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  ROI_HEADS:
    NUM_CLASSES: 20
INPUT:
  MIN_SIZE_TRAIN: (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
  MIN_SIZE_TEST: 800
DATASETS:
  TRAIN: ('voc_2007_trainval', 'voc_2012_trainval')
  TEST: ('voc_2007_test',)
SOLVER:
  STEPS: (18000, 22000)
  MAX_ITER: 24000
  WARMUP_ITERS: 100
""",
    "pascal_voc_R_50_C4_24k_moco.yaml": """
_BASE_: "pascal_voc_R_50_C4_24k.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
""",
    "coco_R_50_C4_2x.yaml": """
_BASE_: "Base-RCNN-C4-BN.yaml"
MODEL:
  MASK_ON: True
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
  MIN_SIZE_TEST: 800
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  STEPS: (120000, 160000)
  MAX_ITER: 180000
""",
    "coco_R_50_C4_2x_moco.yaml": """
_BASE_: "coco_R_50_C4_2x.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
""",
}
# open-mmlab/OpenSelfSup@1db69ec benchmarks/detection/configs/ (MoCo-derived; MoCo itself has no FPN/keypoint config):
OSS_FILES = {
    "Base-RCNN-FPN.yaml": """
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TRAIN: 2000
    PRE_NMS_TOPK_TEST: 1000
    POST_NMS_TOPK_TRAIN: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    POOLER_RESOLUTION: 14
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
  STEPS: (60000, 80000)
  MAX_ITER: 90000
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
VERSION: 2
""",
    "coco_R_50_FPN_1x.yaml": """
_BASE_: "Base-RCNN-FPN.yaml"
MODEL:
  MASK_ON: True
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 50
    NORM: "SyncBN"
  FPN:
    NORM: "SyncBN"
TEST:
  PRECISE_BN:
    ENABLED: True
SOLVER:
  STEPS: (60000, 80000)
  MAX_ITER: 90000
""",
    "coco_R_50_FPN_1x_moco.yaml": """
_BASE_: "coco_R_50_FPN_1x.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
""",
    "Base-Keypoint-RCNN-FPN.yaml": """
_BASE_: "Base-RCNN-FPN.yaml"
MODEL:
  KEYPOINT_ON: True
  ROI_HEADS:
    NUM_CLASSES: 1
  ROI_BOX_HEAD:
    SMOOTH_L1_BETA: 0.5
  RPN:
    POST_NMS_TOPK_TRAIN: 1500
DATASETS:
  TRAIN: ("keypoints_coco_2017_train",)
  TEST: ("keypoints_coco_2017_val",)
""",
    "keypoint_rcnn_R_50_FPN_2x.yaml": """
_BASE_: "Base-Keypoint-RCNN-FPN.yaml"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 50
    NORM: "SyncBN"
  FPN:
    NORM: "SyncBN"
TEST:
  PRECISE_BN:
    ENABLED: True
SOLVER:
  STEPS: (120000, 160000)
  MAX_ITER: 180000
""",
    "keypoint_rcnn_R_50_FPN_2x_moco.yaml": """
_BASE_: "keypoint_rcnn_R_50_FPN_2x.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
""",
}
ONE_X = {"SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000}
OUR_WEIGHTS = {"MODEL.WEIGHTS": ""}  # the launcher's --weights, not the file, says what is fine-tuned
NAIVE_FPN = {"MODEL.RESNETS.NORM": "naiveSyncBN", "MODEL.FPN.NORM": "naiveSyncBN"}  # MoCo's current choice
# task -> (original file, its keys that the task changes on purpose: each one named in the task's YAML)
ORIGINAL = {
    "voc_det_supervised_msra": ("moco", "pascal_voc_R_50_C4_24k.yaml", {}),
    "voc_det": ("moco", "pascal_voc_R_50_C4_24k_moco.yaml", OUR_WEIGHTS),
    "coco_mask_c4_2x": ("moco", "coco_R_50_C4_2x_moco.yaml", OUR_WEIGHTS),
    "coco_det_c4_2x": ("moco", "coco_R_50_C4_2x_moco.yaml", {**OUR_WEIGHTS, "MODEL.MASK_ON": False}),
    "coco_mask_c4": ("moco", "coco_R_50_C4_2x_moco.yaml", {**OUR_WEIGHTS, **ONE_X}),
    "coco_det_c4": ("moco", "coco_R_50_C4_2x_moco.yaml", {**OUR_WEIGHTS, **ONE_X, "MODEL.MASK_ON": False}),
    "coco_mask": ("oss", "coco_R_50_FPN_1x_moco.yaml", {**OUR_WEIGHTS, **NAIVE_FPN}),
    "coco_det": ("oss", "coco_R_50_FPN_1x_moco.yaml", {**OUR_WEIGHTS, **NAIVE_FPN, "MODEL.MASK_ON": False}),
    "coco_kp_2x": ("oss", "keypoint_rcnn_R_50_FPN_2x_moco.yaml", {**OUR_WEIGHTS, **NAIVE_FPN}),
    "coco_kp": ("oss", "keypoint_rcnn_R_50_FPN_2x_moco.yaml", {**OUR_WEIGHTS, **NAIVE_FPN, **ONE_X}),
}


def _flat(node: CfgNode, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, CfgNode):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _norm(v)
    return out


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def _original(tmp_path: Path, which: str, leaf: str) -> dict:
    files = MOCO_FILES if which == "moco" else OSS_FILES
    d = tmp_path / which
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    cfg = get_cfg()
    cfg.merge_from_file(str(d / leaf))
    return _flat(cfg)


def test_every_task_has_its_original():
    assert set(ORIGINAL) == set(tasks.DETECTION_TASKS)  # voc_seg: MoCo released no config (tests/test_segmentation.py)


@pytest.mark.parametrize("task", list(ORIGINAL))
def test_task_resolves_to_the_original_config_key_for_key(tmp_path, task):
    """Every key of detectron2's config, ours against the original file (+ its _BASE_ chain) on get_cfg()."""
    which, leaf, changed = ORIGINAL[task]
    expected = {**_original(tmp_path, which, leaf), **{k: _norm(v) for k, v in changed.items()}}
    ours = _flat(C.load_config(C.config_file(task), toy=False, opts=[]))
    assert ours.keys() == expected.keys()
    diff = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert not diff, diff


def test_supervised_msra_is_mocos_bgr_caffe_config():
    cfg = C.load_config(C.config_file("voc_det_supervised_msra"), toy=False, opts=[])
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is True
    assert list(cfg.MODEL.PIXEL_MEAN) == [103.53, 116.28, 123.675] and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"


def test_keypoint_schedules():
    kp = C.load_config(C.config_file("coco_kp"), toy=False, opts=[])
    kp2 = C.load_config(C.config_file("coco_kp_2x"), toy=False, opts=[])
    assert (kp.SOLVER.MAX_ITER, tuple(kp.SOLVER.STEPS)) == (90000, (60000, 80000))
    assert (kp2.SOLVER.MAX_ITER, tuple(kp2.SOLVER.STEPS)) == (180000, (120000, 160000))
    assert kp2.MODEL.KEYPOINT_ON and kp2.DATASETS.TRAIN == ("keypoints_coco_2017_train",)
    assert {t: tasks.TASK_INFO[t].schedule for t in tasks.TASKS} == {
        "voc_det": "24k", "voc_det_supervised_msra": "24k", "coco_det": "1x", "coco_mask": "1x", "coco_det_c4": "1x",
        "coco_mask_c4": "1x", "coco_det_c4_2x": "2x", "coco_mask_c4_2x": "2x", "coco_kp": "1x", "coco_kp_2x": "2x",
        "voc_seg": "30k"}
    assert "2x" in tasks.TASK_INFO["coco_kp_2x"].recipe and "keypoint_rcnn_R_50_FPN_2x_moco.yaml" in tasks.TASK_INFO[
        "coco_kp_2x"].recipe


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA as the launcher sees it: available, with ``n`` devices (nothing runs on them here)."""

    def fake(n: int = 1) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def _prepare(root: Path, tmp_path: Path, *argv: str):
    spec, _ = launcher.prepare(["--data-root", str(root), "--out", str(tmp_path / "out"), *argv])
    return spec


def _solver(cfg) -> tuple:
    s = cfg.SOLVER
    return s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS


def test_one_gpu_keeps_mocos_batch_lr_and_schedule(toy_detectron2, tmp_path, fake_gpus):
    """Until this change one process meant batch 2, lr 0.0025, 192k iterations: BN over 2 images."""
    fake_gpus(1)
    spec = _prepare(toy_detectron2, tmp_path, "--task", "voc_det", "--full", "--weights", "random")
    cfg = spec.cfg
    assert cfg.MODEL.DEVICE == "cuda" and _solver(cfg) == (16, 0.02, 24000, (18000, 22000), 100)
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0  # detectron2's trainer rescales nothing either
    assert cfg.MODEL.RESNETS.NORM == "BN"  # BN over the 16 images = naiveSyncBN over 8 x 2
    assert spec.deviations == ["1 process (recipe: 8 GPUs)", "naiveSyncBN -> BN (MODEL.RESNETS.NORM)"]
    assert spec.recipe == tasks.TASK_INFO["voc_det"].recipe and spec.schedule == "24k"
    assert "--linear-scaling" in spec.oom_message and "16 images per GPU" in spec.oom_message

    fpn = _prepare(toy_detectron2, tmp_path, "--task", "coco_mask_c4_2x", "--full", "--weights", "random")
    assert _solver(fpn.cfg) == (16, 0.02, 180000, (120000, 160000), 1000) and fpn.schedule == "2x"


def test_linear_scaling_is_opt_in(toy_detectron2, tmp_path, fake_gpus):
    fake_gpus(1)
    spec = _prepare(toy_detectron2, tmp_path, "--task", "voc_det", "--full", "--weights", "random",
                    "--linear-scaling")
    assert _solver(spec.cfg) == (2, 0.0025, 192000, (144000, 176000), 800) and spec.cfg.MODEL.RESNETS.NORM == "BN"
    assert spec.deviations == ["1 process (recipe: 8 GPUs)", "naiveSyncBN -> BN (MODEL.RESNETS.NORM)",
                               "linear scaling from 8 GPUs: batch 16 -> 2, lr 0.02 -> 0.0025, 24k -> 192k iters"]
    assert "--linear-scaling" not in spec.oom_message  # already on: the message offers what is left

    fake_gpus(4)  # JCL's 4 GPUs: MoCo's batch 16 as 4 x 4 by default; 4 x 2 scaled with the flag
    four = _prepare(toy_detectron2, tmp_path, "--task", "coco_det", "--full", "--weights", "random", "--num-gpus", "4")
    assert _solver(four.cfg) == (16, 0.02, 90000, (60000, 80000), 1000)
    assert four.cfg.MODEL.RESNETS.NORM == four.cfg.MODEL.FPN.NORM == "naiveSyncBN"  # synchronised over the 4 GPUs
    assert four.deviations == ["4 processes (recipe: 8 GPUs)"]
    four = _prepare(toy_detectron2, tmp_path, "--task", "coco_det", "--full", "--weights", "random", "--num-gpus", "4",
                    "--linear-scaling")
    assert _solver(four.cfg) == (8, 0.01, 180000, (120000, 160000), 2000)
    fake_gpus(8)  # MoCo's own setting: exactly the recipe
    eight = _prepare(toy_detectron2, tmp_path, "--task", "voc_det", "--full", "--weights", "random", "--num-gpus", "8")
    assert _solver(eight.cfg) == (16, 0.02, 24000, (18000, 22000), 100) and eight.deviations == []


def test_toy_path_unchanged(toy_detectron2, tmp_path):
    """toy.yaml is written for one worker: batch 2, lr 0.01, 8 iterations, no scaling."""
    spec = _prepare(toy_detectron2, tmp_path, "--task", "voc_det", "--weights", "random")
    assert _solver(spec.cfg) == (2, 0.01, 8, (6,), 2) and spec.cfg.SOLVER.REFERENCE_WORLD_SIZE == 1
    assert spec.cfg.MODEL.DEVICE == "cpu" and spec.cfg.MODEL.RESNETS.NORM == "BN"
    assert spec.deviations == ["toy scale", "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)",
                               "naiveSyncBN -> BN (MODEL.RESNETS.NORM)", "eval on the first 16 test images"]


@pytest.mark.parametrize("flags, opts, message", [
    (["--task", "voc_det"], [], "already written for SOLVER.REFERENCE_WORLD_SIZE 1 worker(s) (toy.yaml)"),
    (["--task", "voc_det", "--full"], ["SOLVER.REFERENCE_WORLD_SIZE", "2"], "drop one of them"),
    (["--task", "voc_det", "--full"], ["SOLVER.IMS_PER_BATCH", "12"], "divisible by MoCo's 8"),
])
def test_linear_scaling_errors_one_line(toy_detectron2, tmp_path, capsys, flags, opts, message):
    assert launcher.main([*flags, "--linear-scaling", "--weights", "random", "--data-root", str(toy_detectron2),
                          "--out", str(tmp_path / "out"), *opts]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cuda_out_of_memory_is_one_line_naming_the_flag(toy_detectron2, tmp_path, capsys, monkeypatch):
    """The trainer's first step raises CUDA's out-of-memory error (as a GPU too small for 16 images would):
    exit 2, one line on stderr that names --linear-scaling, no traceback on stdout or in log.txt, no record."""
    from detectron2.engine import SimpleTrainer

    def run_step(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total "
                                          "capacity of 23.6 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(SimpleTrainer, "run_step", run_step)
    out = tmp_path / "oom"
    assert launcher.main(["--task", "voc_det", "--full", "--weights", "random", "--data-root", str(toy_detectron2),
                          "--out", str(out), "DATALOADER.NUM_WORKERS", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "CUDA out of memory training with 16 images per GPU" in captured.err
    assert "rerun with --linear-scaling" in captured.err
    assert "Traceback" not in captured.out and "Traceback" not in captured.err
    log = (out / "log.txt").read_text()
    assert "Exception during training: CUDA out of memory. Tried to allocate 1.50 GiB" in log
    assert "Traceback" not in log and not (out / "record.json").exists()


def test_user_error_in_a_worker_process_is_one_line():
    """With --num-gpus N the workers are separate processes: their UserError reaches the launcher as text."""
    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  File ...\n"
            "ctbench.errors.UserError: CUDA out of memory training with 8 images per GPU (SOLVER.IMS_PER_BATCH 16 on "
            "2 processes); rerun with --linear-scaling\n")
    err = launcher.worker_user_error(torch.multiprocessing.ProcessRaisedException(text, 1, 4242))
    assert str(err) == ("CUDA out of memory training with 8 images per GPU (SOLVER.IMS_PER_BATCH 16 on 2 processes); "
                        "rerun with --linear-scaling")
    other = torch.multiprocessing.ProcessRaisedException("\n...\nRuntimeError: boom\n", 0, 1)
    assert launcher.worker_user_error(other) is None


def test_protocol_deviations_of_overrides_and_eval_subset(toy_detectron2, tmp_path):
    """Schedule overrides in words, other overrides as KEY old -> new, keys that change no number left out;
    unchanged values, seeds and paths never appear."""
    spec = _prepare(toy_detectron2, tmp_path, "--task", "voc_det", "--full", "--weights", "random",
                    "--eval-images", "5", "--seed", "3",
                    "SOLVER.BASE_LR", "0.01", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "100",
                    "SOLVER.STEPS", "(50,)", "SOLVER.WARMUP_ITERS", "100", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1",
                    "SEED", "7", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", "/elsewhere", "MODEL.DEVICE", "cpu")
    assert spec.deviations == [
        "lr 0.02 -> 0.01", "batch 16 -> 8", "24k -> 100 iters", "steps 18k/22k -> 50",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.05 -> 0.1",
        "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)", "naiveSyncBN -> BN (MODEL.RESNETS.NORM)",
        "eval on the first 5 test images"]
    # overrides first, then the adaptation that applies to them: --linear-scaling scales the overridden schedule
    scaled = launcher.prepare(["--data-root", str(toy_detectron2), "--out", str(tmp_path / "o"), "--task", "voc_det",
                             "--full", "--weights", "random", "--linear-scaling", "SOLVER.MAX_ITER", "3"])[0]
    assert scaled.cfg.SOLVER.MAX_ITER == 24 and scaled.deviations == [
        "24k -> 3 iters", "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)", "naiveSyncBN -> BN (MODEL.RESNETS.NORM)",
        "linear scaling from 8 GPUs: batch 16 -> 2, lr 0.02 -> 0.0025, 3 -> 24 iters"]

    custom = tmp_path / "mine.yaml"
    custom.write_text(f'_BASE_: "{C.config_file("voc_det")}"\nSOLVER:\n  MAX_ITER: 5000\n')
    spec = _prepare(toy_detectron2, tmp_path, "--config-file", str(custom), "--full", "--weights", "random")
    assert spec.recipe == "custom detectron2 config mine.yaml" and spec.schedule == "5k iters"


def _caffe2_names(model) -> dict:
    """The backbone of a detectron2 R50-C4 model under the Caffe2/Detectron1 names of MSRA's R-50.pkl (affine BN:
    scale ``_bn_s`` and bias ``_bn_b`` only), plus the ImageNet classifier ``fc1000``."""
    import re

    blobs = {}
    for key, value in model.state_dict().items():
        m = re.fullmatch(r"(?:backbone|roi_heads)\.(stem|res\d)\.?(\d*)\.?(conv\d|shortcut)\.(norm\.)?(weight|bias)",
                         key)
        if not m:
            continue
        stage, block, conv, norm, what = m.groups()
        if stage == "stem":
            name = "res_conv1_bn" if norm else "conv1"
        else:
            branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
            name = f"{stage}_{block}_{branch}" + ("_bn" if norm else "")
        blobs[f"{name}_{'s' if norm and what == 'weight' else 'b' if norm else 'w'}"] = value.numpy().copy()
    blobs["fc1000_w"], blobs["fc1000_b"] = torch.randn(1000, 2048).numpy(), torch.zeros(1000).numpy()
    return blobs


def test_supervised_msra_weights_load_and_name_the_run(toy_detectron2, tmp_path, capsys):
    """A Caffe2 ImageNet pickle (MSRA R-50.pkl's format) is read as such, names the run ``supervised``, loads
    into voc_det_supervised_msra's model with every backbone tensor equal, and is refused by an RGB task."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = C.load_config(C.config_file("voc_det_supervised_msra"), toy=False, opts=["MODEL.DEVICE", "cpu"])
    C.adapt(cfg, 1, set())
    torch.manual_seed(1)
    source = build_model(cfg)
    blobs = _caffe2_names(source)
    assert len(blobs) == 3 * 53 + 2  # 53 convs (stem, 16 blocks x 3, 4 shortcuts) + BN scale and bias each; fc1000
    pkl = tmp_path / "R-50.pkl"
    pkl.write_bytes(pickle.dumps(blobs))

    w = resolve(str(pkl), log=lambda _: None)
    assert (w.kind, w.name, w.path) == ("caffe2", "supervised", str(pkl))
    spec = _prepare(toy_detectron2, tmp_path, "--task", "voc_det_supervised_msra", "--full", "--weights", str(pkl))
    assert spec.weights.name == "supervised" and spec.weights.path == spec.cfg.MODEL.WEIGHTS == str(pkl)
    assert spec.deviations == ["1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)",
                               "naiveSyncBN -> BN (MODEL.RESNETS.NORM)"]
    assert spec.recipe == tasks.TASK_INFO["voc_det_supervised_msra"].recipe
    assert spec.recipe.endswith("pascal_voc_R_50_C4_24k.yaml")

    torch.manual_seed(2)
    target = build_model(cfg)
    DetectionCheckpointer(target).load(str(pkl))
    src, dst = source.state_dict(), target.state_dict()
    loaded = [k for k in src if k.endswith(("weight", "bias")) and (".res" in k or ".stem." in k)
              and not k.startswith("roi_heads.res5.norm")]
    assert len(loaded) == len(blobs) - 2
    for k in loaded:
        assert torch.equal(src[k], dst[k]), k

    assert launcher.main(["--task", "voc_det", "--full", "--weights", str(pkl), "--data-root", str(toy_detectron2),
                          "--out", str(tmp_path / "rgb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expect BGR input" in err and "voc_det_supervised_msra" in err


def test_supervised_msra_default_weights_offline_is_one_line(toy_detectron2, tmp_path, capsys, monkeypatch):
    """The task's default weights are detectron2's MSRA R-50.pkl URL; without internet: one line saying how to
    give the file."""
    from detectron2.utils.file_io import PathManager

    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    assert launcher.main(["--task", "voc_det_supervised_msra", "--full", "--data-root", str(toy_detectron2),
                          "--out", str(tmp_path / "out")]) == 2
    assert asked == ["detectron2://ImageNetPretrained/MSRA/R-50.pkl"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "cannot download detectron2://ImageNetPretrained/MSRA/R-50.pkl" in err
    assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl" in err
    assert "--weights /path/R-50.pkl" in err
