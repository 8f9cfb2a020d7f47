"""The pretraining table: a row per pretraining run with its loss, throughput, cost and kNN top-1 (the monitor's
and `python -m pretrain.knn`'s record), random init's kNN beside it."""

from __future__ import annotations

import json

import pytest

from ctbench.records import RunRecord, load_record
from results.collect import results_frame
from results.reported import load_reported
from results.tables import build_tables


def _pretrain(root, name, *, gpus: bool, world: int, seed: int = 0):
    out = root / "pretrain" / name
    with RunRecord("pretrain", name, out, config={"method": "moco_v2", "train": {"epochs": 200, "seed": seed}},
                   seed=seed) as rec:
        rec.metrics.update(loss_final=6.5, img_per_s=1200.0, train_time_s=7200.0, epochs=200, complete=True,
                           knn_top1=40.0)
        rec.data["protocol"] = {"recipe": "MoCo v2", "deviations": [] if world == 8 else ["bf16 autocast"]}
    data = load_record(out)
    data["hardware"] = {"gpus": ["NVIDIA H100"] * world if gpus else [], "world_size": world}
    (out / "record.json").write_text(json.dumps(data))  # the hardware of the run, not of this test machine
    return out


def _knn(root, name, inputs, top1):
    with RunRecord("knn", name, root / "knn" / name, config={"k": 20, "t": 0.07, "image_size": 224},
                   inputs=inputs) as rec:
        rec.metrics["top1"] = top1
        rec.data["protocol"] = {"recipe": "weighted kNN", "deviations": []}


def test_pretraining_table_rows_costs_and_knn(tmp_path):
    pre = _pretrain(tmp_path, "moco_v2", gpus=True, world=8)
    _pretrain(tmp_path, "moco_v2_cpu", gpus=False, world=1)
    _knn(tmp_path, "moco_v2", [pre], 45.5)
    _knn(tmp_path, "random", [], 5.0)
    df = results_frame(tmp_path)
    table = next(t for t in build_tables(df, load_reported()) if t.key == "pretraining")
    labels = [c.label for c in table.columns]
    assert labels == ["loss", "img/s", "train h", "GPU-h", "kNN (monitor)", "kNN top-1"]
    rows = {r.fields["run"] or r.method: r for r in table.rows}
    gpu = rows["moco_v2"]
    cell = dict(zip(labels, gpu.cells))
    assert cell["loss"].mean == 6.5 and cell["train h"].mean == pytest.approx(2.0)
    assert cell["GPU-h"].mean == pytest.approx(16.0)  # 2 h on 8 GPUs
    assert cell["kNN (monitor)"].mean == 40.0 and cell["kNN top-1"].mean == 45.5  # the kNN record joins its run
    cpu = dict(zip(labels, rows["moco_v2_cpu"].cells))
    assert cpu["GPU-h"].n == 0 and cpu["train h"].mean == pytest.approx(2.0)  # no GPU: no GPU-hours
    assert rows["moco_v2"].fields["pretraining"] == "as published"
    assert rows["moco_v2_cpu"].fields["pretraining"] == "bf16 autocast"
    rand = [r for r in table.rows if r.method == "random"]
    assert len(rand) == 1 and rand[0].cells[-1].mean == 5.0 and rand[0].cells[0].n == 0


def test_the_knn_command_writes_a_record_linked_to_its_pretraining(toy_datasets, tmp_path, monkeypatch):
    from pretrain.knn import main

    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path))
    assert main(["--ckpt", "random", "--data", str(toy_datasets / "imagenet"), "--image-size", "32"]) == 0
    rec = load_record(tmp_path / "knn" / "random")
    assert rec["kind"] == "knn" and rec["name"] == "random" and 0 <= rec["metrics"]["top1"] <= 100
    assert rec["protocol"]["deviations"][0] == "toy scale" and rec["dataset"]["toy"] is True
