"""Elastic restarts (issue 20): under ``torchrun --max-restarts N`` a killed rank's generation is replaced by a new
one that forms the process group again and resumes from the last complete checkpoint, ending bit for bit where an
uninterrupted run ends; a signal to one rank stops every rank at the same step with one checkpoint.

- Generations: torchrun's agent keeps one TCPStore for every generation of workers; a restarted generation used to
  read the dead generation's gloo addresses there ("Gloo connectFullMesh failed ... Connection refused", or a
  connect that hangs). Four generations in a row lose rank 1 just after forming the group; the fifth must form it.
- Pretraining (the CI check of the issue): rank 1 is SIGKILLed at step 5 of 6 under ``--max-restarts 1``; the run
  completes and equals the uninterrupted 2-process run's checkpoint tensor for tensor (and its metrics lines); the
  record and log.txt say restart 1, one resume, one step redone.
- The linear probe: the same with its rank 1 killed mid-epoch.
- SIGTERM to rank 1 alone: both ranks stop after the same step, rank 0 writes its checkpoint; the rerun resumes.

This file is also the worker of the first test: ``python tests/test_elastic.py --generation KILLS``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctbench.records import load_record
from orchestrate.chaos import CHECKPOINT, REPO, compare_runs, tiny_imagenet

ARGS = ["--loss", "moco_v2", "--scale", "toy", "data.image_size=32", "data.workers=0", "train.batch_size=8",
        "model.queue_size=16", "model.hidden_dim=64", "model.dim=16", "train.epochs=2", "train.log_every=2",
        "train.device=cpu", "train.dist_timeout_s=60"]  # 24 images: 3 steps per epoch, checkpoints at 3 and 6
LINEAR = ["--ckpt", "random", "--mode", "cached", "--scale", "toy", "data.image_size=32", "data.workers=0",
          "train.epochs=2", "optim.milestones=[1]", "train.batch_size=4", "train.eval_batch_size=8", "optim.lr=0.1",
          "train.device=cpu", "cache.views=2"]  # 12 images: 3 steps per epoch, checkpoints at the epoch ends


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, restarts: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def victim(stage: str, args: list[str], restarts: int = 0, **hooks) -> subprocess.CompletedProcess:
    """A stage under torchrun with chaos hooks (``python -m orchestrate.chaos victim``); the hooks act in the first
    generation only, so a restarted generation runs clean."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in hooks.items()]
    return torchrun("-m", "orchestrate.chaos", "victim", *flags, *(["--fault-restart=0"] if hooks else []), stage, "--",
                    *args, restarts=restarts)


