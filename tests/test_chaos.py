"""Kill -9 and resume (issue 8): a pretraining run and a linear probe SIGKILLed at a step and in the middle of a
checkpoint write resume to exactly the uninterrupted run (weights, queue, optimizer, lr, step, RNG, metrics), and
``python -m orchestrate.chaos`` prints its table and totals.

The victims are subprocesses (``python -m orchestrate.chaos victim``) so the kill is a real SIGKILL."""

from __future__ import annotations

import re

import pytest
import torch

from orchestrate import chaos
from orchestrate.chaos import CHECKPOINT, Chaos, compare_runs, run_victim, steps_in


@pytest.fixture(scope="module")
def lab(toy_datasets, tmp_path_factory):
    return Chaos(tmp_path_factory.mktemp("chaos"), toy_datasets / "imagenet")


@pytest.mark.slow
def test_pretraining_killed_at_a_step_and_mid_checkpoint_resumes_bit_exactly(lab):
    ref, _ = lab.reference("pretrain")
    out = lab.work / "killed"
    p = run_victim("pretrain", lab.args("pretrain", out), die_at_step=1)  # about to run step 2
    assert p.killed and steps_in(out) == 1
    p = run_victim("pretrain", lab.args("pretrain", out), die_in_save=3, save_mode="mid")  # at step 4 (1 + 3)
    assert p.killed and steps_in(out) == 3 and len(list(out.glob(".tmp-checkpoint.pth.tar.*"))) == 1
    torn = next(out.glob(".tmp-*"))
    with pytest.raises(Exception):  # noqa: B017 - the half-written temp file is not a checkpoint
        torch.load(torn, weights_only=False)
    p = run_victim("pretrain", lab.args("pretrain", out))
    assert p.rc == 0 and "resuming at step 3" in p.out, p.out[-2000:]
    assert compare_runs(ref, out) == []  # every tensor, optimizer state, lr, step, RNG state, metrics line
    assert not list(out.glob(".tmp-*"))
    a = torch.load(ref / CHECKPOINT, weights_only=False)
    b = torch.load(out / CHECKPOINT, weights_only=False)
    assert torch.equal(a["state_dict"]["queue"], b["state_dict"]["queue"]) and a["step"] == b["step"] == 6
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.slow
def test_linear_probe_killed_mid_checkpoint_and_mid_epoch_resumes_bit_exactly(lab):
    outcome = lab.kill_resume("linear", "linear", [{"die_in_save": 2, "save_mode": "mid"}, {"die_at_step": 2}])
    assert outcome.survived and outcome.lost_steps == 0, outcome.detail
    assert outcome.detail.count("killed") == 2 and "bit-exact" in outcome.detail


def test_compare_runs_sees_a_changed_bit(lab, tmp_path):
    """The comparison the kill tests rely on is not vacuous: one changed value, one difference."""
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "img_per_s": 3.0}) + "\n")
    state = {"w": torch.arange(4.0), "step": 3, "rng": {"torch": torch.ones(2, dtype=torch.uint8)}}
    torch.save(state, a / CHECKPOINT)
    torch.save(state, b / CHECKPOINT)
    assert compare_runs(a, b) == []
    state["w"] = torch.tensor([0.0, 1.0, 2.0, 3.0000002])
    torch.save(state, b / CHECKPOINT)
    assert compare_runs(a, b) == ["checkpoint.w"]
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5, "img_per_s": 9.0}) + "\n")
    assert compare_runs(a, b)[1] == "metrics.jsonl[0].loss (1.0 vs 1.5)"


def test_chaos_cli_prints_the_table_and_totals(toy_datasets, capsys):
    assert chaos.main(["--data", str(toy_datasets / "imagenet"), "--only", "bad c"]) == 0
    out = capsys.readouterr().out
    assert "bad config values" in out and "bad checkpoints" in out and "survived" in out
    assert re.search(r"tried 2, survived 2, data lost 0 images / 0 steps in \d+ s\n", out)  # and how long it took
    assert (chaos.duration(42.4), chaos.duration(236), chaos.duration(3725)) == ("42 s", "3 min 56 s", "1 h 02 min")
    data = ["--data", str(toy_datasets / "imagenet")]
    assert chaos.main([*data, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "kill pretrain in the middle of checkpoint write 2" in listed
    for where in ("rank 1 mid-epoch (step 5)", "rank 0 in the middle of checkpoint write 2",
                  "rank 1 in the queue all-gather (step 4)"):
        for how in ("--max-restarts 1", "no restarts"):
            assert f"ddp: kill {where}, {how}" in listed
    assert chaos.main([*data, "--only", "nothing like this"]) == 2
    assert "no scenario matches 'nothing like this'" in capsys.readouterr().err


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_rank_0_killed_mid_checkpoint_write(lab):
    """Issue 20's chaos scenario on 2 gloo processes: rank 0 dies in the middle of its 2nd checkpoint write (the
    epoch end at step 3). With --max-restarts 1 the new generation resumes at step 2 (step 3 redone) and ends
    bit-exact; without restarts rank 1 ends with one line within the process-group timeout."""
    fault = {"fault_rank": 0, "die_in_save": 2, "save_mode": "mid"}
    o = lab.ddp_kill("ddp rank 0 mid-write, restarts", 1, **fault)
    assert o.survived and o.lost_steps == 0, o.detail
    assert "resuming at step 2, 1 step(s) redone; bit-exact" in o.detail
    o = lab.ddp_kill("ddp rank 0 mid-write, no restarts", 0, **fault)
    assert o.survived and "rank 1/2: lost another process of the run" in o.detail, o.detail
