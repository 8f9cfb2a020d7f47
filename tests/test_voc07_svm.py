"""VOC07 linear-SVM classification (transfer.voc07_svm): AP, cost selection, features, labels, low-shot, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ctbench.toydata import generate
from transfer import voc07_svm as S


def test_average_precision_matches_a_hand_computation():
    # ranked: + - + - - +   (3 positives): precision at the hits 1/1, 2/3, 3/6; all-point interpolation keeps
    # them (each is the max to its right); AP = (1 + 2/3 + 1/2) / 3
    targets = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert S.average_precision(targets, scores) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    # interpolation: - + + -> precision at hits 1/2, 2/3; the first is raised to 2/3 -> AP = 2/3
    assert S.average_precision(np.array([0, 1, 1]), np.array([3.0, 2.0, 1.0])) == pytest.approx(2 / 3)
    assert S.average_precision(np.array([1, 1, 0]), np.array([3.0, 2.0, 1.0])) == 1.0
    with pytest.raises(ValueError):
        S.average_precision(np.array([0, 0]), np.array([1.0, 2.0]))


def synthetic(n: int, d: int, n_cls: int, seed: int):
    """Linearly separable-ish features: class c shifts dimension c; labels in {1, -1} plus a few difficult (0)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, n_cls)) < 0.3, 1, -1).astype(np.int8)
    labels[rng.random((n, n_cls)) < 0.05] = 0
    for c in range(n_cls):
        labels[c, c] = 1  # every class has a positive
    x = rng.normal(size=(n, d)) + 1.5 * (labels == 1).astype(float) @ np.eye(n_cls, d)
    return S.normalize(x), labels


def test_svm_full_chooses_the_best_cross_validated_cost_and_scores_test_ap_by_hand():
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    costs = (0.01, 1.0, 100.0)
    xtr, ltr = synthetic(60, 8, 3, 0)
    xte, lte = synthetic(40, 8, 3, 1)
    res = S.svm_full(xtr, ltr, xte, lte, costs=costs, seed=0, n_jobs=1)
    for c in range(3):
        y = np.where(ltr[:, c] == 1, 1, -1)  # difficult-only images are negatives in training
        def svc(k):  # FAIR / mmselfsup train_svm_kfold_parallel.py, written out
            return LinearSVC(C=k, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                             loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0)

        cv = [cross_val_score(svc(k), xtr, y, cv=3, scoring="average_precision").mean() for k in costs]
        assert res["cv_ap"][c] == pytest.approx(cv)
        assert res["cost"][c] == costs[int(np.argmax(cv))]
        s = svc(res["cost"][c]).fit(xtr, y).decision_function(xte)
        keep = lte[:, c] != 0  # difficult-only images are dropped from the class's test set
        pos = (lte[keep, c] == 1)[np.argsort(-s[keep], kind="stable")]
        hits = np.nonzero(pos)[0]
        prec = [(i + 1) / (h + 1) for i, h in enumerate(hits)]
        interp = [max(prec[i:]) for i in range(len(prec))]
        assert res["ap"][c] == pytest.approx(sum(interp) / len(hits), abs=1e-12)


def test_normalize_and_the_protocol_constants():
    f = S.normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(f[0], [3 / (5 + 1e-5), 4 / (5 + 1e-5)]) and np.all(f[1] == 0)
    assert len(S.COSTS) == 19 and S.COSTS[:3] == (1.0, 10.0, 100.0) and S.COSTS[-1] == 0.5 ** 19
    m = S.make_svm(10.0, 0)
    assert (m.C, m.class_weight, m.penalty, m.loss, m.dual, m.tol, m.max_iter) == \
        (10.0, {1: 2, -1: 1}, "l2", "squared_hinge", True, 1e-4, 2000)


