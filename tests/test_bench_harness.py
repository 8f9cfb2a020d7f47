"""The benchmark harness (``python -m benchmarks``): a ``--quick`` run writes records and a report whose ratios are
computed from the measured times; the pipelines deliver the right batches; goals are judged from the rows."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.inputs import PIPELINES, build_pipeline, synthetic_imagefolder
from benchmarks.report import evaluate_goals
from ctbench.records import load_record


def test_quick_run_writes_records_and_report_with_measured_ratios(tmp_path, monkeypatch):
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "out"))
    reports = tmp_path / "reports"
    rc = main(["--quick", "--device", "cpu", "--only", "compute", "--methods", "moco_v2", "--reports", str(reports)])
    assert rc == 0
    data = json.loads((reports / "cpu-quick.json").read_text())
    rows = data["results"]["compute"]
    assert [r["name"] for r in rows] == ["reference moco_v2", "reference moco_v2, one BN group", "ours moco_v2"]
    ref, plain, ours = rows
    assert ref["bn"].startswith("split-BN") and ours["bn"] == ref["bn"].split(" (")[0]  # equal semantics
    assert len(ref["windows_s_per_step"]) == len(ours["windows_s_per_step"]) >= 2  # alternating windows
    paired = [(r / 8) / (o / 8) for r, o in zip(ref["windows_s_per_step"], ours["windows_s_per_step"])]
    assert ours["ratio_windows"] == {"min": pytest.approx(min(paired)), "max": pytest.approx(max(paired)),
                                     "windows": len(paired)}
    for r in rows:
        assert r["s_per_step"] > 0 and r["steps"] >= 1 and r["items_per_step"] == 8
        assert r["items_per_s"] == pytest.approx(r["items_per_step"] / r["s_per_step"])
        assert r["s_per_step"] == pytest.approx(statistics.median(r["windows_s_per_step"]))
    assert ref["ratio_vs_reference"] == pytest.approx(1.0)
    assert ours["ratio_vs_reference"] == pytest.approx(ref["s_per_step"] / ours["s_per_step"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["git"]["commit"]
    assert data["settings"]["quick"] is True

    record = load_record(tmp_path / "out" / "bench" / "cpu-quick" / "compute")
    assert record["kind"] == "bench" and record["task"] == "compute"
    assert record["metrics"]["rows"] == rows
    assert data["records"]["compute"].endswith("compute/record.json")

    md = (reports / "cpu-quick.md").read_text()
    assert "## Pretraining step, model compute" in md and "## Goals (issue 7)" in md
    assert f"| ours moco_v2 | 2 | {ours['bn']} | {ours['items_per_s']:,.1f} |" in md
    assert "QUICK smoke run" in md


def test_cli_rejects_unknown_section(capsys):
    assert main(["--quick", "--only", "nonsense"]) == 2
    assert "unknown section 'nonsense'" in capsys.readouterr().err


def test_pipelines_deliver_device_batches(tmp_path):
    root = synthetic_imagefolder(8, (40, 30), classes=2, root=tmp_path / "data")
    dev = torch.device("cpu")
    for kind in PIPELINES:
        views = 2 if kind == "reference" else 3
        it = iter(build_pipeline(kind, root, dev, image_size=32, batch=4, num_views=views, workers=0))
        images, targets, n_bad = next(it)
        if kind == "reference":
            assert isinstance(images, list) and len(images) == 2 and images[0].shape == (4, 3, 32, 32)
        else:
            assert images.shape == (4, views, 3, 32, 32) and images.dtype == torch.float32
            assert torch.isfinite(images).all()
        assert targets.shape == (4,) and n_bad == 0
        next(it), next(it)  # a second epoch starts by itself (8 images = 2 batches)


def _row(name, s, items, **kw):
    return {"name": name, "s_per_step": s, "items_per_step": items, "items_per_s": items / s, **kw}


def test_goals_are_judged_from_rows():
    results = {
        "compute": [_row("ours moco_v2", 0.08, 256, impl="ours", method="moco_v2", views=2, ratio_vs_reference=3.0),
                    _row("ours jcl", 0.2, 256, impl="ours", method="jcl", views=6, ratio_vs_reference=1.2)],
        "pipeline": [_row("ours moco_v2", 0.1, 256, ratio_vs_reference=2.0)],
        "data": [_row("device moco_v2 x2 views", 0.03, 256, pipeline="device", augmentation="moco_v2", views=2)],
    }
    settings = {"device": "cuda", "image_size": 224, "batch": 256}

    def goal(goals, text):
        return next(g for g in goals if text in g["goal"])

    goals = evaluate_goals(results, settings, "NVIDIA H100 80GB HBM3")
    assert goal(goals, "end-to-end")["met"] is False  # 2,560 img/s < 3,000
    assert goal(goals, "reference step (one H100)")["met"] is True  # 3.0x
    assert goal(goals, "equal semantics")["met"] is None  # not a CPU run
    jcl = goal(goals, "JCL")
    assert jcl["measured"] == pytest.approx(2.5) and jcl["met"] is False  # 0.2 / 0.08
    assert goal(goals, "data pipeline")["met"] is True  # 8,533 pairs/s
    on_a100 = evaluate_goals(results, settings, "NVIDIA A100-SXM4-80GB")
    assert all(g["met"] is None for g in on_a100 if "H100" in g["goal"])
