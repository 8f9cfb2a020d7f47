"""The original MoCo v2 loop on the toy data (benchmarks.reference_toy): it trains, monitors kNN and writes a
checkpoint in main_moco.py's format that the suite's kNN reads back to the same number."""

from __future__ import annotations

import json

import torch
import torchvision

from benchmarks import reference_toy
from ctbench.checkpoints import load_backbone
from pretrain.knn import knn_top1
from pretrain.model import resnet50


def test_reference_moco_runs_on_the_toy_layout_and_its_checkpoint_is_mocos(toy_datasets, tmp_path):
    train, out = toy_datasets / "imagenet" / "train", tmp_path / "ref"
    assert reference_toy.main(["--data", str(train), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                               "--queue", "32", "--bn-splits", "2", "--knn-every", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == len(list(train.glob("*/*"))) // 8 and summary["args"]["queue"] == 32
    assert [h[0] for h in summary["knn_history"]] == [0, summary["steps"]]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == [1] and rows[-1]["knn_top1"] == summary["knn_top1"]
    ckpt = out / "checkpoint.pth.tar"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith("module.encoder_q.") for k in state)
    net = resnet50()
    net.load_state_dict(load_backbone(ckpt).state_dict, strict=False)
    assert knn_top1(net, train, train.parent / "val", image_size=32) == summary["knn_top1"]


def test_residual_gamma_sets_every_bottlenecks_last_bn_in_both_encoders():
    model = reference_toy.ReferenceMoCo(K=16, bn_splits=2)
    reference_toy.set_residual_gamma(model, 0.2)
    for enc in (model.encoder_q, model.encoder_k):
        gammas = [m.bn3.weight for m in enc.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
        assert len(gammas) == 16 and all(torch.all(g == 0.2) for g in gammas)
        assert torch.all(enc.bn1.weight == 1.0)  # the stem's BN is left at torchvision's init
    for (name, q), k in zip(model.encoder_q.state_dict().items(), model.encoder_k.state_dict().values()):
        assert torch.equal(q, k), name
