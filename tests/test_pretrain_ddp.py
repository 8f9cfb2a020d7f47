"""DDP pretraining on CPU: ``torchrun --nproc_per_node 2`` (gloo) runs a few JCL steps with shuffle-BN across the
ranks; afterwards both ranks hold identical parameters, queues and pointers, and exactly one checkpoint exists.

This file is also the worker torchrun starts: ``python tests/test_pretrain_ddp.py OUT DATA`` trains, then every
rank saves its own model state to ``OUT/rank<r>.pt`` for the test to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.image_size=32", "data.workers=0", "train.batch_size=8", "model.queue_size=16",
             "model.hidden_dim=64", "model.dim=16", "data.num_keys=2", "train.epochs=2", "train.max_steps=4",
             "train.log_every=2"]


def _worker(out: Path, data: Path) -> None:
    from pretrain.config import resolve_config
    from pretrain.engine import train

    result = train(resolve_config("jcl", "toy", overrides=OVERRIDES, data_path=data), out, "ddp")
    rank = int(os.environ["RANK"])
    torch.save({"state_dict": result.model.state_dict(), "world": int(os.environ["WORLD_SIZE"]),
                "metrics": result.metrics}, out / f"rank{rank}.pt")


@pytest.mark.ddp
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    from PIL import Image

    data = tmp_path / "train"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"n0{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"n0{c}" / f"{i}.JPEG")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(out), str(data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
