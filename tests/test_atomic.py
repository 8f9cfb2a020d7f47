"""Atomic outputs: a failed write leaves the previous file intact and no temp file behind."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ctbench import atomic
from ctbench.errors import UserError


def test_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"a": 2})
    assert p.read_text().strip().endswith("}")
    assert '"a": 2' in p.read_text()
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


def test_exception_mid_write_keeps_previous(tmp_path):
    p = tmp_path / "x.txt"
    atomic.write_text(p, "old")
    with pytest.raises(RuntimeError), atomic.atomic_open(p, "w") as f:
        f.write("new, half written")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("err, reason", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EACCES, "permission denied")])
def test_os_errors_become_clear_user_errors(tmp_path, monkeypatch, err, reason):
    p = tmp_path / "ckpt.pth"
    atomic.torch_save({"w": torch.ones(2)}, p)

    def failing_replace(src, dst):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(UserError, match=f"could not write .*ckpt.pth: {reason}; the previous file"):
        atomic.torch_save({"w": torch.zeros(2)}, p)
    assert torch.equal(torch.load(p)["w"], torch.ones(2))
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.pth"]


def test_clean_stale_temps(tmp_path):
    (tmp_path / ".tmp-x.json.abc").write_text("partial")
    (tmp_path / "keep.json").write_text("{}")
    assert atomic.clean_stale_temps(tmp_path) == 1
    assert [q.name for q in tmp_path.iterdir()] == ["keep.json"]
