"""The make targets on a user's real dataset root: they reach their program and never write into the root.

A root without the toy marker holding the three real layouts (ImageNet, COCO, VOC): ``make pretrain|lincls|semisup|
transfer ARGS=--help`` print their program's usage and leave the root byte-for-byte unchanged (no toy data is
generated beside or inside real data). ``make data`` on a root that holds only a real ``coco/`` refuses before it
writes anything. At the default toy root, a stage generates only the toy dataset it reads, and only when missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ctbench.toydata import MARKER

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


def tree_digest(root: Path) -> str:
    """sha256 over every path below ``root`` (directories included) and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def real_copy(toy_datasets: Path, dest: Path, parts: tuple[str, ...] = ("imagenet", "coco", "VOC2007", "VOC2012")
              ) -> Path:
    for d in parts:
        shutil.copytree(toy_datasets / d, dest / d)
    for m in dest.rglob(MARKER):
        m.unlink()
    return dest


def make(target: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS",
                                                             "DETECTRON2_DATASETS", "CTBENCH_OUTPUT")}
    return subprocess.run(["make", "-s", target, *args], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_stage_targets_reach_their_program_on_a_real_root_and_leave_it_unchanged(toy_datasets, tmp_path):
    root = real_copy(toy_datasets, tmp_path / "data")
    toy_root = tmp_path / "toy"  # the default toy location of this run: must stay absent
    before = tree_digest(root)
    env = {"DETECTRON2_DATASETS": str(root), "CTBENCH_OUTPUT": str(tmp_path / "out"), "TOY_ROOT": str(toy_root)}
    programs = {"pretrain": "python -m pretrain", "lincls": "python -m transfer.linear",
                "semisup": "python -m transfer.semisup", "transfer": "python -m transfer.detection"}
    for target, prog in programs.items():
        p = make(target, "ARGS=--help", env=env)
        assert p.returncode == 0, f"make {target}: {p.stderr[-2000:]}"
        assert f"usage: {prog}" in p.stdout, f"make {target} did not reach {prog}: {p.stdout[:500]}"
        assert "ctbench.toydata" not in p.stdout + p.stderr
    assert tree_digest(root) == before, "a make target changed the user's dataset root"
    assert not toy_root.exists(), "toy data was generated although the stages read a real root"


def test_make_data_on_a_root_with_only_real_coco_writes_nothing(toy_datasets, tmp_path):
    root = real_copy(toy_datasets, tmp_path / "data", parts=("coco",))
    before = tree_digest(root)
    p = make("data", env={"DETECTRON2_DATASETS": str(root)})
    assert p.returncode == 2, p.stdout + p.stderr
    err = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("make: ***")]
    assert len(err) == 1 and err[0].startswith("python -m ctbench.toydata: error: "), p.stderr
    assert "coco exists and is not toy data" in err[0]
    assert tree_digest(root) == before  # in particular no toy imagenet/ was written first
    assert sorted(x.name for x in root.iterdir()) == ["coco"]


def test_a_stage_at_the_default_root_generates_only_the_missing_toy_dataset_it_reads(tmp_path):
    toy_root = tmp_path / "toy"
    env = {"TOY_ROOT": str(toy_root), "CTBENCH_OUTPUT": str(tmp_path / "out")}
    p = make("lincls", "ARGS=--help", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage: python -m transfer.linear" in p.stdout
    assert sorted(x.name for x in toy_root.iterdir()) == ["imagenet"]  # not COCO / VOC: lincls reads ImageNet only
    assert (toy_root / "imagenet" / MARKER).is_file()
    digest = tree_digest(toy_root)
    p = make("semisup", "ARGS=--help", env=env)  # present: kept as it is
    assert p.returncode == 0 and "(present)" in p.stdout, p.stdout
    assert tree_digest(toy_root) == digest
