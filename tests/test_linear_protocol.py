"""Linear probe protocol: the default mode per scale, MoCo's best_acc1 reporting, the SelfSup preset, the record's
``protocol`` entry, log.txt, kept checkpoints, the dataset listed once (by rank 0), and two processes staying in
lockstep when one rank's whole batch is unreadable.

Runs on the tiny toy ImageNet (10 classes x 8 train / 4 val), or a marker-less copy of it (full scale), at 32 px.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ctbench.records
from ctbench.paths import detect_scale
from ctbench.records import TOY_MARKER, load_record
from transfer import linear
from transfer.classify import engine
from transfer.classify.backbone import BackboneSource
from transfer.classify.config import LinearConfig, resolve
from transfer.classify.data import epoch_permutation
from transfer.classify.protocol import linear_protocol

TINY = ["data.image_size=32", "data.workers=0", "train.epochs=2", "optim.milestones=[1]", "train.batch_size=32",
        "train.eval_batch_size=32", "optim.lr=0.1", "train.device=cpu"]


@pytest.fixture()
def real_root(toy_datasets, tmp_path) -> Path:
    """The tiny toy ImageNet copied into a real-layout root without the toy marker (full scale)."""
    root = tmp_path / "real" / "imagenet"
    shutil.copytree(toy_datasets / "imagenet", root)
    (root / TOY_MARKER).unlink(missing_ok=True)
    assert detect_scale(root) == "full"
    return root


def _print_config(capsys, *args: str) -> str:
    assert linear.main(["--ckpt", "random", *args, "--print-config"]) == 0
    return capsys.readouterr().out


def test_default_mode_is_standard_at_full_scale_and_cached_at_toy_scale(real_root, toy_datasets, capsys):
    out = _print_config(capsys, "--data", str(real_root))
    assert "scale: full" in out and "mode: standard" in out and "recipe: moco" in out
    assert "eval_every: 1" in out and "epochs: 100" in out and "lr: 30.0" in out  # main_lincls: validate each epoch
    out = _print_config(capsys, "--data", str(real_root), "--mode", "cached")
    assert "mode: cached" in out  # the fast mode, by name
    out = _print_config(capsys, "--data", str(toy_datasets / "imagenet"))
    assert "scale: toy" in out and "mode: cached" in out
    out = _print_config(capsys, "--data", str(toy_datasets / "imagenet"), "mode=standard")
    assert "mode: standard" in out


def test_a_default_run_on_a_real_layout_root_is_standard_and_reports_best_acc1(real_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "outputs"))
    out = tmp_path / "run"
    assert linear.main(["--ckpt", "random", "--data", str(real_root), "--out", str(out), *TINY]) == 0
    rec = load_record(out)
    assert rec["config"]["mode"] == "standard" and rec["config"]["scale"] == "full"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("top1" in r, "top5" in r) for r in rows] == [(True, True)] * 2  # evaluated every epoch
    m = rec["metrics"]
    best = max(r["top1"] for r in rows)
    assert m["best_acc1"] == best and m["best_epoch"] == 1 + [r["top1"] for r in rows].index(best)
    assert m["top1"] == rows[-1]["top1"] and m["top5"] == rows[-1]["top5"]
    assert rec["protocol"]["recipe"].startswith("MoCo linear classification: facebookresearch/moco@132aea9")
    assert rec["protocol"]["deviations"] == ["1 process (recipe: 8 GPUs)", "100 -> 2 epochs",
                                             "milestones [60, 80] -> [1]", "batch 256 -> 32", "lr 30 -> 0.0125",
                                             "data.image_size 224 -> 32"]
    assert (out / "log.txt").is_file() and rec["outputs"]["log"] == "log.txt"
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].endswith(")") and "] $ " in log[0]  # the command, then what the run printed, with times
    assert any("linear/standard: epoch 2/2" in ln and "val top-1" in ln for ln in log)
    assert log[-1].split("] ", 1)[1].startswith("done: top-1")


def test_best_of_keeps_the_first_epoch_that_reached_the_best():
    history = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "top1": 20.0}, {"epoch": 2, "top1": 30.0},
               {"epoch": 3, "top1": 30.0}, {"epoch": 4, "top1": 25.0}]
    assert engine.best_of(history) == {"best_acc1": 30.0, "best_epoch": 3}
    assert engine.best_of([{"epoch": 0}]) == {}


def test_selfsup_preset_is_simos_linear_evaluation(capsys, real_root):
    cfg = resolve(LinearConfig, "linear_selfsup", "full")
    assert cfg.recipe == "selfsup" and cfg.mode == "standard" and cfg.head.norm == "none"
    assert (cfg.train.epochs, cfg.optim.milestones, cfg.optim.gamma, cfg.optim.lr, cfg.optim.lr_batch) == \
        (90, [60, 80], 0.1, 30.0, 256)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.train.batch_size, cfg.train.eval_every) == \
        (0.9, 0.0, 256, 10)
    assert (cfg.data.image_size, tuple(cfg.data.crop_scale), cfg.data.augment) == (224, (0.08, 1.0), True)
    p = linear_protocol(cfg, world_size=8, precision="fp32", complete=True, steps=1, total=1)
    assert p["deviations"] == [] and "V2AI/SelfSup@29f7d33 examples/simo/" in p["recipe"]
    assert "reports the last top-1" in p["recipe"]
    out = _print_config(capsys, "--data", str(real_root), "--recipe", "selfsup")
    assert "recipe: selfsup" in out and "epochs: 90" in out and "eval_every: 10" in out
    toy = resolve(LinearConfig, "linear_selfsup", "toy")
    assert (toy.mode, toy.train.epochs, toy.optim.milestones, toy.head.norm) == ("cached", 9, [6, 8], "bn")


def test_linear_protocol_deviations():
    moco = resolve(LinearConfig, "linear", "full")
    done = {"complete": True, "steps": 1, "total": 1}
    assert linear_protocol(moco, world_size=8, precision="fp32", **done)["deviations"] == []
    cached = resolve(LinearConfig, "linear", "full", overrides=["mode=cached", "cache.views=10"])
    assert linear_protocol(cached, world_size=1, precision="bf16", **done)["deviations"] == [
        "bf16 autocast", "1 process (recipe: 8 GPUs)", "cached features: 10 views, float16"]
    centre = resolve(LinearConfig, "linear", "full", overrides=["mode=cached", "cache.dtype=float32",
                                                                "head.norm=bn", "optim.lr=0.1"])
    assert linear_protocol(centre, world_size=8, precision="fp32", **done)["deviations"] == [
        "cached features: centre crop", "+bn head", "lr 30 -> 0.1"]
    toy = resolve(LinearConfig, "linear", "toy")
    assert linear_protocol(toy, world_size=1, precision="fp32", complete=False, steps=7, total=40)["deviations"] == [
        "toy scale", "1 process (recipe: 8 GPUs)", "cached features: centre crop", "+bn head", "100 -> 10 epochs",
        "milestones [60, 80] -> [6, 8]", "stopped at step 7 of 40", "lr 30 -> 0.01", "data.image_size 224 -> 64"]
    # trials differ only in the seed (and paths, devices, logging): equal deviations
    a = resolve(LinearConfig, "linear", "toy", overrides=["train.seed=1", "data.workers=0", "train.keep_every=2"])
    assert linear_protocol(a, world_size=1, precision="fp32", **done) == \
        linear_protocol(resolve(LinearConfig, "linear", "toy"), world_size=1, precision="fp32", **done)


def test_kept_checkpoints_and_log_appended_on_resume(toy_datasets, tmp_path):
    cfg = resolve(LinearConfig, "linear", "toy", None, [*TINY, "train.epochs=3", "optim.milestones=[2]",
                                                        "train.keep_every=2"],
                  fixed={"mode": "cached", "data": {"path": str(toy_datasets / "imagenet")}})
    out = tmp_path / "run"
    stopped = resolve(LinearConfig, "linear", "toy", None, [*TINY, "train.epochs=3", "optim.milestones=[2]",
                                                            "train.keep_every=2", "train.max_steps=2"],
                      fixed={"mode": "cached", "data": {"path": str(toy_datasets / "imagenet")}})
    m = linear.run(stopped, BackboneSource(None, "random"), out)
    assert not m["complete"] and "top1" not in m and load_record(out)["protocol"]["deviations"][-1] == \
        "data.image_size 224 -> 32" and "stopped at step 2 of 9" in load_record(out)["protocol"]["deviations"]
    m = linear.run(cfg, BackboneSource(None, "random"), out)
    assert m["complete"]
    assert sorted(p.name for p in out.glob("checkpoint_*")) == ["checkpoint_0001.pth.tar"]  # epoch 2 of 3 (0-based 1)
    kept = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=False)
    assert kept["epoch"] == 2
    log = (out / "log.txt").read_text()
    assert log.count("] $ ") == 2 and "resumed from" in log  # appended, not rewritten
    assert linear.run(cfg, BackboneSource(None, "random"), out)["top1"] == m["top1"]  # finished: nothing to do
    log = (out / "log.txt").read_text()
    assert log.count("] $ ") == 3 and log.rstrip().endswith("(--fresh to redo)")


def test_the_dataset_is_listed_once_per_run(toy_datasets, tmp_path, monkeypatch):
    """One fingerprint of the data root per cached run (the record's; the feature cache's key reuses it)."""
    calls: list[str] = []
    real = ctbench.records.fingerprint

    def counting(p, *args):
        if Path(p).is_dir():
            calls.append(str(p))
        return real(p, *args)

    monkeypatch.setattr(ctbench.records, "fingerprint", counting)
    monkeypatch.setattr(linear, "fingerprint", counting, raising=False)  # the name the probe used before
    cfg = resolve(LinearConfig, "linear", "toy", None, TINY,
                  fixed={"mode": "cached", "data": {"path": str(toy_datasets / "imagenet")}})
    linear.run(cfg, BackboneSource(None, "random"), tmp_path / "run")
    assert calls == [str(toy_datasets / "imagenet")]
    calls.clear()
    linear.run(cfg, BackboneSource(None, "random"), tmp_path / "run", fresh=True)  # same key: the cache is reused
    assert calls == [str(toy_datasets / "imagenet")]


WRAPPER = """
import json, os, sys
from pathlib import Path
import ctbench.records as R
calls = []
real = R.fingerprint
def counting(p, *args):
    if Path(p).is_dir():
        calls.append(str(p))
    return real(p, *args)
