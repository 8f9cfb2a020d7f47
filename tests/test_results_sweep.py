"""Sweeps and ablation tables know every transfer task that evaluates pretrained weights: MoCo's C4 2x setting, the
keypoint 2x schedule, VOC07 SVM classification and VOC semantic segmentation included."""

from __future__ import annotations

from pathlib import Path

from orchestrate import sweep
from results import tables

CONFIGS = Path(__file__).resolve().parent.parent / "transfer" / "configs"


def test_sweep_and_headline_cover_every_task_config():
    # not bases, not the toy overlays (toy.yaml for detection, toy_seg.yaml for segmentation)
    tasks = {p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith(("Base-", "toy"))}
    assert {"coco_det_c4_2x", "coco_mask_c4_2x", "coco_kp", "coco_kp_2x", tables.SUPERVISED_MSRA_TASK} <= tasks
    assert "voc_seg" in tasks
    # the supervised baseline task brings its own weights: nothing to sweep
    assert set(sweep.DETECTION_TASKS) == tasks - {tables.SUPERVISED_MSRA_TASK}
    assert {*sweep.DETECTION_TASKS, sweep.SVM} <= set(tables.HEADLINE) and sweep.SVM in sweep.EVALS
    in_tables = {t for spec in tables.MAIN_TABLES for t in spec.tasks}
    assert tasks | {sweep.SVM} <= in_tables  # every task's records reach a main table


def test_sweep_plans_c4_2x_and_keypoint_2x_evaluations(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: g\nmethod: moco_v2\nscale: toy\ngrid: {loss.tau: [0.2]}\n"
                 "evals: [coco_det_c4_2x, coco_mask_c4_2x, coco_kp_2x]\n")
    spec = sweep.load_spec(p)
    stages = sweep.plan(spec, tmp_path)
    tasks = [s.argv[s.argv.index("--task") + 1] for s in stages if s.kind == "transfer"]
    assert tasks == ["coco_det_c4_2x", "coco_mask_c4_2x", "coco_kp_2x"]
    assert [s.kind for s in stages[:2]] == ["pretrain", "convert"]


def test_sweep_plans_voc_svm_and_segmentation(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: g\nmethod: co2\nscale: toy\ngrid: {loss.con_weight: [0.5]}\nevals: [voc07_svm, voc_seg]\n")
    stages = sweep.plan(sweep.load_spec(p), tmp_path)
    assert [s.kind for s in stages] == ["pretrain", "convert", "svm", "transfer"]
    svm, seg = stages[2], stages[3]
    ckpt = str(tmp_path / "pretrain" / "g" / "loss.con_weight=0.5" / "checkpoint.pth.tar")
    assert svm.argv[1:5] == ["-m", "transfer.voc07_svm", "--ckpt", ckpt]  # the SVMs read the checkpoint
    assert seg.argv[seg.argv.index("--task") + 1] == "voc_seg"  # segmentation: detectron2 on the converted .pkl
    assert seg.argv[seg.argv.index("--weights") + 1].endswith("model_d2.pkl")
    assert seg.needs == ("pretrain/g/loss.con_weight=0.5", "convert/g/loss.con_weight=0.5")
