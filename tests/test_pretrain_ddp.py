"""DDP pretraining on CPU (``torchrun --nproc_per_node 2``, gloo).

- JCL with shuffle-BN across the ranks: afterwards both ranks hold identical parameters, queues and pointers, exactly
  one checkpoint exists, and only rank 0 computed the dataset fingerprint.
- SiMo with global BN: 2 steps on 2 processes give the parameters of 2 steps on one process over the same global
  batches (global BN = BN over the whole batch; negatives = the other keys of the global batch).
- A rank whose whole batch is unreadable does not stop alone: both ranks skip that step and finish (with the kNN
  monitor evaluated rank-sharded at both epoch ends), or, when a whole epoch has no readable batch on one rank, both
  stop with the same one-line error within seconds, not after ``train.dist_timeout_s``.

This file is also the worker torchrun starts: ``python tests/test_pretrain_ddp.py OUT DATA METHOD [key=value ...]``
trains, then every rank saves its model state, metrics and its number of fingerprint computations to
``OUT/rank<r>.pt``; ``python tests/test_pretrain_ddp.py --cli ARGS...`` runs ``python -m pretrain ARGS``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.image_size=32", "data.workers=0", "train.batch_size=8", "model.queue_size=16",
             "model.hidden_dim=64", "model.dim=16", "data.num_keys=2", "train.epochs=2", "train.max_steps=4",
             "train.log_every=2"]
SIMO = ["data.image_size=32", "data.workers=0", "train.batch_size=8", "model.hidden_dim=64", "model.dim=16",
        "train.epochs=2", "train.max_steps=2", "train.log_every=1", "optim.warmup_steps=0"]
BAD = ["data.image_size=32", "data.workers=0", "train.batch_size=8", "model.queue_size=16", "model.queue_init=random",
       "model.hidden_dim=64", "model.dim=16", "train.epochs=2", "train.log_every=1", "train.dist_timeout_s=300"]


def _worker(out: Path, data: Path, method: str, overrides: list[str]) -> None:
    import ctbench.records
    from pretrain.config import resolve_config
    from pretrain.engine import train

    calls = []
    real = ctbench.records.fingerprint
    ctbench.records.fingerprint = lambda p, *a: calls.append(p) or real(p, *a)
    result = train(resolve_config(method, "toy", overrides=overrides, data_path=data), out, "ddp")
    rank = int(os.environ["RANK"])
    torch.save({"state_dict": result.model.state_dict(), "world": int(os.environ["WORLD_SIZE"]),
                "metrics": result.metrics, "fingerprints": len(calls)}, out / f"rank{rank}.pt")


def _images(root: Path, classes: int = 2, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"n0{c}" / f"{i}.JPEG")
    return root


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ddp
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    data = _images(tmp_path / "train")
    out = tmp_path / "run"
    proc = _torchrun(str(out), str(data), "jcl", *OVERRIDES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["metrics"]["steps"] == 4
    s0, s1 = r0["state_dict"], r1["state_dict"]
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert s0["queue_ptr"].item() == 4 * 8 % 16  # 4 steps of a global batch of 8, queue of 16
    assert not torch.equal(s0["encoder_q.conv1.weight"], s0["encoder_k.conv1.weight"])  # it trained

    ckpts = sorted(p.name for p in out.rglob("*.pth.tar"))
    assert ckpts == ["checkpoint.pth.tar"]
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["rng"]["data"]["world_size"] == 2
    assert torch.equal(ckpt["state_dict"]["queue"], s0["queue"])
    assert (out / "record.json").is_file()
    assert (r0["fingerprints"], r1["fingerprints"]) == (1, 0)  # rank 0 alone stats the dataset, once
    deviations = __import__("json").loads((out / "record.json").read_text())["protocol"]["deviations"]
    assert deviations[:2] == ["toy scale", "2 processes (recipe: 8 GPUs)"]
    assert "per-process BN over 4 images (recipe: 64)" in deviations  # JCL's paper batch 512 on 8 GPUs


@pytest.mark.ddp
def test_simo_on_two_processes_equals_one_process_over_the_global_batch(tmp_path):
    from pretrain.config import resolve_config
    from pretrain.engine import build_model, train

    data = _images(tmp_path / "train")
    proc = _torchrun(str(tmp_path / "two"), str(data), "simo", *SIMO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "rank0.pt", weights_only=False)["state_dict"]
    cfg = resolve_config("simo", "toy", overrides=SIMO, data_path=data)
    one = train(cfg, tmp_path / "one", "one").model.state_dict()
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, 1).state_dict()
    names = [k for k in one if k.startswith("encoder_q.") and one[k].is_floating_point()]
    moved = torch.cat([(one[k] - init[k]).flatten() for k in names]).norm()
    gap = torch.cat([(two[k] - one[k]).flatten() for k in names]).norm()
    assert moved > 0 and gap < 1e-3 * moved, (float(gap), float(moved))


def _unreadable_for_rank1(data: Path, epochs: int) -> tuple[int, int]:
    """Make rank 1's batch of the first step (2 ranks, 4 images each, seed 0) unreadable, or every rank-1 batch of
    epoch 0 when ``epochs`` is 0; returns (steps with an all-unreadable batch on some rank over 2 epochs, files)."""
    from ctbench.imagefolder import ImageFolder
    from pretrain.data import EpochBatchSampler

    folder = ImageFolder(data)
    samplers = [EpochBatchSampler(len(folder), 4, 2, r, seed=0) for r in range(2)]
    bad = {i for b in (list(samplers[1]) if epochs == 0 else [next(iter(samplers[1]))]) for i, _ in b}
    for i in bad:
        (data / folder.samples[i][0]).write_bytes(b"not a jpeg")
    skipped = 0
    for epoch in range(2):
        for s in samplers:
            s.set_epoch(epoch)
        skipped += sum(any(all(i in bad for i, _ in b) for b in batches) for batches in zip(*samplers))
    return skipped, len(bad)


@pytest.mark.ddp
def test_a_rank_with_an_unreadable_batch_does_not_stop_alone(tmp_path):
    data = _images(tmp_path / "imagenet" / "train")
    shutil.copytree(data, tmp_path / "imagenet" / "val")  # for the kNN monitor
    skipped, n_bad = _unreadable_for_rank1(data, 1)
    t0 = time.time()
    proc = _torchrun(str(tmp_path / "run"), str(data), "moco_v2", *BAD, "monitor.knn_every=1", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 200  # not the 300 s process-group timeout
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert skipped >= 1 and r0["metrics"]["skipped_steps"] == r1["metrics"]["skipped_steps"] == skipped
    assert r0["metrics"]["complete"] and r0["metrics"]["skipped_images"] == n_bad * 2
    for k in r0["state_dict"]:
        assert torch.equal(r0["state_dict"][k], r1["state_dict"][k]), k
    # the kNN monitor ran at both epoch ends with every rank encoding its share: the same value on both ranks
    assert r0["metrics"]["knn_top1"] == r1["metrics"]["knn_top1"] and r0["metrics"]["knn_epoch"] == 2
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "skipped by every process" in log and log.count("kNN top-1") == 3  # step 0 + 2 epoch ends

    void = _images(tmp_path / "void" / "train")
    _unreadable_for_rank1(void, 0)  # rank 1 has no readable batch in epoch 0; rank 0 has only good ones
    t0 = time.time()
    proc = _torchrun("--cli", "--loss", "moco_v2", "--scale", "toy", "--data", str(void), "--out",
                     str(tmp_path / "void_run"), *BAD, timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 200
    errors = [line for line in proc.stderr.splitlines() if line.startswith("python -m pretrain: error:")]
    assert len(errors) == 2 and all("every step of epoch 0 had a batch with no readable image" in e for e in errors)
    assert "pretrain/engine.py" not in proc.stderr  # no worker traceback (torchrun still reports the exit codes)


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        from pretrain.__main__ import main

        sys.exit(main(sys.argv[2:]))
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
