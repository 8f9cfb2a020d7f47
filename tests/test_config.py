"""Typed configs: presets with _base_ deltas, key=value overrides, strict keys and types, validation."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest

from ctbench.config import check, load_config, parse_overrides, to_dict
from ctbench.errors import UserError


@dataclasses.dataclass
class Optim:
    lr: float = 0.03
    epochs: int = 200
    schedule: Literal["cos", "step"] = "cos"
    milestones: list[int] = dataclasses.field(default_factory=lambda: [120, 160])

    def validate(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")


@dataclasses.dataclass
class Cfg:
    name: str = "moco_v2"
    optim: Optim = dataclasses.field(default_factory=Optim)
    tau: float | None = None
    amp: bool = False


def test_defaults_presets_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 0.06\n  epochs: 100\nname: base\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\noptim:\n  epochs: 50\n")
    cfg = load_config(Cfg, [child], ["optim.schedule=step", "tau=0.2", "amp=true", "optim.milestones=[1, 2]"])
    assert cfg.name == "base"
    assert cfg.optim.lr == 0.06 and cfg.optim.epochs == 50 and cfg.optim.schedule == "step"
    assert cfg.optim.milestones == [1, 2]
    assert cfg.tau == 0.2 and cfg.amp is True
    assert to_dict(cfg)["optim"] == {"lr": 0.06, "epochs": 50, "schedule": "step", "milestones": [1, 2]}


def test_ints_become_floats_but_not_the_reverse():
    assert load_config(Cfg, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(UserError, match="optim.epochs must be an integer"):
        load_config(Cfg, None, ["optim.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; choose from epochs, lr, milestones, schedule"),
    ("nme=x", "unknown config key 'nme'"),
    ("optim.schedule=linear", "optim.schedule = 'linear' is not allowed; choose from cos, step"),
    ("amp=3", "amp must be true or false"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=abc", "optim.lr must be a number"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_are_one_line_user_errors(override, message):
    with pytest.raises(UserError) as e:
        load_config(Cfg, None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_preset_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Cfg, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Cfg, [bad])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Cfg, [listy])


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["a.b.c=1e-3", "a.d=null", "e=[1, 2]", "f=text"]) == {
        "a": {"b": {"c": 0.001}, "d": None}, "e": [1, 2], "f": "text"}


def _literal_fields(cls, prefix=""):
    """(dotted key, allowed strings) for every Literal-of-strings field of a config dataclass, nested included."""
    import dataclasses
    import typing
    from typing import Literal, get_args, get_origin

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _literal_fields(tp, f"{prefix}{f.name}.")
        elif get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)):
            yield f"{prefix}{f.name}", get_args(tp)


def _configs():
    from pretrain.config import PretrainConfig
    from transfer.classify.config import LinearConfig, SemisupConfig

    return [PretrainConfig, LinearConfig, SemisupConfig]


@pytest.mark.parametrize("cls", _configs(), ids=lambda c: c.__name__)
def test_every_string_choice_is_taken_as_written_on_the_command_line(cls):
    """``model.shuffle_bn=off`` is the choice "off", not YAML's False (on, yes, no, null alike)."""
    fields = list(_literal_fields(cls))
    assert fields
    for key, choices in fields:
        for choice in choices:
            for text in (choice, f"'{choice}'"):
                try:
                    cfg = load_config(cls, None, [f"{key}={text}"])
                except UserError as e:  # a combination the config's own checks refuse is fine; a type error is not
                    assert "is not allowed" not in str(e), (key, text, str(e))
                    continue
                node = cfg
                for part in key.split("."):
                    node = getattr(node, part)
                assert node == choice, (key, text, node)


@dataclasses.dataclass
class _Words:
    mode: typing.Literal["on", "off", "yes", "no", "null"] = "on"
    name: str = "x"
    flag: bool = False
    opt: str | None = None


@dataclasses.dataclass
class Outer:
    inner: _Words = dataclasses.field(default_factory=_Words)


def test_yaml_words_stay_strings_only_where_the_field_is_a_string():
    for word in ("on", "off", "yes", "no", "null"):
        assert load_config(Outer, None, [f"inner.mode={word}"]).inner.mode == word
        assert load_config(Outer, None, [f"inner.name={word}"]).inner.name == word
    assert load_config(Outer, None, ["inner.flag=yes"]).inner.flag is True  # a bool field reads YAML's words
    assert load_config(Outer, None, ["inner.opt=off"]).inner.opt == "off"
    assert load_config(Outer, None, ["inner.name='1e-3'"]).inner.name == "1e-3"
    with pytest.raises(UserError, match="is not allowed"):
        load_config(Outer, None, ["inner.mode=maybe"])
