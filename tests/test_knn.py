"""kNN monitor: exact on separable features, weighted votes, and end to end on tiny image folders."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ctbench.checkpoints import pooled_features
from ctbench.imagefolder import eval_resize, eval_transform
from pretrain.knn import holdout_split, knn_accuracy, knn_predict, knn_top1, recalibrate_bn


def _clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=1)
    return feats, labels, centres


def test_separable_features_give_full_accuracy_and_noise_gives_chance():
    train, train_y, centres = _clusters(20, 5, 32, noise=0.05, seed=0)
    g = torch.Generator().manual_seed(1)
    val_y = torch.arange(5).repeat_interleave(8)
    val = F.normalize(centres[val_y] + 0.05 * torch.randn(len(val_y), 32, generator=g), dim=1)
    assert knn_accuracy(train, train_y, val, val_y, num_classes=5, k=20, t=0.07) == 100.0
    shuffled = train_y[torch.randperm(len(train_y), generator=g)]  # labels carry no information now
    assert knn_accuracy(train, shuffled, val, val_y, num_classes=5, k=20, t=0.07) < 60.0


def test_votes_are_exp_similarity_over_t_of_the_k_nearest():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, q, num_classes=2, k=2, t=0.5)
    # the two nearest are train[0] (s = 1, class 0) and train[1] (s = 0.8, class 1)
    assert torch.allclose(scores, torch.tensor([[torch.e ** 2, torch.e ** 1.6]]))
    # k larger than the memory is clipped, far neighbours add their (small) votes
    scores = knn_predict(train, labels, q, num_classes=2, k=10, t=0.5)
    assert torch.allclose(scores, torch.tensor([[torch.e ** 2 + torch.e ** -2, torch.e ** 1.6 + 1.0]]))


class _MeanColour(nn.Module):
    """A 'backbone' whose features are the mean RGB of the image: enough to separate flat-coloured classes."""

    def forward(self, x):
        return x.mean(dim=(2, 3))  # N x 3


def _write_folder(root, colours, n):
    for c, rgb in colours.items():
        d = root / c
        d.mkdir(parents=True)
        for i in range(n):
            jitter = tuple(min(255, v + 7 * i) for v in rgb)
            Image.new("RGB", (40, 30), jitter).save(d / f"{c}_{i}.JPEG")


def test_knn_top1_end_to_end_restores_mode_and_subsamples(tmp_path):
    colours = {"n0001": (200, 30, 30), "n0002": (30, 200, 30), "n0003": (30, 30, 200)}
    _write_folder(tmp_path / "train", colours, 5)
    _write_folder(tmp_path / "val", colours, 2)
    (tmp_path / "val" / "n0002" / "broken.JPEG").write_bytes(b"not an image")
    model = _MeanColour().train()
    acc = knn_top1(model, tmp_path / "train", tmp_path / "val", image_size=32, k=3, t=0.1, batch_size=4)
    assert acc == 100.0
    assert model.training
    # a memory of one train image predicts its class for every val image: 2 of the 6 readable ones are right
    acc1 = knn_top1(model, tmp_path / "train", tmp_path / "val", image_size=32, k=5, max_train=1, seed=3)
    assert abs(acc1 - 100 / 3) < 1e-4


def test_holdout_split_is_stratified_seeded_and_disjoint():
    targets = [0] * 10 + [1] * 5 + [2] * 1
    memory, queries = holdout_split(targets, 0.2, seed=1)
    assert sorted(memory + queries) == list(range(16)) and not set(memory) & set(queries)
    assert [sum(targets[i] == c for i in queries) for c in range(3)] == [2, 1, 1]  # round(0.2 n), at least one
    assert holdout_split(targets, 0.2, seed=1) == (memory, queries)
    assert holdout_split(targets, 0.2, seed=2) != (memory, queries)
    assert len(holdout_split([0, 0], 0.9)[0]) == 1  # a class of two keeps one image in the memory


def test_knn_top1_holdout_reads_train_only(tmp_path):
    colours = {"n0001": (200, 30, 30), "n0002": (30, 200, 30), "n0003": (30, 30, 200)}
    _write_folder(tmp_path / "train", colours, 5)
    acc = knn_top1(_MeanColour(), tmp_path / "train", tmp_path / "no-val-here", image_size=32, k=3, t=0.1,
                   holdout=0.4)
    assert acc == 100.0


def test_knn_cli_holdout_record_keeps_out_of_the_top1_column(tmp_path, capsys):
    from pretrain.knn import main

    colours = {"n0001": (200, 30, 30), "n0002": (30, 200, 30)}
    _write_folder(tmp_path / "data" / "train", colours, 4)
    assert main(["--ckpt", "random", "--data", str(tmp_path / "data"), "--image-size", "32", "--k", "3",
                 "--holdout", "0.25", "--out", str(tmp_path / "rec")]) == 0
    rec = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert set(rec["metrics"]) == {"holdout_top1"} and rec["config"]["holdout"] == 0.25
    assert rec["config"]["split_seed"] == 0  # --seed draws the random init, not the split
    assert any("held-out 0.25 of train (split seed 0)" in d for d in rec["protocol"]["deviations"])
    assert main(["--ckpt", "random", "--data", str(tmp_path / "data"), "--holdout", "1.5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--holdout must be a fraction in (0, 1), got 1.5" in capsys.readouterr().err


def test_pooled_features_skip_the_resnet_head():
    import torchvision

    m = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = pooled_features(m, x)
        assert f.shape == (2, 512)
        assert torch.allclose(m.fc(f), m(x), atol=1e-5)
    assert eval_resize(64) == 73 and eval_resize(224) == 256


def test_recalibrate_bn_sets_running_stats_to_the_train_images_and_restores_mode(tmp_path):
    colours = {"n0001": (200, 30, 30), "n0002": (30, 200, 30)}
    _write_folder(tmp_path / "train", colours, 3)
    (tmp_path / "train" / "n0001" / "broken.JPEG").write_bytes(b"not an image")
    bn = nn.BatchNorm2d(3, momentum=0.1)
    net = nn.Sequential(bn).eval()
    assert recalibrate_bn(net, tmp_path / "train", image_size=16, batch_size=16) == 6  # the unreadable one dropped
    assert not net.training and bn.momentum == 0.1
    # one batch of the 6 readable images: the running mean is their mean colour, the variance theirs (unbiased)
    t = eval_transform(16)
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "train").glob("*/*_*.JPEG"))])
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.transpose(0, 1).flatten(1).var(1), atol=1e-5)
