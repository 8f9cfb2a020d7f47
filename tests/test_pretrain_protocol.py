"""The pretraining record's ``protocol`` entry (pretrain.protocol): the method's recipe with its source, and the
ordered, stable list of how a run departs from it (empty = exactly the published recipe)."""

from __future__ import annotations

import pytest

from pretrain.config import METHODS, resolve_config
from pretrain.engine import resolve_bn
from pretrain.protocol import protocol, recipe


def _protocol(method, scale="full", world=8, precision="fp32", overrides=(), stop_at=None):
    cfg = resolve_config(method, scale, overrides=list(overrides))
    shuffle, splits = resolve_bn(cfg, world)
    total = cfg.train.epochs * 100
    return protocol(cfg, world_size=world, shuffle_bn=shuffle, bn_splits=splits, precision=precision,
                    stop_at=stop_at or total, total_steps=total)


@pytest.mark.parametrize("method", METHODS)
def test_the_full_preset_on_8_processes_in_fp32_is_exactly_the_recipe(method):
    p = _protocol(method)
    assert p == {"recipe": recipe(method).text, "deviations": []}
    assert "github.com" in p["recipe"] or "@" in p["recipe"] or "arXiv" in p["recipe"]


def test_one_process_bf16_moco_v2_names_precision_world_and_split_bn_of_queries_and_keys():
    assert _protocol("moco_v2", world=1, precision="bf16")["deviations"] == [
        "bf16 autocast", "1 process (recipe: 8 GPUs)", "1 process: split-BN in 8 sub-batches (queries and keys)"]


def test_simo_on_one_process_is_global_bn_so_only_the_world_size_differs():
    assert _protocol("simo", world=1)["deviations"] == ["1 process (recipe: 8 GPUs)"]
    assert _protocol("simo", world=2, overrides=["model.sync_bn=false"])["deviations"] == [
        "2 processes (recipe: 8 GPUs)", "per-process BN over 128 images (recipe: global BN)"]
    assert _protocol("simo", world=1, overrides=["model.zero_init_residual=false"])["deviations"] == [
        "1 process (recipe: 8 GPUs)", "no zero-init residuals (recipe: zero-init)"]


def test_toy_scale_comes_first_and_names_every_change():
    d = _protocol("simo", "toy", world=1)["deviations"]
    assert d[:6] == ["toy scale", "1 process (recipe: 8 GPUs)",
                     "residual branches' last BN γ 0.2 at init (recipe: zero-init)", "200 -> 32 epochs",
                     "batch 256 -> 64", "lr 0.03 -> 0.12"]  # 0.06 per 32 at toy scale, for the batch of 64
    assert {"data.image_size 224 -> 32", "loss.ref_negatives 256 -> 64", "model.momentum 0.999 -> 0.9",
            "optim.warmup_epochs 0 -> 1", "optim.warmup_steps 10 -> 0"} <= set(d)
    moco = _protocol("moco_v2", "toy", world=1)["deviations"]
    assert moco[:5] == ["toy scale", "1 process (recipe: 8 GPUs)",
                        "1 process: split-BN in 4 sub-batches (queries and keys)",
                        "residual branches' last BN γ 0.2 at init (recipe: torchvision's 1)", "200 -> 32 epochs"]
    assert "model.queue_size 65536 -> 0" in moco  # in-batch negatives
    eqco = _protocol("eqco", "toy", world=1)["deviations"]
    assert {"model.queue_size 256 -> 0", "model.batch_negatives 0 -> 16", "loss.ref_negatives 65536 -> 63"} <= set(eqco)


def test_batch_lr_schedule_and_hyperparameter_changes_are_named():
    d = _protocol("moco_v2", overrides=["train.batch_size=512", "loss.tau=0.1", "train.epochs=100"],
                  stop_at=30)["deviations"]
    assert d == ["per-process BN over 64 images (recipe: 32)", "200 -> 100 epochs", "stopped at step 30 of 10000",
                 "batch 256 -> 512", "lr 0.03 -> 0.06", "loss.tau 0.2 -> 0.1"]
    assert _protocol("moco_v2", world=1, overrides=["model.shuffle_bn='off'"])["deviations"][1:] == [
        "BN over 256 images, no shuffle (recipe: per-GPU BN over 32 + shuffle-BN)"]
    assert _protocol("jcl_official", overrides=["optim.lr=0.06"])["deviations"] == ["lr 0.03 -> 0.06"]
    # the paper's lr for its batch, linearly scaled to the script's batch, is the script's lr: no deviation
    assert _protocol("jcl_official", overrides=["optim.lr=0.06", "optim.lr_batch=512"])["deviations"] == []


def test_trials_of_one_protocol_have_equal_entries():
    """Seeds, paths, devices and logging are not protocol."""
    a = _protocol("moco_v2", "toy", world=1)
    same = ["train.seed=3", "data.path=/elsewhere", "data.workers=4", "train.log_every=1", "train.device=cpu",
            "monitor.knn_every=1", "train.keep_every=5"]
    b = _protocol("moco_v2", "toy", world=1, overrides=same)
    assert a == b


def test_a_residual_gamma_between_zero_and_one_is_named_against_the_recipes_init():
    assert _protocol("moco_v2", overrides=["model.residual_gamma=0.2"])["deviations"] == [
        "residual branches' last BN γ 0.2 at init (recipe: torchvision's 1)"]
    assert _protocol("simo", world=8, overrides=["model.residual_gamma=0.5"])["deviations"] == [
        "residual branches' last BN γ 0.5 at init (recipe: zero-init)"]
    # the same init spelt either way is no deviation; γ 0 on MoCo is the zero-init wording
    assert _protocol("moco_v2", overrides=["model.residual_gamma=1"])["deviations"] == []
    assert _protocol("moco_v2", overrides=["model.residual_gamma=0"])["deviations"] == [
        "zero-init residuals (recipe: none)"]
