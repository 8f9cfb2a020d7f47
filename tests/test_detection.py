"""transfer.detection on the tiny toy data, on CPU: every detection task config trains 2 iterations and evaluates,
writing a record with its AP metrics, its schedule and its protocol (voc_seg: tests/test_segmentation.py); trials
and their summary; --eval-only reproduces a training run's evaluation; faster-coco-eval == pycocotools; the
launcher's one-line errors; Res5ROIHeadsExtraNorm and DilatedFCNHead registered on import.

The runs go through the launcher's ``main`` in this process (``launch`` with one process calls the worker directly).
Cheap on purpose: toy.yaml (~100 px images) + 2 iterations, 2 evaluation images, 1 PreciseBN iteration, and
``SCORE_THRESH_TEST 0`` so that a barely trained model still outputs boxes and AP is a number (not "no predictions").
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from ctbench.records import RECORD_NAME, load_record  # noqa: E402
from transfer import tasks  # noqa: E402
from transfer.detection import __main__ as launcher  # noqa: E402
from transfer.detection import config as C  # noqa: E402

pytestmark = pytest.mark.detectron2
REPO = Path(__file__).resolve().parent.parent
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.NUM_ITER", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
C4_TASKS = ("voc_det", "voc_det_supervised_msra", "coco_det_c4", "coco_mask_c4", "coco_det_c4_2x", "coco_mask_c4_2x")


def _run(root: Path, task: str, out: Path, *extra: str, weights: str = "random") -> int:
    return launcher.main(["--task", task, "--weights", weights, "--data-root", str(root), "--out", str(out),
                          "--eval-images", "2", *extra, *FAST])


def _ap_types(task: str) -> list[str]:
    if task.startswith("coco_kp"):
        return ["bbox", "keypoints"]
    return ["bbox", "segm"] if "mask" in task else ["bbox"]


@pytest.mark.parametrize("task", tasks.DETECTION_TASKS)
def test_task_trains_evaluates_and_records(toy_detectron2, tmp_path, task):
    out = tmp_path / task
    assert _run(toy_detectron2, task, out) == 0
    rec = load_record(out / RECORD_NAME)
    assert rec["kind"] == "transfer" and rec["task"] == task and rec["name"] == "random"
    m = rec["metrics"]
    assert m["iters"] == 2 and m["eval_images"] == 2 and m["train_s"] > 0 and m["eval_s"] > 0
    for kind in _ap_types(task):
        for metric in ("AP", "AP50", "AP75"):
            assert isinstance(m[f"{kind}/{metric}"], float), (kind, metric, m.get(f"{kind}/{metric}"))
    assert not any(k.startswith("segm/") for k in m) or "mask" in task
    cfg = rec["config"]
    assert cfg["MODEL"]["DEVICE"] == "cpu" and cfg["MODEL"]["RESNETS"]["NORM"] == "BN"  # one process: naiveSyncBN -> BN
    assert cfg["MODEL"]["ROI_HEADS"]["NAME"] == ("Res5ROIHeadsExtraNorm" if task in C4_TASKS else "StandardROIHeads")
    assert cfg["MODEL"]["MASK_ON"] == ("mask" in task) and cfg["MODEL"]["KEYPOINT_ON"] == task.startswith("coco_kp")
    assert cfg["INPUT"]["FORMAT"] == ("BGR" if task == "voc_det_supervised_msra" else "RGB")
    assert rec["toy"] is True and rec["dataset"] is not None
    assert any("toy.yaml" in n for n in rec["notes"])
    assert rec["schedule"] == tasks.TASK_INFO[task].schedule == ("2x" if task.endswith("_2x") else
                                                             "24k" if task.startswith("voc") else "1x")
    norms = "MODEL.RESNETS.NORM" if task in C4_TASKS else "MODEL.FPN.NORM, MODEL.RESNETS.NORM"
    assert rec["protocol"] == {"recipe": tasks.TASK_INFO[task].recipe, "deviations": [
        "toy scale", "8 -> 2 iters", "steps 6 -> 1", "warm-up 2 -> 1", "TEST.PRECISE_BN.NUM_ITER 2 -> 1",
        "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)", f"naiveSyncBN -> BN ({norms})",
        "eval on the first 2 test images"]}
    assert (out / "log.txt").is_file() and (out / "config.yaml").is_file() and (out / "metrics.json").is_file()
    assert not (out / "model_final.pth").exists()  # toy runs keep no model unless --save-model


def test_protocol_values_and_one_process_scaling():
    """The configs as written (MoCo's 8-GPU protocol), and what one process turns them into: MoCo's batch of 16,
    lr and schedule by default (until this change: linear scaling to batch 2, lr 0.0025, 8x the iterations, which is
    now opt-in), BN over the 16 images in place of naiveSyncBN."""
    schedules = {"voc_det": (24000, (18000, 22000)), "voc_det_supervised_msra": (24000, (18000, 22000)),
                 "coco_det_c4_2x": (180000, (120000, 160000)), "coco_mask_c4_2x": (180000, (120000, 160000)),
                 "coco_kp_2x": (180000, (120000, 160000))}
    for task in tasks.DETECTION_TASKS:
        cfg = C.load_config(C.config_file(task), toy=False, opts=[])
        if task == "voc_det_supervised_msra":  # MSRA R-50.pkl: detectron2's BGR/caffe defaults
            assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_MEAN) == [103.53, 116.28, 123.675]
            assert list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0] and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is True
        else:
            assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
            assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375] and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
        assert cfg.TEST.PRECISE_BN.ENABLED and cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
        assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0
        max_iter, steps = schedules.get(task, (90000, (60000, 80000)))
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (max_iter, steps), task
        if task not in C4_TASKS:
            assert cfg.MODEL.FPN.NORM == "naiveSyncBN"
        scaled = cfg.clone()
        notes = C.adapt(cfg, 1, set()).notes
        assert cfg.MODEL.RESNETS.NORM == "BN" and cfg.MODEL.FPN.NORM in ("", "BN")
        got = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS))
        assert got == (16, 0.02, max_iter, steps), (task, got)
        assert not any("linear scaling" in n for n in notes)
        notes = C.adapt(scaled, 1, set(), linear_scaling=True).notes  # opt-in: detectron2's auto_scale_workers
        got = (scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.BASE_LR, scaled.SOLVER.MAX_ITER)
        assert got == (2, 0.0025, 8 * max_iter), (task, got)
        assert tuple(scaled.SOLVER.STEPS) == tuple(8 * s for s in steps) and any("linear scaling" in n for n in notes)
        assert scaled.MODEL.RESNETS.NORM == "BN"
    voc = C.load_config(C.config_file("voc_det"), toy=False, opts=[])
    assert voc.MODEL.ROI_HEADS.NUM_CLASSES == 20 and voc.DATASETS.TEST == ("voc_2007_test",)
    assert min(voc.INPUT.MIN_SIZE_TRAIN) == 480 and voc.SOLVER.WARMUP_ITERS == 100
    kept = C.load_config(C.config_file("coco_mask"), toy=False, opts=["SOLVER.REFERENCE_WORLD_SIZE", "1"])
    C.adapt(kept, 1, {"SOLVER.REFERENCE_WORLD_SIZE"})
    assert kept.SOLVER.IMS_PER_BATCH == 16 and kept.MODEL.RESNETS.NORM == "BN"
    multi = C.load_config(C.config_file("coco_mask"), toy=False, opts=["MODEL.DEVICE", "cpu"])
    C.adapt(multi, 2, set())
    assert multi.MODEL.RESNETS.NORM == multi.MODEL.FPN.NORM == "naiveSyncBN" and multi.SOLVER.IMS_PER_BATCH == 16
    old = C.load_config(C.config_file("coco_mask"), toy=False, opts=["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM",
                                                                       "SyncBN", "MODEL.FPN.NORM", "SyncBN"])
    assert C.adapt(old, 2, set()).deviations == ["2 processes (recipe: 8 GPUs)", "CPU (recipe: GPUs)",
                                                 "SyncBN -> naiveSyncBN (MODEL.FPN.NORM, MODEL.RESNETS.NORM)"]
    assert old.MODEL.RESNETS.NORM == old.MODEL.FPN.NORM == "naiveSyncBN"  # nn.SyncBatchNorm needs GPUs


def test_trials_summary_and_eval_only_reproduces(toy_detectron2, tmp_path):
    out = tmp_path / "trials"
    assert _run(toy_detectron2, "coco_det", out, "--trials", "2", "--seed", "5", "--save-model") == 0
    trials = [load_record(out / f"trial{t}" / RECORD_NAME) for t in range(2)]
    assert [r["seed"] for r in trials] == [5, 6] and [r["trial"] for r in trials] == [0, 1]
    summary = load_record(out / RECORD_NAME)
    assert summary["trial"] is None and summary["trials"] == 2 and summary["seed"] is None
    assert summary["seeds"] == [5, 6]
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        vals = [r["metrics"][key] for r in trials]
        assert summary["per_trial"][key] == vals
        assert summary["metrics"][key] == pytest.approx(statistics.fmean(vals))
        assert summary["metrics"][f"{key}_std"] == pytest.approx(statistics.stdev(vals))
    assert summary["outputs"]["trials"] == [f"trial{t}/{RECORD_NAME}" for t in range(2)]
    # two trials of one protocol: equal protocol entries (no seed in them), and the summary carries the same
    assert trials[0]["protocol"] == trials[1]["protocol"] == summary["protocol"]
    assert summary["protocol"]["recipe"] == tasks.TASK_INFO["coco_det"].recipe and summary["schedule"] == "1x"

    # --eval-only on trial 1's final model: same numbers as the evaluation at the end of its training
    model = out / "trial1" / "model_final.pth"
    assert model.is_file()
    ev = tmp_path / "eval"
    assert launcher.main(["--task", "coco_det", "--eval-only", "--weights", str(model), "--data-root",
                          str(toy_detectron2), "--out", str(ev), "--eval-images", "2",
                          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]) == 0
    rec = load_record(ev / RECORD_NAME)
    assert rec["eval_only"] is True and rec["metrics"]["iters"] == 0
    assert rec["protocol"]["deviations"][-2:] == ["eval on the first 2 test images", "eval only"]
    assert rec["weights"]["kind"] == "detectron2" and rec["inputs"][0]["id"] == trials[1]["id"]
    for key, value in trials[1]["metrics"].items():
        if key.startswith("bbox/"):
            assert rec["metrics"][key] == value, key


def test_a_rerun_keeps_earlier_trials_and_refuses_another_config(toy_detectron2, tmp_path, capsys):
    """`--trials 2` then a plain rerun: both trials and their summary are kept (they were deleted); more trials add
    to them; one trial then two moves the first into trial0/; another config is a one-line error; --fresh replaces."""
    out = tmp_path / "kp"
    assert _run(toy_detectron2, "voc_det", out, "--trials", "2") == 0
    ids = [load_record(out / f"trial{t}" / RECORD_NAME)["id"] for t in range(2)]
    summary = load_record(out / RECORD_NAME)["id"]
    capsys.readouterr()
    assert _run(toy_detectron2, "voc_det", out) == 0  # the default --trials 1
    assert "already finished" in capsys.readouterr().out
    assert [load_record(out / f"trial{t}" / RECORD_NAME)["id"] for t in range(2)] == ids
    assert load_record(out / RECORD_NAME)["id"] == summary
    assert _run(toy_detectron2, "voc_det", out, "--trials", "3") == 0  # adds trial 2, keeps 0 and 1
    assert [load_record(out / f"trial{t}" / RECORD_NAME)["id"] for t in range(2)] == ids
    new = load_record(out / RECORD_NAME)
    assert new["trials"] == 3 and new["seeds"] == [0, 1, 2] and len(new["per_trial"]["bbox/AP"]) == 3
    # another config in the same directory: refused in one line, nothing changed
    assert _run(toy_detectron2, "voc_det", out, "SOLVER.BASE_LR", "0.02") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1 and "is the result of another run (SOLVER.BASE_LR 0.01 -> 0.02" in err[0], err
    assert "--fresh" in err[0]
    assert load_record(out / RECORD_NAME)["id"] == new["id"]
    assert _run(toy_detectron2, "voc_det", out, "--fresh", "SOLVER.BASE_LR", "0.02") == 0
    assert load_record(out / RECORD_NAME)["trial"] == 0 and not list(out.glob("trial*"))
    # a single trial, then two: the first moves into trial0/ (same record), the second is run, a summary written
    first = load_record(out / RECORD_NAME)["id"]
    assert _run(toy_detectron2, "voc_det", out, "--trials", "2", "SOLVER.BASE_LR", "0.02") == 0
    assert load_record(out / "trial0" / RECORD_NAME)["id"] == first
    assert load_record(out / RECORD_NAME)["trials"] == 2


def test_faster_coco_eval_equals_pycocotools(toy_detectron2, tmp_path):
    """The same predictions (ground truth jittered, some classes wrong, random scores) give identical AP, every
    metric detectron2 reports (AP, AP50, AP75, APs/m/l, per class) for bbox, segm and keypoints."""
    import copy

    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, BoxMode, Instances
    from detectron2.structures.masks import polygons_to_bitmask

    from transfer.detection import data
    from transfer.detection.evaluation import CocoEvaluator

    names = ["coco_2017_val", "keypoints_coco_2017_val", "coco_2017_train"]
    data.register(names, toy_detectron2)
    g = torch.Generator().manual_seed(0)
    results = {}
    for name, kpt in (("coco_2017_val", False), ("coco_2017_train", False), ("keypoints_coco_2017_val", True)):
        dicts = DatasetCatalog.get(name)
        n_cls = len(MetadataCatalog.get(name).thing_classes)
        outputs = []
        for d in dicts:
            anns = d["annotations"] * 2  # every object twice: a duplicate lowers precision
            h, w = d["height"], d["width"]
            inst = Instances((h, w))
            boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns])
            boxes = boxes + torch.randn(boxes.shape, generator=g) * 4
            inst.pred_boxes = Boxes(boxes.clamp(min=0))
            inst.scores = torch.rand(len(anns), generator=g)
            cls = torch.tensor([a["category_id"] for a in anns])
            wrong = torch.rand(len(anns), generator=g) < 0.2
            inst.pred_classes = torch.where(wrong, torch.randint(0, n_cls, (len(anns),), generator=g), cls)
            if kpt:
                kp = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).view(-1, 17, 3)
                kp[..., :2] += torch.randn(kp[..., :2].shape, generator=g) * 3
                inst.pred_keypoints = kp
            else:
                masks = torch.from_numpy(np.stack([polygons_to_bitmask(a["segmentation"], h, w) for a in anns]))
                shift = int(torch.randint(0, 3, (), generator=g))
                inst.pred_masks = torch.roll(masks, shifts=shift, dims=2)
            outputs.append(({"image_id": d["image_id"]}, {"instances": inst}))
        for impl in ("faster", "pycocotools"):
            ev = CocoEvaluator(name, str(tmp_path / f"{name}-{impl}"), coco_impl=impl, distributed=False)
            ev.reset()
            for inp, outp in copy.deepcopy(outputs):  # instances_to_coco_json shifts pred_keypoints in place
                ev.process([inp], [outp])
            results[name, impl] = ev.evaluate()
    for name in names:
        fast, ref = results[name, "faster"], results[name, "pycocotools"]
        assert set(fast) == set(ref) == ({"bbox", "keypoints"} if "keypoints" in name else {"bbox", "segm"})
        for kind in ref:
            assert fast[kind].keys() == ref[kind].keys()
            for metric, value in ref[kind].items():
                f = fast[kind][metric]
                # identical up to the last bit of a float sum (C++ vs NumPy summation order): |diff| ~ 1e-14
                assert (np.isnan(f) and np.isnan(value)) or abs(f - value) < 1e-9, (name, kind, metric, f, value)
            assert 0 < ref[kind]["AP"] < 100  # a real, imperfect score: the comparison means something
    json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()})  # plain numbers


@pytest.mark.parametrize("argv, message", [
    (["--task", "voc_dett"], "unknown task 'voc_dett'; choose from"),
    (["--task", "voc_det", "--weights", "{tmp}/missing.pkl"], "weights not found"),
    (["--task", "voc_det", "--weights", "{tmp}/missing.pth.tar"], "weights not found"),
    (["--task", "voc_det", "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
    (["--task", "voc_det", "SOLVER.NO_SUCH_KEY", "1"], "bad config override"),
    (["--task", "voc_det", "--data-root", "{tmp}"], "not found under the data root"),
    (["--task", "voc_det", "--trials", "0"], "--trials must be >= 1"),
    (["--task", "voc_det", "--eval-only", "--weights", "random"], "--eval-only needs trained weights"),
    (["--task", "voc_det", "--weights", "{tmp}/junk.pkl"], "not a readable detectron2 .pkl"),
    ([], "give --task"),
])
def test_launcher_errors_one_line_exit_2(toy_detectron2, tmp_path, capsys, argv, message):
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data-root" not in argv:
        argv += ["--data-root", str(toy_detectron2)]
    assert launcher.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_import_registers_extra_norm_head_for_stock_detectron2(tmp_path):
    """A fresh interpreter: stock detectron2 does not know the heads; after ``import transfer.detection`` its own
    ``get_cfg`` + ``build_model`` build voc_det with the extra BN after res5, and (with ``add_sem_seg_config``)
    voc_seg with DilatedFCNHead."""
    code = """
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
assert "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY and "DilatedFCNHead" not in SEM_SEG_HEADS_REGISTRY
import transfer.detection
assert "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY
from detectron2.config import get_cfg
from detectron2.modeling import build_model
cfg = get_cfg()
cfg.merge_from_file("transfer/configs/voc_det.yaml")
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"])
model = build_model(cfg)
assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
assert type(model.roi_heads.res5.norm).__name__ == "BatchNorm2d" and model.roi_heads.res5.norm.num_features == 2048
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
assert "DilatedFCNHead" in SEM_SEG_HEADS_REGISTRY
from transfer.detection import add_sem_seg_config
cfg = get_cfg()
add_sem_seg_config(cfg)
cfg.merge_from_file("transfer/configs/voc_seg.yaml")
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM", "BN"])
model = build_model(cfg)
assert type(model).__name__ == "SemanticSegmentor" and type(model.sem_seg_head).__name__ == "DilatedFCNHead"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_a_launcher_error_is_the_only_line_on_stderr(tmp_path):
    """No torch.jit / pkg_resources warnings from detectron2's import before the one-line error."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "transfer.detection", "--task", "nope"], cwd=REPO, capture_output=True,
                       text=True, timeout=180, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'nope'" in lines[0], r.stderr
