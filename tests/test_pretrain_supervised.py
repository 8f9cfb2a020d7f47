"""The supervised ceiling's record: its init is named against torchvision's recipe, and a bad γ is one clear error."""

from __future__ import annotations

from pretrain import supervised


def _deviations(*argv: str) -> list[str]:
    args = supervised.parser().parse_args(["--epochs", "4", "--batch-size", "32", *argv])
    return supervised._protocol(args, toy=True, steps=124)["deviations"]


def test_the_init_is_named_zero_init_a_residual_gamma_or_nothing_for_torchvisions_and_defaults_to_the_toy_gamma():
    assert "zero-init residuals (recipe: none)" in _deviations("--zero-init-residual")
    assert "zero-init residuals (recipe: none)" in _deviations("--residual-gamma", "0")
    gamma = "residual branches' last BN γ 0.2 at init (recipe: torchvision's 1)"
    assert gamma in _deviations("--residual-gamma", "0.2")
    assert _deviations() == _deviations("--residual-gamma", "0.2")  # the default: the toy pretraining preset's γ
    torchvision = _deviations("--residual-gamma", "1")
    assert not any("residual" in d or "zero-init" in d for d in torchvision)
    assert [d for d in _deviations() if d != gamma] == torchvision


def test_a_negative_residual_gamma_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert supervised.main(["--data", str(tmp_path), "--out", str(out), "--residual-gamma", "-1"]) != 0
    assert "python -m pretrain.supervised: error: --residual-gamma must be >= 0, got -1.0" in capsys.readouterr().err
    assert not out.exists()


def test_the_defaults_are_the_toy_ceiling_on_toy_data_and_the_recipe_elsewhere():
    toy = supervised.resolve_defaults(supervised.parser().parse_args([]), toy=True)
    assert (toy.epochs, toy.batch_size, toy.lr, toy.warmup_steps, toy.residual_gamma) == (48, 64, 0.4, 15, 0.2)
    args = supervised.parser().parse_args(["--image-size", "224", "--crop-scale", "0.08", "1"])
    full = supervised._protocol(args, toy=False, steps=450360)["deviations"]
    # torchvision's recipe but for the world size and the per-step cosine (no warm-up)
    assert full == ["1 process (recipe: 8 GPUs)", "schedule step x0.1 every 30 epochs -> cosine per step"]
    assert (args.epochs, args.batch_size, args.lr, args.warmup_steps, args.residual_gamma) == (90, 256, 0.1, 0, 1.0)
