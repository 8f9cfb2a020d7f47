"""Linear probe: the frozen-backbone check, cached == standard arithmetic, bit-exact resume, records, CLI errors,
with and without the feature BatchNorm (``head.norm``).

Runs on the tiny toy ImageNet (10 classes x 8 train / 4 val) at 32 px with a 2-epoch schedule, so a probe takes
seconds on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from ctbench.config import to_dict
from ctbench.errors import UserError
from ctbench.records import load_record, write_record
from results.collect import results_frame
from transfer import linear
from transfer.classify.backbone import BackboneChanged, BackboneSource, resolve_ckpt
from transfer.classify.config import LinearConfig, config_differences, resolve

TINY = ["data.image_size=32", "data.workers=0", "train.epochs=2", "optim.milestones=[1]", "train.batch_size=32",
        "train.eval_batch_size=32", "optim.lr=0.1", "train.device=cpu"]


NORMS = pytest.mark.parametrize("norm", ["none", "bn"])
HEAD_KEYS = {"none": {"weight", "bias"},  # MoCo's fc, exactly as before head.norm existed
             "bn": {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "fc.weight", "fc.bias"}}


def _cfg(data, mode: str, *overrides: str) -> LinearConfig:
    return resolve(LinearConfig, "linear", "toy", None, [*TINY, *overrides],
                   fixed={"mode": mode, "data": {"path": str(data)}})


@pytest.fixture(scope="module")
def random_source() -> BackboneSource:
    return BackboneSource(None, "random")


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    """A checkpoint in our pretraining format (encoder_q.* + head + key encoder) with its pretraining record."""
    d = tmp_path_factory.mktemp("pretrain") / "moco_v2"
    torch.manual_seed(3)
    sd = torchvision.models.resnet50().state_dict()
    state = {f"encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    state.update({"encoder_q.fc.0.weight": torch.zeros(8, 2048), "encoder_k.conv1.weight": sd["conv1.weight"],
                  "queue": torch.zeros(8, 16)})
    d.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 1, "config": {"method": "moco_v2"},
                "ctbench": {"version": "0.1.0", "method": "moco_v2"}}, d / "checkpoint.pth.tar")
    write_record("pretrain", "moco_v2", d, {"loss_final": 1.0})
    return d / "checkpoint.pth.tar"


def _head(out_dir):
    return torch.load(out_dir / "checkpoint.pth.tar", map_location="cpu", weights_only=False)["state_dict"]


def test_frozen_check_trips_on_changed_weights_and_bn_statistics(random_source):
    cfg = resolve(LinearConfig, "linear", "toy", None, TINY, fixed={"mode": "standard"})
    frozen = linear.FrozenBackbone(cfg, random_source, 10, torch.device("cpu"))
    frozen.check()  # untouched: passes
    with torch.no_grad():
        frozen.model.layer3[2].conv2.weight[0, 0, 0, 0] += 1e-4
    with pytest.raises(BackboneChanged, match=r"layer3\.2\.conv2\.weight"):
        frozen.check()

    frozen = linear.FrozenBackbone(cfg, random_source, 10, torch.device("cpu"))
    frozen.model.train()  # the classic bug: BN running statistics move during "frozen" training
    with torch.no_grad():
        frozen.model(torch.randn(4, 3, 32, 32))
    with pytest.raises(BackboneChanged, match="running_mean"):
        frozen.check()


def test_standard_probe_fails_loudly_when_the_backbone_moves(toy_datasets, tmp_path, random_source, monkeypatch):
    real = linear.pooled_features

    def leaky(model, x):  # forgets eval mode: BN statistics are updated by every batch
        model.train()
        return real(model, x)

    monkeypatch.setattr(linear, "pooled_features", leaky)
    cfg = _cfg(toy_datasets / "imagenet", "standard", "train.epochs=1", "optim.milestones=[]")
    with pytest.raises(BackboneChanged):
        linear.run(cfg, random_source, tmp_path / "leaky")
    assert not (tmp_path / "leaky" / "record.json").exists()


def test_global_batch_norm_is_batchnorm1d_without_affine():
    """One process: the same outputs and running statistics as nn.BatchNorm1d(affine=False) in train and eval."""
    torch.manual_seed(0)
    ours, ref = linear.GlobalBatchNorm(16), torch.nn.BatchNorm1d(16, eps=1e-6, affine=False)
    assert list(ours.parameters()) == []
    for n in (8, 5, 2):
        x = torch.randn(n, 16) * 40 + 7  # features far from unit scale
        y = ours(x)
        assert torch.allclose(y, ref(x), atol=1e-5)
        assert torch.allclose(y.mean(0), torch.zeros(16), atol=1e-5)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, k).double(), getattr(ref, k).double(), rtol=1e-5), k
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(4, 16) * 40
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="must not require a gradient"):
        ours.train()(torch.randn(4, 16, requires_grad=True))


def test_configs_without_head_norm_are_the_none_run(toy_datasets):
    """A checkpoint written before head.norm existed resumes as head.norm=none, not as bn."""
    data = toy_datasets / "imagenet"
    old = to_dict(_cfg(data, "cached", "head.norm=none"))
    del old["head"]
    assert config_differences(old, _cfg(data, "cached", "head.norm=none")) == []
    assert config_differences(old, _cfg(data, "cached", "head.norm=bn")) == ["head.norm: 'none' -> 'bn'"]


@NORMS
def test_cached_equals_standard_without_augmentation(toy_datasets, tmp_path, our_checkpoint, norm):
    data = toy_datasets / "imagenet"
    source = resolve_ckpt(str(our_checkpoint))
    assert source.name == "moco_v2"
    m_std = linear.run(_cfg(data, "standard", "data.augment=false", f"head.norm={norm}"), source, tmp_path / "std")
    m_cached = linear.run(_cfg(data, "cached", "data.augment=false", "cache.views=0", f"head.norm={norm}"), source,
                          tmp_path / "cached")
    a, b = _head(tmp_path / "std"), _head(tmp_path / "cached")
    assert set(a) == set(b) == HEAD_KEYS[norm]
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6), k
    fc = "weight" if norm == "none" else "fc.weight"
    assert not torch.equal(a[fc], torch.zeros_like(a[fc]))
    if norm == "bn":  # 2 epochs x 3 steps (80 images, batch 32); the running statistics moved off their init
        assert int(a["norm.num_batches_tracked"]) == 6
        assert a["norm.running_mean"].abs().sum() > 0 and not torch.equal(a["norm.running_var"], torch.ones(2048))
    assert m_std["top1"] == m_cached["top1"] and m_std["top5"] == m_cached["top5"]
    assert m_std["val_images"] == 40 and m_std["train_images"] == 80

    rec = load_record(tmp_path / "cached")
    assert rec["kind"] == "linear" and rec["name"] == "moco_v2" and rec["config"]["mode"] == "cached"
    assert rec["config"]["head"] == {"norm": norm}
    suffix = "+bn" if norm == "bn" else ""  # the tables say which probe a number came from
    assert set(results_frame(tmp_path)["protocol"]) == {"standard" + suffix, "cached" + suffix}
    assert rec["inputs"][0]["kind"] == "pretrain" and rec["inputs"][0]["name"] == "moco_v2"
    assert rec["dataset"]["toy"] is True
    assert {"top1", "top5", "train_time_s", "s_per_epoch", "extract_s"} <= set(rec["metrics"])
    assert {"queue", "encoder_k.conv1.weight", "encoder_q.fc.0.weight"} <= set(rec["backbone"]["dropped"])
    lines = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and lines[0]["lr"] == pytest.approx(0.1 * 32 / 256)
    assert lines[1]["lr"] == pytest.approx(0.1 * 32 / 256 * 0.1)


@NORMS
def test_cached_resume_after_a_stop_mid_epoch_is_bit_exact(toy_datasets, tmp_path, random_source, norm):
    data = toy_datasets / "imagenet"
    over = ("train.epochs=3", "optim.milestones=[2]", "cache.views=2", f"head.norm={norm}")
    full = linear.run(_cfg(data, "cached", *over), random_source, tmp_path / "full")
    part = linear.run(_cfg(data, "cached", *over, "train.max_steps=4"), random_source, tmp_path / "resumed")
    assert not part["complete"] and part["steps"] == 4 and "top1" not in part
    resumed = linear.run(_cfg(data, "cached", *over), random_source, tmp_path / "resumed")
    assert set(_head(tmp_path / "full")) == set(_head(tmp_path / "resumed")) == HEAD_KEYS[norm]
    for k, v in _head(tmp_path / "full").items():
        assert torch.equal(v, _head(tmp_path / "resumed")[k]), k
    assert resumed["top1"] == full["top1"] and resumed["loss_final"] == full["loss_final"]
    again = linear.run(_cfg(data, "cached", *over), random_source, tmp_path / "resumed")  # finished: no work
    assert again["top1"] == full["top1"]
    with pytest.raises(UserError, match="another config"):
        linear.run(_cfg(data, "cached", "train.epochs=4", "optim.milestones=[2]", "cache.views=2",
                        f"head.norm={norm}"), random_source, tmp_path / "resumed")


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "out"))
    assert linear.main(["--ckpt", "random", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/train not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start
    assert linear.main(["--ckpt", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert linear.main(["--ckpt", "random", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err
    assert linear.main(["--ckpt", "random", "--scale", "toy", "--mode", "standard", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "mode: standard" in out and "image_size: 64" in out and "milestones:\n  - 6\n  - 8" in out
    assert "head:\n  norm: bn" in out  # the toy scale normalises the features; the full scale is MoCo's protocol
    assert linear.main(["--ckpt", "random", "--scale", "full", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "head:\n  norm: none" in out and "lr: 30.0" in out


@pytest.mark.ddp
@NORMS
def test_two_processes_train_the_same_head_as_one(toy_datasets, tmp_path, random_source, norm):
    """torchrun with 2 gloo processes: each takes half of every global batch, the loss is scaled so that DDP's
    average is the global-batch mean, the features are gathered in image order: the head matches one process.
    With head.norm=bn the features are normalised with the global batch's statistics (per-process statistics of
    16 images would give another head); both runs then train on the same cached features, as standardising
    amplifies the last-bit differences between features computed in batches of another composition."""
    import os
    import shutil
    import subprocess
    import sys

    data = toy_datasets / "imagenet"
    over = ["train.epochs=2", "optim.milestones=[1]", "cache.views=1", f"head.norm={norm}"]
    one = linear.run(_cfg(data, "cached", *over), random_source, tmp_path / "one")
    if norm == "bn":
        (tmp_path / "two").mkdir()
        shutil.copy(tmp_path / "one" / linear.FEATURES, tmp_path / "two" / linear.FEATURES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTBENCH_OUTPUT": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "transfer.linear", "--ckpt", "random", "--data", str(data), "--out", str(tmp_path / "two"), *TINY, *over]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("feature cache" in proc.stdout) == (norm == "bn")
    a, b = _head(tmp_path / "one"), _head(tmp_path / "two")
    assert set(a) == set(b) == HEAD_KEYS[norm]
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6), k
    rec = load_record(tmp_path / "two")
    assert rec["hardware"]["world_size"] == 2 and rec["metrics"]["top1"] == one["top1"]
