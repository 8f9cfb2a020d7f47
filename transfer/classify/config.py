"""Typed configs of the classification evaluations and how a run's config is resolved.

Resolution order (later wins): dataclass defaults <- ``transfer/presets/<preset>.yaml`` (which may ``_base_`` on
another) <- its ``baselines: <name>:`` section for a baseline checkpoint at full scale (semi-supervised: ``random``,
``supervised``) <- its ``toy:`` section when the scale is ``toy`` <- ``--preset FILE`` <- ``key=value`` overrides.
Unknown keys, wrong types and out-of-range values are one-line errors naming the key.

    cfg = resolve(LinearConfig, "linear", scale="toy", overrides=["train.epochs=20"], fixed={"mode": "cached"})
    cfg = resolve(SemisupConfig, "semisup_1pct", "full", baseline="random")  # lr 0.01, head x1
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from ctbench import config as ctbench_config
from ctbench.config import check, deep_merge, load_config, read_yaml
from ctbench.errors import choices_error

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
T = TypeVar("T")


@dataclass
class DataConfig:
    path: str = ""  # ImageNet-layout root holding train/ and val/ (set by --data; default the toy ImageNet)
    image_size: int = 224  # training crop and val centre crop (val resize = round(size * 256 / 224))
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (torchvision's default, MoCo's)
    augment: bool = True  # RandomResizedCrop + flip for training; false = the val transform (equivalence checks)
    workers: int = 8  # DataLoader workers per process

    def validate(self) -> None:
        check(self.image_size >= 32, f"data.image_size must be >= 32, got {self.image_size}")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")


@dataclass
class OptimConfig:
    lr: float = 30.0  # for a global batch of `lr_batch`, scaled linearly to train.batch_size
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    # where the lr is multiplied by gamma: fractions of train.epochs (0 < f < 1; MoCo main_lincls --schedule 60 80 of
    # --epochs 100 = 0.6, 0.8), so a shortened schedule keeps its shape, or whole epochs (>= 1). Resolved to epochs
    # when the config is validated (see resolve_milestones); the run, its record and --print-config see epochs.
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
    gamma: float = 0.1
    head_lr_mult: float = 1.0  # fine-tuning: lr of the classifier = lr x head_lr_mult (OpenSelfSup's lr_mult)

    def validate(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.lr_batch >= 1, f"optim.lr_batch must be >= 1, got {self.lr_batch}")
        check(self.momentum >= 0 and self.weight_decay >= 0, "optim.momentum and optim.weight_decay must be >= 0")
        check(0 < self.gamma <= 1, f"optim.gamma must be in (0, 1], got {self.gamma}")
        check(self.head_lr_mult > 0, f"optim.head_lr_mult must be > 0, got {self.head_lr_mult}")
        check(list(self.milestones) == sorted(self.milestones), "optim.milestones must be increasing")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch (all processes together)
    eval_batch_size: int = 256  # per process
    eval_every: int = 0  # epochs between val evaluations besides the last epoch (0 = the last epoch only)
    keep_every: int = 0  # keep checkpoint_%04d.pth.tar (0-based epoch, as MoCo main_moco.py) every N epochs; 0 = off
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only
    ckpt_epochs: int = 1  # epochs between checkpoints (the last epoch always gets one)
    ckpt_every: int = 0  # steps between extra mid-epoch checkpoints (0 = none)
    max_steps: int = 0  # stop after this many steps in total (tests, kill/resume checks); 0 = the whole schedule

    def validate(self) -> None:
        check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train.batch_size and eval_batch_size must be >= 1")
        check(self.eval_every >= 0 and self.ckpt_every >= 0 and self.max_steps >= 0,
              "train.eval_every, train.ckpt_every and train.max_steps must be >= 0")
        check(self.ckpt_epochs >= 1, f"train.ckpt_epochs must be >= 1, got {self.ckpt_epochs}")
        check(self.keep_every >= 0, f"train.keep_every must be >= 0 (0 = off), got {self.keep_every}")


@dataclass
class CacheConfig:
    views: int = 0  # K augmented views per train image (each epoch draws one per image); 0 = centre crop only
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage of the cached features (fp16 halves RAM)

    def validate(self) -> None:
        check(self.views >= 0, f"cache.views must be >= 0, got {self.views}")


@dataclass
class HeadConfig:
    # Normalisation of the frozen features before the linear classifier. none: MoCo main_lincls (fc on the raw
    # pooled features). bn: BatchNorm without affine parameters (MAE's linear probe, He et al. 2021, arXiv:2111.06377,
    # appendix A.2), statistics of the global batch under DDP; its running mean / var are part of the head.
    norm: Literal["none", "bn"] = "none"


@dataclass
class SubsetConfig:
    file: str = ""  # SimCLR-format list (1percent.txt / 10percent.txt); empty = generate a balanced one
    seed: int = 0  # seed of the generated list


def resolve_milestones(milestones: typing.Sequence[float], epochs: int) -> list[int]:
    """The epochs of ``optim.milestones`` in a ``epochs``-epoch schedule (the lr is x gamma from that epoch on).

    A fraction ``0 < f < 1`` is the epoch ``round(f * epochs)`` kept inside ``1 .. epochs - 1`` (0.6 and 0.8 of 100
    epochs: 60 and 80; of 10: 6 and 8; of 3: 2 and 2; of 2: 1 and 1, so a short run still ends at the recipe's last
    lr), none in a one-epoch run (there is no later epoch to step into). A whole number ``>= 1`` is that epoch and
    must lie inside the schedule: one line naming ``optim.milestones`` otherwise.
    """
    out: list[int] = []
    for m in milestones:
        check(m > 0, f"optim.milestones must be > 0 (fractions of train.epochs in (0, 1), or epochs), got {m:g}")
        if m < 1:
            if epochs >= 2:
                out.append(min(max(int(m * epochs + 0.5), 1), epochs - 1))
            continue
        check(float(m).is_integer(), f"optim.milestones: {m:g} is neither a fraction of train.epochs (0 < f < 1) "
                                     f"nor a whole epoch; set optim.milestones=[0.6, 0.8] or whole epochs")
        check(m < epochs, f"optim.milestones: epoch {m:g} is not inside the {epochs}-epoch schedule (train.epochs = "
                          f"{epochs}); set optim.milestones=[0.6, 0.8] (fractions of the schedule, the same shape "
                          f"at any length), epochs below {epochs}, or optim.milestones=[] for no lr step")
        out.append(int(m))
    check(out == sorted(out), f"optim.milestones must be increasing, got {_fmt_list(milestones)} "
                              f"(epochs {_fmt_list(out)})")
    return out


def _fmt_list(xs: typing.Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]"


def _check_schedule(optim: OptimConfig, train: TrainConfig) -> None:
    """Resolve ``optim.milestones`` to epochs of this schedule, in place (idempotent: epochs stay epochs)."""
    optim.milestones = resolve_milestones(optim.milestones, train.epochs)


@dataclass
class LinearConfig:
    """Linear probe of a frozen backbone (MoCo main_lincls, or SelfSup's linear evaluation)."""

    protocol: str = "linear"
    # the original evaluation the preset reproduces (and the run record's protocol names): moco = MoCo main_lincls
    # (presets/linear.yaml), selfsup = SelfSup's cvpods linear evaluation of SiMo (presets/linear_selfsup.yaml)
    recipe: Literal["moco", "selfsup"] = "moco"
    scale: Literal["toy", "full"] = "full"
    # standard: the backbone on every step (MoCo main_lincls exactly); cached: features computed once (fast mode)
    mode: Literal["standard", "cached"] = "standard"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def validate(self) -> None:
        _check_schedule(self.optim, self.train)
        check(self.optim.head_lr_mult == 1.0, "optim.head_lr_mult applies to fine-tuning only (the linear probe "
                                              "trains nothing but the classifier)")


@dataclass
class SemisupConfig:
    """Fine-tuning of the whole network on a labelled subset."""

    protocol: str = "semisup"
    scale: Literal["toy", "full"] = "full"
    pct: int = 1  # percent of the train labels: 1 or 10 (SimCLR's subsets)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    sync_bn: bool = True  # SyncBN under DDP on GPU (OpenSelfSup's setting); plain BN on one process or on CPU

    def validate(self) -> None:
        _check_schedule(self.optim, self.train)
        check(self.pct in (1, 10), f"pct must be 1 or 10, got {self.pct}")


def preset_path(name: str) -> Path:
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    if name not in names:
        raise choices_error("preset", name, names)
    return PRESETS_DIR / f"{name}.yaml"


# --recipe of the linear probe -> its preset
LINEAR_PRESETS = {"moco": "linear", "selfsup": "linear_selfsup"}


def resolve(cls: type[T], preset: str, scale: str = "full", extra_preset: str | Path | None = None,
            overrides: typing.Sequence[str] = (), fixed: dict | None = None, baseline: str | None = None) -> T:
    """The resolved config of a run (see the module docstring for the order). ``fixed`` holds what the command line
    sets outside ``key=value`` (mode, pct, data path); overrides still win over it. ``baseline`` (``random``,
    ``supervised`` or None) applies the preset's setting for that baseline checkpoint at full scale."""
    if scale not in ("toy", "full"):
        raise choices_error("scale", scale, ("toy", "full"))
    merged = read_yaml(preset_path(preset))
    toy = merged.pop("toy", {}) or {}
    baselines = merged.pop("baselines", {}) or {}
    if baseline is not None and scale == "full":
        merged = deep_merge(merged, baselines.get(baseline, {}) or {})
    if scale == "toy":
        merged = deep_merge(merged, toy)
    if extra_preset is not None:
        extra = read_yaml(extra_preset)
        extra.pop("toy", None)
        extra.pop("baselines", None)
        merged = deep_merge(merged, extra)
    merged = deep_merge(merged, {"scale": scale, **(fixed or {})})
    return load_config(cls, None, overrides, extra=merged)


# Keys whose change does not make a different run (resuming with another value is fine).
RESUMABLE_CHANGES = ("data.path", "data.workers", "train.device", "train.max_steps", "train.ckpt_every",
                     "train.ckpt_epochs", "train.keep_every",
                     "train.eval_every", "train.eval_batch_size")


def config_differences(old: dict, new: object) -> list[str]:
    """``key: old -> new`` for every key that differs and would make a different run (a key the old config lacks,
    such as ``head.norm`` in records older than it, counts as its default)."""
    return ctbench_config.config_differences(old, new, RESUMABLE_CHANGES)


def config_keys(cls: type) -> dict[str, list[str]]:
    """Section -> its keys (for --help); top-level scalars under ''."""
    hints = typing.get_type_hints(cls)
    out: dict[str, list[str]] = {"": []}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out[f.name] = [g.name for g in dataclasses.fields(tp)]
        else:
            out[""].append(f.name)
    return out


def cli_parser(cls: type, prog: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """The parser of ``python -m transfer.linear`` / ``transfer.semisup``: the config keys and examples as epilog."""
    keys = "\n".join(f"  {section or '(top level)'}: {', '.join(names)}" for section, names in config_keys(cls).items())
    return argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, description=description,
        epilog=f"config keys (override as section.key=value):\n{keys}\n\nexamples:\n"
               + "".join(f"  {e}\n" for e in examples))


def add_ckpt_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="checkpoint (ours, MoCo/JCL release, torchvision state_dict) or 'random'; "
                                  "default: the newest pretraining output")


def add_run_arguments(p: argparse.ArgumentParser, *, preset: str, out: str, fresh: str, example: str) -> None:
    """The options both evaluations share: data, scale, preset, output, name, fresh, print-config, overrides."""
    p.add_argument("--data", type=Path, help="ImageNet-layout root with train/ and val/ "
                                             "(default: $DETECTRON2_DATASETS/imagenet, the toy ImageNet)")
    p.add_argument("--scale", choices=("toy", "full"), help="default: toy when the data carries the toy marker")
    p.add_argument("--preset", type=Path, help=f"extra YAML applied over transfer/presets/{preset}")
    p.add_argument("--out", type=Path, help=f"run directory (default: $CTBENCH_OUTPUT/{out})")
    p.add_argument("--name", help="run name in the record (default: the pretraining run, random, supervised)")
    p.add_argument("--fresh", action="store_true", help=fresh)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
