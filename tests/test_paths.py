"""ctbench.paths: the newest *complete* pretraining run is what the evaluation targets pick without CKPT."""

from __future__ import annotations

import json
import os
import time

import pytest

from ctbench.errors import UserError
from ctbench.paths import detect_scale, newest_checkpoint, toy_marker


def run(root, name, complete: bool | None, age: float):
    d = root / name
    d.mkdir(parents=True)
    ckpt = d / "checkpoint.pth.tar"
    ckpt.write_bytes(b"x")
    if complete is not None:
        (d / "record.json").write_text(json.dumps({"name": name, "config": {"method": name},
                                                   "metrics": {"complete": complete, "epochs": 2},
                                                   "ended": "2026-12-02T00:00:00+00:00"}))
    t = time.time() - age
    os.utime(ckpt, (t, t))
    return ckpt


def test_newest_complete_run_is_picked_and_said_so(tmp_path):
    done = run(tmp_path, "moco_v2", True, 300)
    run(tmp_path, "debug", False, 200)  # a 5-step debug run: its record says complete: false
    run(tmp_path, "running", None, 100)  # no record yet
    lines = []
    assert newest_checkpoint(tmp_path, log=lines.append) == done
    assert len(lines) == 1 and str(done) in lines[0] and "moco_v2" in lines[0]
    assert "2 newer incomplete run(s) passed over" in lines[0]


def test_no_complete_run_is_a_one_line_error_naming_ckpt(tmp_path):
    run(tmp_path, "debug", False, 10)
    with pytest.raises(UserError, match="no complete pretraining run") as e:
        newest_checkpoint(tmp_path, log=None)
    assert "CKPT=" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no pretraining checkpoint found"):
        newest_checkpoint(tmp_path / "nothing", log=None)


def test_detect_scale_reads_the_marker_up_to_three_levels_up(tmp_path):
    (tmp_path / "imagenet" / "train" / "n0").mkdir(parents=True)
    assert detect_scale(tmp_path / "imagenet" / "train") == "full" and toy_marker(tmp_path / "imagenet") is None
    (tmp_path / "imagenet" / "CTBENCH_TOY.json").write_text("{}")
    assert detect_scale(tmp_path / "imagenet" / "train" / "n0") == "toy"
    assert detect_scale(tmp_path / "imagenet") == "toy"
