"""Sweeps and ablation tables know every detection task that evaluates pretrained weights, MoCo's C4 2x setting
and the keypoint 2x schedule included."""

from __future__ import annotations

from pathlib import Path

from ctbench import sweep
from results import tables

CONFIGS = Path(__file__).resolve().parent.parent / "transfer" / "configs"


def test_sweep_and_headline_cover_every_task_config():
    tasks = {p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("Base-") and p.stem != "toy"}
    assert {"coco_det_c4_2x", "coco_mask_c4_2x", "coco_kp", "coco_kp_2x", tables.SUPERVISED_MSRA_TASK} <= tasks
    # the supervised baseline task brings its own weights: nothing to sweep
    assert set(sweep.DETECTION_TASKS) == tasks - {tables.SUPERVISED_MSRA_TASK}
    assert set(sweep.DETECTION_TASKS) <= set(tables.HEADLINE)
    in_tables = {t for spec in tables.MAIN_TABLES for t in spec.tasks}
    assert tasks <= in_tables  # every task's records reach a main table


def test_sweep_plans_c4_2x_and_keypoint_2x_evaluations(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: g\nmethod: moco_v2\nscale: toy\ngrid: {loss.tau: [0.2]}\n"
                 "evals: [coco_det_c4_2x, coco_mask_c4_2x, coco_kp_2x]\n")
    spec = sweep.load_spec(p)
    stages = sweep.plan(spec, tmp_path)
    tasks = [s.argv[s.argv.index("--task") + 1] for s in stages if s.kind == "transfer"]
    assert tasks == ["coco_det_c4_2x", "coco_mask_c4_2x", "coco_kp_2x"]
    assert [s.kind for s in stages[:2]] == ["pretrain", "convert"]
