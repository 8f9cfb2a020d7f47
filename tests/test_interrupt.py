"""Stopping on a signal (issue 19, item 5): SIGINT (Ctrl-C, ``timeout -s INT``), SIGTERM (``kill``, a scheduler's
preemption) and SIGUSR1 (SLURM's ``--signal``) stop pretraining, the linear probe and semi-supervised fine-tuning at
the next step boundary with a checkpoint of that step, and say where it is; the rerun says "resuming at step N"
(a first run: "starting fresh: no checkpoint") and ends exactly where an uninterrupted run ends.

The victims are subprocesses (``python -m orchestrate.chaos victim --signal-at-step K``: the process sends itself the
signal while it runs step K + 1, so the stop is at a known step); one test signals the whole process group from
outside at a time it does not choose, as ``timeout -s INT`` does, with a data-loader worker in the group too.
The 2-process case (a signal to one rank only) is in tests/test_elastic.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ctbench.records import load_record
from orchestrate.chaos import CHECKPOINT, REPO, Chaos, compare_runs, run_victim, steps_in, victim_command, victim_env
from pretrain.engine import LAST_STEP

# Checkpoints only at the epoch ends (3 steps an epoch; the chaos settings write one every step), and for
# pretraining a log line every 4 steps, so a stop after step 2 or 5 keeps losses that no log line has written yet.
EXTRA = {"pretrain": ["train.log_every=4", "train.ckpt_every=0"], "linear": ["train.ckpt_every=0"], "semisup": []}


@pytest.fixture(scope="module")
def lab(toy_datasets, tmp_path_factory):
    return Chaos(tmp_path_factory.mktemp("interrupt"), toy_datasets / "imagenet")


def _args(lab: Chaos, stage: str, out):
    return lab.args(stage, out) + EXTRA[stage]


@pytest.fixture(scope="module")
def references(lab):
    """One uninterrupted run per stage, with the same arguments as the interrupted ones."""
    refs = {}
    for stage in ("pretrain", "linear", "semisup"):
        out = lab.work / f"{stage}-uninterrupted"
        p = run_victim(stage, _args(lab, stage, out))
        assert p.rc == 0, p.out[-3000:]
        refs[stage] = out
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("stage, name, at", [("pretrain", "INT", 1), ("pretrain", "TERM", 4), ("linear", "TERM", 1),
                                             ("semisup", "USR1", 0)])
def test_a_signal_writes_the_checkpoint_of_that_step_and_the_rerun_resumes_there(lab, references, stage, name, at):
    out = lab.work / f"{stage}-{name}"
    p = run_victim(stage, _args(lab, stage, out), signal_at_step=at, signal_name=name)
    stopped = at + 1  # the signal arrives during step at + 1; the run stops after it
    assert p.rc == 130, p.out[-3000:]
    assert f"starting fresh: no checkpoint in {out}" in p.out
    line = (f"interrupted by SIG{name} after step {stopped}: checkpoint written to {out / CHECKPOINT}; run the same "
            f"command again to resume at step {stopped}")
    assert line in p.out and "Traceback" not in p.out, p.out[-3000:]
    assert steps_in(out) == stopped and not (out / "record.json").exists() and not list(out.glob(".tmp-*"))
    assert line in (out / "log.txt").read_text()

    p = run_victim(stage, _args(lab, stage, out))
    assert p.rc == 0 and f"resuming at step {stopped} " in p.out, p.out[-3000:]
    assert compare_runs(references[stage], out) == []  # weights, optimizer, RNG, counters, losses, metrics lines
    metrics = load_record(out)["metrics"]
    assert (metrics["resumes"], metrics["steps_redone"], metrics["restarts"]) == (1, 0, 0)


@pytest.mark.slow
def test_sigint_to_the_process_group_as_timeout_sends_it(lab, references):
    """``timeout -s INT`` signals the whole process group: the run and its data-loader worker (PRETRAIN_ARGS:
    data.workers=1). The stop lands on whatever step boundary comes next; the checkpoint is of that step."""
    out = lab.work / "pretrain-pgrp"
    p = subprocess.Popen(victim_command("pretrain", _args(lab, "pretrain", out)), cwd=REPO, env=victim_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and p.poll() is None:
            mark = out / LAST_STEP
            if mark.is_file() and mark.read_text().strip() not in ("", "0"):
                break  # the first step is done
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        text = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, text[-3000:]
    step = steps_in(out)
    assert 1 <= step < 6 and f"interrupted by SIGINT after step {step}: checkpoint written to" in text, text[-3000:]
    assert "Traceback" not in text and "DataLoader worker" not in text
    p = run_victim("pretrain", _args(lab, "pretrain", out))
    assert p.rc == 0 and f"resuming at step {step} " in p.out, p.out[-3000:]
    assert compare_runs(references["pretrain"], out) == []


@pytest.mark.slow
def test_a_kill_counts_the_steps_the_resumed_run_redoes(lab, references):
    """SIGKILL after step 5 of 6 (last checkpoint: the epoch end at step 3): the resume says it redoes 2 steps, and
    the record and log.txt count them."""
    out = lab.work / "pretrain-killed"
    p = run_victim("pretrain", _args(lab, "pretrain", out), die_at_step=5)
    assert p.killed and steps_in(out) == 3
    p = run_victim("pretrain", _args(lab, "pretrain", out))
    assert p.rc == 0, p.out[-3000:]
    assert "resuming at step 3 " in p.out and "the 2 step(s) run after that checkpoint are done again" in p.out
    assert compare_runs(references["pretrain"], out) == []
    metrics = load_record(out)["metrics"]
    assert (metrics["resumes"], metrics["steps_redone"]) == (1, 2)
    assert "are done again" in (out / "log.txt").read_text()
