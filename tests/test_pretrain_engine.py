"""The pretraining loop end to end on tiny images: outputs and the checkpoint contract, bit-exact resume mid-epoch,
non-finite loss handling, bf16 autocast on CPU, every method, and the CLI's one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torchvision

from ctbench.checkpoints import load_backbone, resnet50_from
from ctbench.errors import UserError
from ctbench.paths import detect_scale
from ctbench.records import load_record
from pretrain.__main__ import main
from pretrain.config import METHODS, resolve_config
from pretrain.engine import CHECKPOINT, Diverged, train

TINY = ["data.image_size=32", "data.workers=0", "train.batch_size=4", "model.bn_splits=2", "model.hidden_dim=64",
        "model.dim=16", "train.epochs=2", "train.log_every=1", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, noise_folder):
    return noise_folder(tmp_path_factory.mktemp("pt_engine") / "train")


def _cfg(images, method="moco_v2", extra=()):
    queue = [] if method == "simo" else ["model.queue_size=8", "model.batch_negatives=0"]
    return resolve_config(method, "toy", overrides=[*TINY, *queue, *extra], data_path=images)


def test_cli_run_on_the_toy_data_writes_checkpoint_record_and_logs(toy_datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(toy_datasets))
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path))
    args = ["--loss", "moco_v2", "data.image_size=32", "data.workers=0", "train.batch_size=8", "model.queue_size=16",
            "model.hidden_dim=64", "train.max_steps=3", "train.log_every=1"]
    assert main(args) == 0  # default data: the toy ImageNet under $DETECTRON2_DATASETS, toy scale detected
    run = tmp_path / "pretrain" / "moco_v2"
    ckpt = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert ckpt["state_dict"]["encoder_q.fc.2.weight"].shape == (128, 64)
    assert (ckpt["epoch"], ckpt["step"], ckpt["arch"]) == (0, 3, "resnet50")
    assert ckpt["ctbench"]["method"] == "moco_v2" and ckpt["config"]["scale"] == "toy"
    assert {"python", "numpy", "torch", "cuda", "data"} <= set(ckpt["rng"])
    assert ckpt["rng"]["data"]["step_in_epoch"] == 3 and "state" in ckpt["optimizer"] and "scaler" in ckpt

    record = load_record(run)
    assert record["kind"] == "pretrain" and record["name"] == "moco_v2" and record["dataset"]["toy"]
    m = record["metrics"]
    assert m["steps"] == 3 and m["skipped_images"] == 0 and not m["complete"] and m["img_per_s"] > 0
    assert {"loss_final", "loss_first_fifth", "loss_last_fifth", "loss_fell", "train_time_s"} <= set(m)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())

    backbone = load_backbone(run / CHECKPOINT)  # what every evaluation reads
    assert backbone.source == "ctbench" and any(k.startswith("encoder_q.fc.") for k in backbone.dropped)
    ref = torchvision.models.resnet50()
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(backbone.state_dict, strict=True)
    resnet50_from(backbone, num_classes=10)

    stamp = (run / CHECKPOINT).stat().st_mtime_ns
    assert main(args) == 0  # done already: nothing is retrained or rewritten
    assert (run / CHECKPOINT).stat().st_mtime_ns == stamp and "nothing to do" in capsys.readouterr().out


def test_resume_mid_epoch_is_bit_exact(images, tmp_path):
    straight = train(_cfg(images, extra=["train.max_steps=5"]), tmp_path / "a", "a").model.state_dict()
    first = train(_cfg(images, extra=["train.max_steps=2"]), tmp_path / "b", "b")
    assert first.metrics["steps"] == 2
    resumed = train(_cfg(images, extra=["train.max_steps=5"]), tmp_path / "b", "b")
    assert resumed.metrics["steps"] == 5
    for k, v in straight.items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    assert torch.equal(a["progress"]["losses"], b["progress"]["losses"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps_logged if s <= 2] == [1, 2] and steps_logged.count(3) == 2  # step 3 + epoch end


def test_resume_refuses_a_different_config(images, tmp_path):
    train(_cfg(images, extra=["train.max_steps=1"]), tmp_path, "r")
    with pytest.raises(UserError, match=r"another config \(optim.lr: 0.06 -> 0.5\)"):
        train(_cfg(images, extra=["train.max_steps=2", "optim.lr=0.5"]), tmp_path, "r")


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(images, tmp_path):
    cfg = _cfg(images, extra=["optim.lr=1e30", "train.ckpt_every=1"])
    with pytest.raises(Diverged, match=r"non-finite at step 1 \(epoch 0\).*last good checkpoint"):
        train(cfg, tmp_path, "nan")
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 1
    assert not (tmp_path / "record.json").exists()


def test_nonfinite_steps_can_be_skipped(images, tmp_path):
    result = train(_cfg(images, extra=["optim.lr=1e30", "train.nonfinite=skip", "train.max_steps=3"]), tmp_path, "s")
    assert result.metrics["skipped_steps"] == 2 and result.metrics["steps"] == 3


def test_bf16_autocast_on_cpu(images, tmp_path):
    result = train(_cfg(images, extra=["train.precision=bf16", "train.max_steps=1"]), tmp_path, "bf16")
    assert np.isfinite(result.metrics["loss_final"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("moco_v2", "jcl_official")])
def test_every_method_trains(images, tmp_path, method):
    extra = ["train.max_steps=2", "data.num_keys=2"] if method.startswith("jcl") else ["train.max_steps=2"]
    if method == "eqco":
        extra.append("model.queue_size=4")
    if method == "moco_v1":  # step schedule: its toy milestone (epoch 3) lies beyond the tests' 2 epochs
        extra.append("optim.milestones=[1]")
    result = train(_cfg(images, method, extra), tmp_path, method)
    assert result.metrics["steps"] == 2 and np.isfinite(result.metrics["loss_final"])
    if method == "simo":
        assert result.model.queue_size == 0


def test_scale_is_detected_from_the_toy_marker(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    assert detect_scale(tmp_path / "imagenet" / "train") == "full"
    (tmp_path / "imagenet" / "CTBENCH_TOY.json").write_text("{}")
    assert detect_scale(tmp_path / "imagenet" / "train") == "toy"


@pytest.mark.parametrize("argv, message", [
    (["--loss", "moco_v2", "loss.tua=1"], "python -m pretrain: error: unknown config key 'loss.tua'"),
    (["--loss", "moco_v2", "optim.lr"], "is not of the form key=value"),
    (["--loss", "moco_v2", "--data", "/nonexistent/train"], "training data not found: /nonexistent/train"),
])
def test_cli_mistakes_are_one_line_errors(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["pretrain"])
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_unknown_method_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--loss", "jlc"])
    assert e.value.code == 2 and "choose from 'moco_v1', 'moco_v2', 'jcl'" in capsys.readouterr().err


def test_knn_monitor_log_txt_kept_checkpoints_and_protocol_in_a_two_epoch_toy_run(toy_datasets, tmp_path):
    """monitor.knn_every=1: a kNN top-1 at step 0 (the initialisation, once: not again on resume) and at each of the
    2 epoch ends, in metrics.jsonl, TensorBoard and (the last) the record;
    log.txt keeps what the run printed, appended on resume; train.keep_every=1 keeps checkpoint_0000/0001 as
    MoCo's main_moco.py names them; the record carries its protocol (recipe + deviations)."""
    data = toy_datasets / "imagenet" / "train"  # 10 classes x 8 images; val/ beside it
    over = ["data.image_size=32", "data.workers=0", "train.batch_size=16", "model.queue_size=16", "model.bn_splits=2",
            "model.hidden_dim=64", "model.dim=16", "train.log_every=2", "monitor.knn_every=1", "train.keep_every=1",
            "train.epochs=2"]
    first = train(resolve_config("moco_v2", "toy", overrides=[*over, "train.max_steps=3"], data_path=data),
                  tmp_path, "knn")
    assert first.metrics["steps"] == 3 and "knn_top1" not in first.metrics  # no epoch end yet
    log_before = (tmp_path / "log.txt").read_text()
    assert "pretrain moco_v2 (toy scale)" in log_before and "stopping at step 3" in log_before
    result = train(resolve_config("moco_v2", "toy", overrides=over, data_path=data), tmp_path, "knn")
    assert result.metrics["steps"] == 10 and result.metrics["complete"]

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, -1), (5, 0), (10, 1)]
    assert "step 0 (initialisation) kNN top-1" in log_before
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)
    assert (result.metrics["knn_top1"], result.metrics["knn_epoch"]) == (knn[-1]["knn_top1"], 2)
    record = load_record(tmp_path)
    assert record["metrics"]["knn_top1"] == knn[-1]["knn_top1"]
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
    assert b"pretrain/knn_top1" in events

    log = (tmp_path / "log.txt").read_text()
    assert log.startswith(log_before) and "resuming at step 3" in log  # appended on resume
    for text in ("epoch 1/2 done", "epoch 1/2 kNN top-1", "epoch 2/2 kNN top-1", "done: loss"):
        assert text in log, text
    assert record["outputs"]["log"] == "log.txt"

    kept = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth.tar"))
    assert kept == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    k0 = torch.load(tmp_path / "checkpoint_0000.pth.tar", weights_only=False)
    k1 = torch.load(tmp_path / "checkpoint_0001.pth.tar", weights_only=False)
    last = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert (k0["epoch"], k0["step"], k1["epoch"], k1["step"]) == (1, 5, 2, 10)
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in k1["state_dict"].items())

    proto = record["protocol"]
    assert proto["recipe"].startswith("MoCo v2: facebookresearch/moco@132aea9 main_moco.py")
    assert proto["deviations"][:6] == [
        "toy scale", "1 process (recipe: 8 GPUs)", "1 process: split-BN in 2 sub-batches (queries and keys)",
        "residual branches' last BN γ 0.2 at init (recipe: torchvision's 1)", "200 -> 2 epochs", "batch 256 -> 16"]
    assert "model.queue_size 65536 -> 16" in proto["deviations"]  # lr 0.06 per 32 = the recipe's 0.03 for 16


