"""Pretraining presets and config: every method resolves at both scales with its source named, the paper values are
where the presets say, and bad values are one-line errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from ctbench.config import to_dict
from ctbench.errors import UserError
from pretrain.config import METHODS, PRESETS_DIR, config_differences, resolve_config
from pretrain.losses import LOSSES, loss_params
from pretrain.model import effective_residual_gamma


@pytest.mark.parametrize("scale", ["full", "toy"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_resolves_at_both_scales(method, scale):
    cfg = resolve_config(method, scale)
    assert cfg.method == method and cfg.scale == scale
    assert cfg.loss.name in LOSSES
    if cfg.model.queue_size:
        assert cfg.model.queue_size % cfg.train.batch_size == 0
    if scale == "toy":  # 32 px, batch 64, in-batch negatives (pretrain/presets/toy.yaml)
        assert (cfg.data.image_size, cfg.train.batch_size, cfg.model.queue_size) == (32, 64, 0)


@pytest.mark.parametrize("method", METHODS)
def test_every_preset_names_its_source(method):
    text = (PRESETS_DIR / f"{method}.yaml").read_text()
    assert text.startswith("#") and ("arXiv" in text or "github.com" in text or "_base_" in text)
    assert yaml.safe_load(text)["recipe"]["text"]  # its own recipe (the record's protocol), not its base's


def test_paper_values():
    v2 = resolve_config("moco_v2")
    assert (v2.loss.tau, v2.model.queue_size, v2.model.momentum, v2.model.head) == (0.2, 65536, 0.999, "mlp")
    assert (v2.optim.lr, v2.optim.lr_batch, v2.train.batch_size, v2.train.epochs) == (0.03, 256, 256, 200)
    assert v2.data.augmentation == "moco_v2" and v2.data.crop_scale == (0.2, 1.0)
    v1 = resolve_config("moco_v1")
    assert (v1.loss.tau, v1.model.head, v1.optim.schedule, v1.optim.milestones) == (0.07, "linear", "step", [0.6, 0.8])
    jcl = resolve_config("jcl")
    assert (jcl.data.num_keys, jcl.loss.lam, jcl.loss.tau) == (5, 4.0, 0.2)
    assert (jcl.train.batch_size, jcl.optim.lr, jcl.optim.lr_batch) == (512, 0.06, 512)
    off = resolve_config("jcl_official")
    assert (off.data.num_keys, off.loss.lam, off.loss.lam_ramp) == (4, 2.0, True)
    assert (jcl.loss.tau_power, off.loss.tau_power) == (2, 1)  # the paper's λ/(2τ²), the code's λ/(2τ)
    # caiqi/Joint-Contrastive-Learning@1cefabb scripts/main_pretrain.sh: --batch-size 256 --lr 0.03 (was 512 / 0.06)
    assert (off.train.batch_size, off.optim.lr, off.optim.lr_batch) == (256, 0.03, 256)
    assert "scripts/main_pretrain.sh" in (PRESETS_DIR / "jcl_official.yaml").read_text()
    eq = resolve_config("eqco")
    assert (eq.model.queue_size, eq.loss.ref_negatives, eq.loss.name) == (256, 65536.0, "eqco")
    simo = resolve_config("simo")
    assert (simo.model.queue_size, simo.loss.ref_negatives, simo.model.head) == (0, 256.0, "mlp_bn")
    assert (simo.model.batch_negatives, simo.train.batch_size) == (0, 256)  # negatives: the other 255 keys
    assert "UNVERIFIED" in (PRESETS_DIR / "co2.yaml").read_text()
    c1 = resolve_config("co2_moco_v1")  # CO2's "MoCo + CO2" rows: MoCo v1's recipe + the consistency term
    assert (c1.loss.name, c1.loss.tau, c1.loss.con_weight, c1.loss.tau_con) == ("co2", 0.07, 1.0, 0.05)
    assert (c1.model.head, c1.data.augmentation, c1.optim.schedule, c1.optim.milestones) == \
        (v1.model.head, v1.data.augmentation, "step", [0.6, 0.8])
    assert "UNVERIFIED" in (PRESETS_DIR / "co2_moco_v1.yaml").read_text()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_loss_section_is_the_losss_own_hyperparameters(name):
    """loss.name selects the section's keys: the fields of that loss's Params, their defaults and checks."""
    cfg = resolve_config("moco_v2", overrides=[f"loss.name={name}"])
    assert list(to_dict(cfg.loss)) == ["name", *loss_params(name)]
    defaults = LOSSES[name].Params()
    assert {k: v for k, v in cfg.loss.hparams().items() if k != "tau"} == \
        {k: getattr(defaults, k) for k in loss_params(name) if k != "tau"}  # tau: moco_v2's


def test_a_key_of_another_loss_is_rejected_and_old_loss_keys_do_not_block_a_resume():
    with pytest.raises(UserError, match="unknown config key 'loss.lam'; choose from name, tau$"):
        resolve_config("moco_v2", overrides=["loss.lam=1"])
    old = to_dict(resolve_config("moco_v2", "toy"))
    old["loss"].update(lam=4.0, lam_ramp=True, alpha=1.0, tau_con=0.05)  # every loss's keys in one section (before)
    assert config_differences(old, resolve_config("moco_v2", "toy")) == []
    jcl = to_dict(resolve_config("jcl", "toy"))
    del jcl["loss"]["lam_ramp"]  # a key the old config lacks counts as the default of this run's loss
    assert config_differences(jcl, resolve_config("jcl", "toy")) == []


def test_overrides_and_tuple_values():
    cfg = resolve_config("jcl", "toy", overrides=["optim.lr=0.5", "data.crop_scale=[0.3, 0.9]", "loss.lam=1e-1"])
    assert cfg.optim.lr == 0.5 and cfg.data.crop_scale == (0.3, 0.9) and cfg.loss.lam == 0.1


@pytest.mark.parametrize("override, message", [
    ("loss.tua=0.2", "unknown config key 'loss.tua'; choose from name, tau"),
    ("loss.tau=0", "loss.tau must be > 0"),
    ("loss.name=jlc", "unknown loss 'jlc'; choose from co2, eqco, jcl, moco"),
    ("data.num_keys=3", "data.num_keys = 3 needs the jcl loss"),
    ("data.num_keys=0", "data.num_keys (M) must be >= 1"),
    ("model.queue_size=100", "must be a multiple of the global batch"),
    ("model.momentum=1.5", "model.momentum must be in [0, 1]"),
    ("train.batch_size=abc", "train.batch_size must be an integer"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(UserError) as e:
        resolve_config("moco_v2", overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_method_lists_the_choices():
    with pytest.raises(UserError, match="unknown method .mocov2.; choose from co2, co2_moco_v1, eqco, jcl, "
                                        "jcl_official, moco_v1"):
        resolve_config("mocov2")


def test_config_differences_ignore_resumable_keys():
    old = to_dict(resolve_config("moco_v2", "toy"))
    same = resolve_config("moco_v2", "toy", overrides=["data.workers=0", "train.log_every=1", "train.max_steps=3"])
    assert config_differences(old, same) == []
    other = resolve_config("moco_v2", "toy", overrides=["optim.lr=0.5"])
    assert config_differences(old, other) == ["optim.lr: 0.06 -> 0.5"]


def test_config_differences_missing_old_key_counts_as_its_default():
    """A config written before a key existed resumes if the new value is the default the old run used."""
    old = to_dict(resolve_config("moco_v2", "toy"))
    del old["model"]["zero_init_residual"]
    assert config_differences(old, resolve_config("moco_v2", "toy", overrides=["model.zero_init_residual=false"])) == []
    changed = resolve_config("moco_v2", "toy", overrides=["model.zero_init_residual=true"])
    assert config_differences(old, changed) == ["model.zero_init_residual: False -> True"]


@pytest.mark.parametrize("method", METHODS)
def test_residual_init_is_gamma_02_at_toy_scale_and_the_recipes_at_full_scale(method):
    """The toy preset starts every residual branch at γ 0.2 (zero-init leaves a 32 px ResNet-50 blind outside the
    top-left 12 x 12 pixels, torchvision's init learnt 3x slower: ctbench/toydata/README.md); the paper presets keep
    MoCo's torchvision init, except SiMo, whose official config sets ZERO_INIT_RESIDUAL=True."""
    toy = resolve_config(method, "toy").model
    assert effective_residual_gamma(toy.zero_init_residual, toy.residual_gamma) == 0.2
    full = resolve_config(method, "full").model
    assert full.zero_init_residual is (method == "simo") and full.residual_gamma is None


@pytest.mark.parametrize("scale", ["full", "toy"])
def test_simo_is_the_official_selfsup_config(scale):
    """V2AI/SelfSup@29f7d33 examples/simo/...256bs.200e config.py + simo.py: NORM "SyncBN" (global BN) in backbone
    and head, no batch shuffle, ZERO_INIT_RESIDUAL=True, WARMUP_ITERS=10, cosine per step, lr 0.03 for 256, wd 1e-4,
    200 epochs, CHECKPOINT_PERIOD 10. At toy scale global BN is BN over the whole batch: no split."""
    simo = resolve_config("simo", scale)
    m = simo.model
    assert (m.sync_bn, m.shuffle_bn, m.head, m.dim) == (True, "auto", "mlp_bn", 128)
    assert (simo.loss.name, simo.loss.tau) == ("eqco", 0.2) and m.queue_size == 0 and m.batch_negatives == 0
    if scale == "full":
        assert (m.zero_init_residual, m.momentum) == (True, 0.999)
        assert (simo.optim.warmup_steps, simo.optim.warmup_epochs, simo.optim.schedule) == (10, 0.0, "cosine")
        assert (simo.optim.lr, simo.optim.lr_batch, simo.optim.weight_decay, simo.optim.momentum) == (
            0.03, 256, 1e-4, 0.9)
        assert (simo.train.epochs, simo.train.batch_size, simo.train.keep_every) == (200, 256, 10)
    else:  # the toy preset's momentum, γ and one warm-up epoch; α = the toy batch
        assert (m.momentum, m.residual_gamma, simo.optim.warmup_steps, simo.optim.warmup_epochs) == (0.9, 0.2, 0, 1)
        assert simo.loss.ref_negatives == simo.train.batch_size == 64 and simo.train.keep_every == 0


def test_keep_every_is_moco_every_epoch_at_full_scale_and_off_at_toy():
    """facebookresearch/moco@132aea9 main_moco.py saves checkpoint_{epoch:04d}.pth.tar after every epoch."""
    assert resolve_config("moco_v2").train.keep_every == 1
    assert resolve_config("moco_v2", "toy").train.keep_every == 0


@pytest.mark.parametrize("overrides, message", [
    (["model.sync_bn=true", "model.shuffle_bn=split"], "model.sync_bn (global BN) cannot be combined with "
                                                       "model.shuffle_bn=split"),
    (["optim.warmup_steps=10", "optim.warmup_epochs=1"], "set optim.warmup_steps or optim.warmup_epochs, not both"),
    (["train.keep_every=-1"], "train.keep_every must be >= 0"),
    (["monitor.knn_k=0"], "monitor.knn_k must be >= 1"),
])
def test_bn_schedule_and_monitor_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError) as e:
        resolve_config("moco_v2", overrides=overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_milestones_are_fractions_of_the_schedule_or_epochs():
    """MoCo v1's x0.1 at epochs 120 and 160 of 200 is [0.6, 0.8]: a shortened run keeps the shape (the toy's 2
    epochs, train.epochs=1); absolute epochs still work; an epoch past the end is one line naming the key."""
    from pretrain.config import milestone_epochs
    from pretrain.engine import learning_rate

    v1 = resolve_config("moco_v1")
    assert milestone_epochs(v1.optim.milestones, v1.train.epochs) == [120.0, 160.0]
    spe = 10  # steps per epoch
    lrs = [learning_rate(v1, e * spe, spe) for e in (119, 120, 159, 160)]
    assert lrs == pytest.approx([0.03, 0.003, 0.003, 0.0003])  # MoCo's per-epoch `epoch >= milestone`
    absolute = resolve_config("moco_v1", overrides=["optim.milestones=[120, 160]"])
    assert [learning_rate(absolute, e * spe, spe) for e in (119, 120, 159, 160)] == pytest.approx(lrs)
    # was: "must lie in (0, 1), got 1"; the toy lr is 0.06 per 32 = 0.12 for its batch of 64
    short = resolve_config("moco_v1", "toy", overrides=["train.epochs=1", "optim.warmup_epochs=0"])
    assert milestone_epochs(short.optim.milestones, 1) == [0.5]
    assert learning_rate(short, 4, 10) == pytest.approx(0.12) and learning_rate(short, 5, 10) == pytest.approx(0.012)
    with pytest.raises(UserError) as e:
        resolve_config("moco_v1", "toy", overrides=["train.epochs=2", "optim.milestones=[6]"])
    assert "optim.milestones" in str(e.value) and "fractions of the schedule" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="optim.milestones: each must be a fraction of the schedule in .0, 1. or a "
                                        "whole epoch"):
        resolve_config("moco_v1", overrides=["optim.milestones=[1.5]"])


def test_speed_switches_are_not_a_different_run():
    """data.aug_device, data.prefetch, train.compile and train.keep_optimizer change how a run is computed or
    stored, not what it computes: a resume may change them, and they are no protocol deviation."""
    old = to_dict(resolve_config("moco_v2", "toy"))
    new = resolve_config("moco_v2", "toy", overrides=["data.aug_device=gpu", "data.prefetch=false",
                                                       "train.compile=true", "train.keep_optimizer=false"])
    assert config_differences(old, new) == []
    cfg = resolve_config("moco_v2")
    assert (cfg.data.aug_device, cfg.data.prefetch, cfg.train.compile, cfg.train.keep_optimizer) == \
        ("auto", True, False, True)
