"""A killed detection rank (issue 20): detectron2's launcher has no elastic agent, so when one of its 2 gloo workers
is SIGKILLed the launcher stops the other and the command ends with one line that says how to continue;
``--resume`` then continues the trial from detectron2's last periodic checkpoint (model, optimizer, scheduler and
iteration restored) and finishes it, and the record says where it resumed."""

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

REPO = Path(__file__).resolve().parents[1]
MAX_ITER = 8


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transfer.detection", "--task", "voc_det", "--weights", "random",
            "--data-root", str(root), "--out", str(out), "--num-gpus", "2", "--save-model", "--eval-images", "4",
            *extra, "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.STEPS", "(6,)", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.REFERENCE_WORLD_SIZE", "0"]  # toy.yaml is written for 1 worker: no rescaling to 2


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _workers(pid: int) -> list[int]:
    """The launcher's spawned workers (torch.multiprocessing spawn children running ``spawn_main``), rank order."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return sorted(found)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.skipif(torch.cuda.is_available(), reason="the test runs its 2 workers on CPU with gloo")
def test_killed_rank_then_resume_finishes_the_trial(toy_detectron2, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(toy_detectron2, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        tag = out / "last_checkpoint"  # detectron2 writes it after the checkpoint file itself
        while not (tag.is_file() and tag.read_text().strip() == "model_0000003.pth"):  # every 2 iterations
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        workers = _workers(first.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 2, (stdout[-2000:], stderr[-3000:])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"error: process 1 terminated with signal SIGKILL and detectron2's launcher stopped the other "
                     r"workers; rerun the same command with --resume", lines[0]), lines[0]
    assert not (out / "record.json").exists()
    last = (out / "last_checkpoint").read_text().strip()
    at = int(re.fullmatch(r"model_(\d+)\.pth", last).group(1)) + 1  # detectron2 resumes after the saved iteration
    assert 4 <= at < MAX_ITER

    again = subprocess.run(_cmd(toy_detectron2, out, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, (again.stdout[-2000:], again.stderr[-3000:])
    log = (out / "log.txt").read_text()
    assert f"resuming at iteration {at} of {MAX_ITER} from {out / last}" in log
    assert f"Starting training from iteration {at}" in log
    rec = load_record(out / "record.json")
    assert rec["resumed_at_iter"] == at  # a record is written when a trial ends
    assert rec["metrics"]["iters"] == MAX_ITER - at
    assert rec["metrics"]["bbox/AP50"] is not None
    assert (out / "model_final.pth").is_file()
