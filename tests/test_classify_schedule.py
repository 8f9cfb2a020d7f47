"""Shortened classification schedules keep their shape (issue 19.6): the presets' lr milestones are fractions of
``train.epochs`` (MoCo's 60/80 of 100 = 0.6/0.8), so ``make lincls MODE=standard ARGS="train.epochs=2"`` and a
semi-supervised run below 4 epochs run; an explicit out-of-range epoch is one line naming the key to set."""

from __future__ import annotations

import pytest

from ctbench.errors import UserError
from transfer import linear, semisup
from transfer.classify.config import LinearConfig, SemisupConfig, resolve, resolve_milestones
from transfer.classify.engine import learning_rate


@pytest.mark.parametrize("cls, preset, scale, epochs, milestones", [
    (LinearConfig, "linear", "full", 100, [60, 80]),  # MoCo main_lincls --epochs 100 --schedule 60 80
    (LinearConfig, "linear", "toy", 10, [6, 8]),
    (LinearConfig, "linear_selfsup", "full", 90, [60, 80]),  # SelfSup MAX_EPOCH=90, STEPS=(60, 80)
    (LinearConfig, "linear_selfsup", "toy", 9, [6, 8]),
    (SemisupConfig, "semisup_1pct", "full", 20, [12, 16]),  # OpenSelfSup total_epochs = 20, step=[12, 16]
    (SemisupConfig, "semisup_1pct", "toy", 20, [12, 16]),
    (SemisupConfig, "semisup_10pct", "full", 20, [12, 16]),
    (SemisupConfig, "semisup_10pct", "toy", 5, [3, 4]),
])
def test_the_presets_resolve_to_their_recipes_epochs(cls, preset, scale, epochs, milestones):
    cfg = resolve(cls, preset, scale)
    assert (cfg.train.epochs, cfg.optim.milestones) == (epochs, milestones)


@pytest.mark.parametrize("epochs, expected", [(1, []), (2, [1, 1]), (3, [2, 2]), (4, [2, 3]), (5, [3, 4]),
                                              (20, [12, 16]), (100, [60, 80])])
def test_fractions_keep_the_shape_at_any_length(epochs, expected):
    assert resolve_milestones([0.6, 0.8], epochs) == expected
    assert resolve_milestones([1, 3], 4) == [1, 3]  # whole numbers are epochs, as before
    assert resolve_milestones([], epochs) == []


def test_a_two_epoch_standard_probe_resolves_and_ends_at_the_recipes_last_lr():
    cfg = resolve(LinearConfig, "linear", "full", overrides=["train.epochs=2"], fixed={"mode": "standard"})
    assert cfg.optim.milestones == [1, 1]
    base = 30.0 * cfg.train.batch_size / 256
    assert learning_rate(cfg, 0) == pytest.approx(base)
    assert learning_rate(cfg, 1) == pytest.approx(base * 0.01)  # both x0.1 steps, as epochs 80-99 of MoCo's 100
    semi = resolve(SemisupConfig, "semisup_1pct", "toy", overrides=["train.epochs=3"])
    assert semi.optim.milestones == [2, 2]
    resolve(SemisupConfig, "semisup_10pct", "toy", overrides=["train.epochs=2"])  # was an error
    resolve(LinearConfig, "linear", "toy", overrides=["train.epochs=1"])


def test_resolving_twice_changes_nothing():
    """A record's config (epochs already) validated again: the same run, a resume accepts it."""
    from ctbench.config import load_config, to_dict

    cfg = resolve(LinearConfig, "linear", "toy")
    again = load_config(LinearConfig, None, (), extra=to_dict(cfg))
    assert again.optim.milestones == cfg.optim.milestones == [6, 8]


@pytest.mark.parametrize("over, needle", [
    (["train.epochs=2", "optim.milestones=[6, 8]"], "optim.milestones: epoch 6 is not inside the 2-epoch schedule"),
    (["optim.milestones=[0]"], "optim.milestones must be > 0"),
    (["optim.milestones=[1.5]"], "1.5 is neither a fraction of train.epochs"),
    (["optim.milestones=[0.8, 0.6]"], "optim.milestones must be increasing"),
])
def test_an_out_of_range_value_names_the_key_to_set(over, needle):
    with pytest.raises(UserError) as e:
        resolve(LinearConfig, "linear", "toy", overrides=over)
    assert needle in str(e.value)
    if "epoch 6" in needle:
        assert "set optim.milestones=[0.6, 0.8]" in str(e.value)


def test_the_clis_print_the_resolved_schedule_and_one_line_errors(toy_datasets, capsys):
    data = str(toy_datasets / "imagenet")
    assert linear.main(["--data", data, "--mode", "standard", "--scale", "full", "--print-config",
                        "train.epochs=2"]) == 0
    assert "milestones:\n  - 1\n  - 1\n" in capsys.readouterr().out
    assert semisup.main(["--pct", "1", "--ckpt", "random", "--data", data, "--print-config", "train.epochs=3"]) == 0
    assert "milestones:\n  - 2\n  - 2\n" in capsys.readouterr().out
    assert linear.main(["--data", data, "--print-config", "train.epochs=2", "optim.milestones=[6]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m transfer.linear: error: optim.milestones: epoch 6 is not inside the 2-epoch "
                          "schedule (train.epochs = 2); set optim.milestones=[0.6, 0.8]")