def test_keep_every_keeps_every_nth_epoch(images, tmp_path):
    train(_cfg(images, extra=["train.keep_every=2"]), tmp_path, "keep")  # 2 epochs of 3 steps
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pth.tar")) == ["checkpoint.pth.tar",
                                                                             "checkpoint_0001.pth.tar"]


def test_the_dataset_fingerprint_is_computed_once_per_run(images, tmp_path, monkeypatch):
    import ctbench.records

    calls = []
    real = ctbench.records.fingerprint
    monkeypatch.setattr(ctbench.records, "fingerprint", lambda p, *a: calls.append(p) or real(p, *a))
    result = train(_cfg(images, extra=["train.max_steps=4", "train.ckpt_every=1"]), tmp_path, "fp")
    assert result.metrics["steps"] == 4 and len(calls) == 1
    assert load_record(tmp_path)["dataset"]["fingerprint"] == real(images)


def test_simo_warmup_steps_follow_cvpods_warmup_cosine():
    """optim.warmup_steps=10 (SelfSup SOLVER.LR_SCHEDULER WARMUP_ITERS=10): cvpods' WarmupCosineLR multiplies the
    per-iteration cosine by warmup_factor (1 - i/10) + i/10 with warmup_factor 0.001 while i < 10."""
    from pretrain.engine import learning_rate

    cfg = resolve_config("simo")
    per_epoch, total = 5004, 5004 * 200  # 1,281,167 images / 256

    def cvpods(i: int) -> float:
        factor = 0.001 * (1 - i / 10) + i / 10 if i < 10 else 1.0
        return 0.03 * factor * 0.5 * (1.0 + math.cos(math.pi * i / total))

    for i in (0, 1, 5, 9, 10, 11, 5004, total // 2, total - 1):
        assert math.isclose(learning_rate(cfg, i, per_epoch), cvpods(i), rel_tol=1e-12, abs_tol=1e-15), i
    assert learning_rate(resolve_config("moco_v2"), 0, per_epoch) == 0.03  # MoCo v2: no warm-up


def _bad_first_batch(images, tmp_path):
    """A copy of ``images`` whose first batch (4 images, one process, seed 0) is unreadable; returns the folder and
    how many steps of the 2 epochs have a batch without a readable image."""
    from ctbench.imagefolder import ImageFolder
    from pretrain.data import EpochBatchSampler

    data = tmp_path / "train"
    shutil.copytree(images, data)
    folder = ImageFolder(data)
    sampler = EpochBatchSampler(len(folder), 4, 1, 0, seed=0)
    bad = {i for i, _ in next(iter(sampler))}
    for i in bad:
        (data / folder.samples[i][0]).write_bytes(b"not a jpeg")
    all_bad = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        all_bad += sum(all(i in bad for i, _ in b) for b in sampler)
    return data, all_bad


def test_a_batch_without_readable_image_is_skipped_and_the_run_continues(images, tmp_path):
    data, all_bad = _bad_first_batch(images, tmp_path)
    cfg = resolve_config("moco_v2", "toy", overrides=[*TINY, "model.queue_size=8", "model.queue_init=random"],
                         data_path=data)
    result = train(cfg, tmp_path / "run", "skip")
    assert all_bad >= 1 and result.metrics["skipped_steps"] == all_bad and result.metrics["complete"]
    assert result.metrics["skipped_images"] == 4 * 2 and np.isfinite(result.metrics["loss_last_fifth"])
    assert "step 1: skipped by every process" in (tmp_path / "run" / "log.txt").read_text()


def test_an_epoch_without_readable_batch_is_one_error(tmp_path, noise_folder):
    data = noise_folder(tmp_path / "train")
    for f in data.rglob("*.JPEG"):
        f.write_bytes(b"")
    cfg = resolve_config("moco_v2", "toy", overrides=[*TINY, "model.queue_size=8", "model.queue_init=random"],
                         data_path=data)
    with pytest.raises(UserError, match="every step of epoch 0 had a batch with no readable image"):
        train(cfg, tmp_path / "run", "void")
    assert "error: every step of epoch 0" in (tmp_path / "run" / "log.txt").read_text()


def test_full_scale_on_the_toy_data_is_refused_unless_forced(toy_datasets, capsys):
    """`python -m pretrain --scale full` on the toy ImageNet (7 GB RSS in seconds, an ETA from toy timings) is one
    line naming the way out; --force-full runs it (here: only resolves it)."""
    from pretrain.__main__ import main

    data = str(toy_datasets / "imagenet" / "train")
    assert main(["--loss", "jcl", "--scale", "full", "--data", data, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "full scale on the embedded toy data" in err[0] and "--force-full" in err[0]
    assert main(["--loss", "jcl", "--scale", "full", "--data", data, "--print-config", "--force-full"]) == 0
    assert "scale: full" in capsys.readouterr().out
    assert main(["--loss", "jcl", "--data", data, "--print-config"]) == 0  # the default on toy data: toy scale
    assert "scale: toy" in capsys.readouterr().out


def test_method_is_the_flag_and_loss_its_alias(toy_datasets, capsys):
    from pretrain.__main__ import main

    data = str(toy_datasets / "imagenet" / "train")
    assert main(["--method", "simo", "--data", data, "--print-config"]) == 0
    by_method = capsys.readouterr().out
    assert main(["--loss", "simo", "--data", data, "--print-config"]) == 0
    assert capsys.readouterr().out == by_method and "method: simo" in by_method and "name: eqco" in by_method