R.fingerprint = counting
import importlib
stage = importlib.import_module(sys.argv[1])
try:
    code = stage.main(sys.argv[2:])
finally:
    Path(os.environ["CALLS"], "rank%s.json" % os.environ["RANK"]).write_text(json.dumps(calls))
sys.exit(code)
"""


@pytest.mark.ddp
@pytest.mark.parametrize("stage", ["transfer.linear", "transfer.semisup"])
def test_a_rank_whose_whole_batch_is_unreadable_keeps_step_with_the_other(real_root, tmp_path, stage):
    """2 gloo processes: every image rank 1 gets in the first step is corrupt (linear probe: batch 32 of the 80
    images; fine-tuning: one step of 20 labelled images). Both ranks take the step together (rank 1 with an empty
    batch), the run ends in seconds (not after the process group's 30-minute timeout), counts the bad images, and
    only rank 0 lists the dataset."""
    from ctbench.imagefolder import ImageFolder

    train = real_root / "train"
    args = ["--ckpt", "random", "--data", str(real_root), "--out", str(tmp_path / "run")]
    over = [*TINY, "train.epochs=1", "optim.milestones=[]", "train.eval_batch_size=20"]
    if stage == "transfer.linear":
        samples = [rel for rel, _ in ImageFolder(train).samples]
        batch = 32
        args += ["--mode", "standard", *over]
    else:  # a 10 % list of 20 images (25 % of the 80), all in one step
        samples = [rel for rel, _ in ImageFolder(train).samples][::4]
        batch = 20
        (tmp_path / "list.txt").write_text("".join(rel.split("/")[1] + "\n" for rel in samples))
        args += ["--pct", "10", "--subset", str(tmp_path / "list.txt"), *over, f"train.batch_size={batch}"]
    perm = epoch_permutation(len(samples), 0, 0)
    bad = [samples[int(perm[pos])] for pos in range(1, batch, 2)]  # process 1 of 2 takes positions 1, 3, ...
    for rel in bad:
        (train / rel).write_bytes(b"not a jpeg")
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    (tmp_path / "calls").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTBENCH_OUTPUT": str(tmp_path / "outputs"),
           "CALLS": str(tmp_path / "calls"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           stage, *args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - t0 < 240
    rec = load_record(tmp_path / "run")
    assert rec["hardware"]["world_size"] == 2 and rec["metrics"]["complete"]
    assert rec["metrics"]["unreadable_train_images"] == len(bad) == batch // 2
    assert "2 processes (recipe: " in " ".join(rec["protocol"]["deviations"])
    calls = {r: json.loads((tmp_path / "calls" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert calls == {0: [str(real_root)], 1: []}


@pytest.mark.ddp
def test_a_user_error_found_by_rank_0_stops_every_rank(real_root, tmp_path):
    """The subset is checked by rank 0 only; its one-line error reaches rank 1 too, at once (no rank waits)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTBENCH_OUTPUT": str(tmp_path / "outputs")}
    fixture = Path(__file__).parent / "fixtures" / "semisup" / "subset_simclr_format.txt"  # 26 %: not 1 %
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "transfer.semisup", "--pct", "1", "--ckpt", "random", "--data", str(real_root), "--subset", str(fixture),
           "--out", str(tmp_path / "run"), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("not 1 %") == 2, proc.stderr[-3000:]  # one line from each rank
    assert not (tmp_path / "run" / "record.json").exists()