def _show(p: subprocess.CompletedProcess) -> str:
    return f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory, noise_folder):
    return noise_folder(tmp_path_factory.mktemp("elastic") / "train", classes=2, per_class=12)


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted 2-process pretraining run."""
    out = data.parent / "reference"
    p = victim("pretrain", ["--data", str(data), "--out", str(out), *ARGS])
    assert p.returncode == 0, _show(p)
    return out


@pytest.mark.ddp
def test_every_restarted_generation_forms_the_process_group_again():
    t0 = time.time()
    p = torchrun(str(Path(__file__).resolve()), "--generation", "4", restarts=4, timeout=240)
    assert p.returncode == 0, _show(p)
    assert "connectFullMesh" not in p.stderr and "could not form the process group" not in p.stderr
    formed = sorted(re.findall(r"generation \d+: rank \d formed the group of \d", p.stdout))  # lines may interleave
    assert formed == ["generation 4: rank 0 formed the group of 2", "generation 4: rank 1 formed the group of 2"]
    assert p.stderr.count("exitcode: -9") == 4  # rank 1 of generations 0-3, killed after forming the group
    assert time.time() - t0 < 200


@pytest.mark.slow
@pytest.mark.ddp
def test_a_killed_rank_is_survived_by_max_restarts_bit_exactly(data, reference):
    out = data.parent / "killed"
    p = victim("pretrain", ["--data", str(data), "--out", str(out), *ARGS], restarts=1, fault_rank=1,
               die_at_step=4)  # rank 1 dies as step 5 starts; the last checkpoint is the epoch end at step 3
    assert p.returncode == 0, _show(p)
    text = p.stdout + p.stderr
    lost = [line for line in text.splitlines() if line.startswith("python -m pretrain: error:")]
    assert len(lost) == 1 and "rank 0/2: lost another process of the run" in lost[0], _show(p)
    assert "torchrun restarts the workers (1 restart(s) left)" in lost[0]
    assert "pretrain/engine.py" not in p.stderr  # the survivor's one line, no traceback of ours
    line = ("resuming at step 3 (epoch 2, step 0 of 3; resumed from "
            f"{out / CHECKPOINT}): the 1 step(s) run after that checkpoint are done again [torchrun restart 1]")
    assert line in p.stdout and line in (out / "log.txt").read_text()

    assert compare_runs(reference, out) == []  # weights, queue, optimizer, RNG, counters, losses, metrics.jsonl
    a = torch.load(reference / CHECKPOINT, weights_only=False)["state_dict"]
    b = torch.load(out / CHECKPOINT, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tensor for tensor
    metrics = load_record(out)["metrics"]
    assert metrics["complete"] and metrics["steps"] == 6
    assert (metrics["restarts"], metrics["resumes"], metrics["steps_redone"]) == (1, 1, 1)


@pytest.mark.slow
@pytest.mark.ddp
def test_sigterm_to_one_rank_stops_both_at_the_same_step(data, reference):
    out = data.parent / "sigterm"
    run = ["--data", str(data), "--out", str(out), *ARGS]
    p = victim("pretrain", run, fault_rank=1, signal_at_step=1, signal_name="TERM")  # during step 2, rank 1 only
    assert p.returncode != 0, _show(p)
    assert f"interrupted by SIGTERM after step 2: checkpoint written to {out / CHECKPOINT}" in p.stdout, _show(p)
    assert p.stderr.count("interrupted\n") == 2 and "Traceback" not in p.stdout  # both ranks stopped, no error
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["progress"]["pending"]) == 0  # step 2 was a log step: nothing pending
    p = victim("pretrain", run)
    assert p.returncode == 0 and "resuming at step 2 " in p.stdout, _show(p)
    assert compare_runs(reference, out) == []


@pytest.mark.ddp
@pytest.mark.slow
def test_a_killed_linear_probe_rank_is_survived_by_max_restarts(toy_datasets, tmp_path):
    root = tiny_imagenet(toy_datasets / "imagenet", tmp_path / "imagenet")
    ref, out = tmp_path / "reference", tmp_path / "killed"
    p = victim("linear", ["--data", str(root), "--out", str(ref), *LINEAR])
    assert p.returncode == 0, _show(p)
    p = victim("linear", ["--data", str(root), "--out", str(out), *LINEAR], restarts=1, fault_rank=1,
               die_at_step=4)  # after 4 of its steps: epoch 2, step 2 of 3; the last checkpoint is at step 3
    assert p.returncode == 0, _show(p)
    assert "python -m transfer.linear: error: rank 0/2: lost another process of the run" in p.stderr, _show(p)
    assert "resuming at step 3 " in p.stdout and "[torchrun restart 1]" in p.stdout
    assert compare_runs(ref, out) == []
    metrics = load_record(out)["metrics"]
    assert (metrics["restarts"], metrics["resumes"], metrics["steps_redone"]) == (1, 1, 1)


def _generation(kills: int) -> None:
    """Form the group; in the first ``kills`` generations rank 1 then dies by SIGKILL."""
    import torch.distributed as dist

    from ctbench import distributed as D

    env = D.setup("cpu", 30)
    x = torch.ones(1)
    dist.all_reduce(x)
    generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if generation < kills and env.rank == 1:
        time.sleep(0.2)  # rank 0 is waiting in the barrier below
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    print(f"generation {generation}: rank {env.rank} formed the group of {int(x.item())}", flush=True)
    D.teardown(env)


if __name__ == "__main__" and sys.argv[1:2] == ["--generation"]:
    _generation(int(sys.argv[2]))
