"""Adding a loss is its class, one registry line and one preset (pretrain/README.md, "Adding a loss"): a throw-away
loss (decoupled contrastive learning, Yeh et al. 2022, arXiv:2110.06848: InfoNCE without the positive in the
denominator) is written to a temporary module that registers it, a preset selects it, and ``python -m pretrain``
trains two toy steps with it. The test touches two new files and no file of the repository."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctbench.errors import UserError
from ctbench.records import load_record
from pretrain.config import resolve_config
from pretrain.losses import LOSSES

REPO = Path(__file__).resolve().parents[1]

MODULE = '''"""Decoupled contrastive learning (Yeh et al. 2022, arXiv:2110.06848), on MoCo's queue."""
from dataclasses import dataclass

import torch

from ctbench.config import check
from pretrain.losses import LOSSES, ContrastiveLoss, LossOutput, LossParams, negative_logits


@dataclass
class DCLParams(LossParams):
    pos_weight: float = 1.0  # weight of the positive term

    def validate(self) -> None:
        super().validate()
        check(self.pos_weight > 0, f"loss.pos_weight must be > 0, got {self.pos_weight}")


class DCLLoss(ContrastiveLoss):
    """-w q.k/tau + log sum_j exp(q.n_j/tau): the positive is not in the denominator."""

    Params = DCLParams

    def forward(self, q, keys, negatives):
        q, k, negatives = q.float(), keys[:, 0].float(), negatives.float()
        l_pos = (q * k).sum(dim=1) / self.hp.tau
        l_neg = negative_logits(q, negatives, self.hp.tau)
        return LossOutput((torch.logsumexp(l_neg, dim=1) - self.hp.pos_weight * l_pos).mean(),
                          {"pos_sim": (l_pos * self.hp.tau).mean().detach()})


LOSSES["dcl"] = DCLLoss
'''

PRESET = """# DCL (Yeh et al. 2022, arXiv:2110.06848) over MoCo v2's encoder, head, queue and schedule; tau 0.1.
imports: [dcl_loss]
loss:
  name: dcl
  tau: 0.1
"""

TINY = ["data.image_size=32", "data.workers=0", "train.batch_size=4", "model.bn_splits=2", "model.hidden_dim=64",
        "model.dim=16", "model.queue_size=8", "train.log_every=1", "train.max_steps=2"]


def test_a_loss_in_its_own_module_trains_through_the_cli(tmp_path, noise_folder):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "dcl_loss.py").write_text(MODULE)  # the loss and its registry line
    (plugin / "dcl.yaml").write_text(PRESET)  # the preset
    data = noise_folder(tmp_path / "data" / "train")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO)])}
    p = subprocess.run([sys.executable, "-m", "pretrain", "--method", "moco_v2", "--preset", str(plugin / "dcl.yaml"),
                        "--scale", "toy", "--data", str(data), "--out", str(out), "--name", "dcl", *TINY],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    rec = load_record(out)
    assert rec["config"]["loss"] == {"name": "dcl", "tau": 0.1, "pos_weight": 1.0}
    assert rec["config"]["imports"] == ["dcl_loss"] and rec["metrics"]["steps"] == 2
    assert {"loss.name moco -> dcl", "loss.tau 0.2 -> 0.1", "imports [] -> [dcl_loss]"} <= \
        set(rec["protocol"]["deviations"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:2]] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert "pos_sim" in rows[0]  # the loss's own terms are logged
    assert "dcl" not in LOSSES  # registered in the run's process only


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path):
    preset = tmp_path / "x.yaml"
    preset.write_text("imports: [no_such_loss_module]\nloss: {name: dcl}\n")
    with pytest.raises(UserError, match="imports: cannot import 'no_such_loss_module'.*PYTHONPATH") as e:
        resolve_config("moco_v2", "toy", preset)
    assert "\n" not in str(e.value)