@pytest.mark.parametrize("setting", [S.FULL, S.TOY], ids=["full", "toy"])
def test_layer_features_have_mmselfsups_lengths_and_res5_is_8192(setting):
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, setting.size, setting.size)
    layers = list(S.POOLS)
    feats = S.layer_features(model, x, layers, setting.pools)
    want = {"conv1": 9216, "res2": 9216, "res3": 8192, "res4": 9216, "res5": 8192}  # mmselfsup MultiPooling dims
    assert {k: v.shape for k, v in feats.items()} == {k: (2, d) for k, d in want.items()}
    assert S.feature_dims(layers, setting) == want
    with torch.no_grad():
        res5 = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(
            model.conv1(x))))))))
    k, s, _ = setting.pools["res5"]
    assert torch.allclose(feats["res5"], torch.nn.AvgPool2d(k, s)(res5).flatten(1))
    f = S.normalize(feats["res5"].numpy())
    assert np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-4)


@pytest.fixture(scope="module")
def toy_voc(tmp_path_factory) -> Path:
    """The default-size toy VOC (the tiny one lacks positives of some classes in trainval)."""
    root = tmp_path_factory.mktemp("voc")
    generate(root, only="voc", seed=0)
    return root


def test_read_split_labels_from_the_per_class_files(toy_voc):
    tr = S.read_split(toy_voc / "VOC2007", "trainval")
    assert tr.ids == sorted(tr.ids) and tr.labels.shape == (len(tr.ids), 20) and len(tr.ids) == 150
    line = (toy_voc / "VOC2007/ImageSets/Main/person_trainval.txt").read_text().splitlines()[3].split()
    assert tr.labels[tr.ids.index(line[0]), S.VOC_CLASSES.index("person")] == int(line[1])
    assert set(np.unique(tr.labels)) <= {-1, 0, 1} and (tr.labels == 1).any(0).all()


def test_low_shot_samples_k_positives_and_19k_absent_negatives():
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((400, 20)) < 0.2, 1, -1).astype(np.int8)
    labels[rng.random((400, 20)) < 0.05] = 0
    d = S.low_shot_sample(labels, 4, np.random.default_rng(1))
    assert ((d == 1).sum(0) == 4).all() and ((d == -1).sum(0) == 76).all()
    assert (labels[d == 1] == 1).all() and (labels[d == -1] == -1).all()  # difficult-only images never drawn
    with pytest.raises(ValueError):
        S.low_shot_sample(labels, 96, np.random.default_rng(1))


def test_svm_low_shot_picks_the_cost_of_best_mean_and_reports_stats():
    xtr, ltr = synthetic(200, 8, 3, 0)
    xte, lte = synthetic(60, 8, 3, 1)
    out = S.svm_low_shot(xtr, ltr, xte, lte, ks=(2, 50), samples=3, costs=(0.01, 1.0), seed=0, n_jobs=1)
    assert out["skipped"] == [50]  # 50 positives and 100 negatives per class do not fit in 200 images
    r = out[2]
    assert r["min"] <= r["mean"] <= r["max"] and r["std"] >= 0 and r["cost"] in (0.01, 1.0)


@pytest.mark.slow
def test_cli_on_the_toy_voc_writes_a_record_and_reuses_its_feature_cache(toy_voc, tmp_path, capsys):
    out = tmp_path / "svm"
    assert S.main(["--ckpt", "random", "--data-root", str(toy_voc), "--out", str(out), "--workers", "0",
                   "--jobs", "1"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["kind"] == "transfer" and rec["task"] == "voc07_svm" and rec["name"] == "random"
    m = rec["metrics"]
    assert 0 < m["cls/mAP"] <= 100 and m["cls/mAP"] == m["cls/res5/mAP"]
    assert math.isclose(m["cls/mAP"], np.mean([m[f"cls/res5/AP-{c}"] for c in S.VOC_CLASSES]))
    assert rec["protocol"]["deviations"][0] == "toy scale" and rec["dataset"]["toy"] is True
    assert (out / "features.pt").is_file() and "mAP" in (out / "log.txt").read_text()
    capsys.readouterr()
    assert S.main(["--ckpt", "random", "--data-root", str(toy_voc), "--out", str(out), "--workers", "0",
                   "--jobs", "1"]) == 0
    assert "feature cache" in capsys.readouterr().out
    assert json.loads((out / "record.json").read_text())["metrics"]["cls/mAP"] == m["cls/mAP"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert S.main(["--ckpt", "random", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ImageSets/Main" in err[0]
