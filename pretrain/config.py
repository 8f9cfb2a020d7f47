"""Typed pretraining configuration, its presets, and how a run's config is resolved.

The methods are the presets (``presets/<method>.yaml``, except ``toy*.yaml``); a method preset's ``recipe:`` is
the original recipe its runs cite (:mod:`pretrain.protocol`), not a setting. Resolution order (later wins):
dataclass defaults <- ``presets/<method>.yaml`` <- ``presets/toy.yaml`` (when the
scale is ``toy``) <- ``--preset FILE`` <- ``key=value`` overrides. A method preset may hold a ``toy:`` section with
method-specific deltas applied right after ``toy.yaml``. Unknown keys, wrong types and out-of-range values are
one-line errors naming the key.

    cfg = resolve_config("jcl", scale="toy", overrides=["optim.lr=0.06", "data.num_keys=3"])
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctbench import config as ctbench_config
from ctbench.config import check, deep_merge, load_config, parse_overrides, read_yaml
from ctbench.errors import UserError, choices_error
from pretrain.losses import LOSSES

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def _methods() -> tuple[str, ...]:
    """The method presets (``presets/*.yaml`` but ``toy*.yaml``, the toy scale), in the order of their loss in
    :data:`pretrain.losses.LOSSES`, then by name."""
    order = {name: i for i, name in enumerate(LOSSES)}

    def key(method: str) -> tuple[int, str]:
        loss = (read_yaml(PRESETS_DIR / f"{method}.yaml").get("loss") or {}).get("name", "moco")
        return order.get(loss, len(order)), method

    return tuple(sorted((p.stem for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith("toy")), key=key))


METHODS = _methods()


@dataclass
class ModelConfig:
    arch: Literal["resnet50"] = "resnet50"
    head: Literal["linear", "mlp", "mlp_bn"] = "mlp"  # v1 linear; v2 MLP 2048-2048-128; SiMo Linear-BN-ReLU-Linear-BN
    dim: int = 128  # embedding dimension
    hidden_dim: int = 2048  # MLP hidden width
    momentum: float = 0.999  # key encoder EMA: θ_k <- m θ_k + (1 - m) θ_q
    queue_size: int = 65536  # K; 0 = no queue, negatives are the other samples' keys of the global batch (SiMo)
    queue_init: Literal["random", "keys"] = "random"  # random unit vectors (MoCo), or keys of K random images
    batch_negatives: int = 0  # without a queue: K in-batch negatives drawn per query (0 = all other samples)
    # BN of the MoCo recipes: per-GPU BN, keys shuffled across GPUs. auto: ddp under torchrun, split on one process
    # (off with sync_bn); split: both encoders' BN over bn_splits sub-batches (ghost-BN; queries as the GPU slices,
    # keys after a random permutation); off: BN over the whole local batch
    shuffle_bn: Literal["auto", "ddp", "split", "off"] = "auto"
    bn_splits: int = 8  # split mode: sub-batches per BN = the 8 GPUs of the recipes
    sync_bn: bool = False  # global BN over all ranks in backbone + head of both encoders, no shuffle (SiMo)
    zero_init_residual: bool = False  # γ = 0 in each bottleneck's last BN (MoCo v1/v2: torchvision's default init)
    # γ of each bottleneck's last BN at step 0 instead (null: 0 with zero_init_residual, else torchvision's 1)
    residual_gamma: float | None = None

    def validate(self) -> None:
        check(0.0 <= self.momentum <= 1.0, f"model.momentum must be in [0, 1], got {self.momentum}")
        check(self.dim >= 1 and self.hidden_dim >= 1, "model.dim and model.hidden_dim must be >= 1")
        check(self.queue_size >= 0, f"model.queue_size must be >= 0 (0 = in-batch negatives), got {self.queue_size}")
        check(self.batch_negatives >= 0, f"model.batch_negatives must be >= 0, got {self.batch_negatives}")
        check(self.bn_splits >= 1, f"model.bn_splits must be >= 1, got {self.bn_splits}")
        check(self.residual_gamma is None or self.residual_gamma >= 0,
              f"model.residual_gamma must be >= 0 (or null), got {self.residual_gamma}")
        check(not self.sync_bn or self.shuffle_bn in ("auto", "off"), "model.sync_bn (global BN) cannot be "
              f"combined with model.shuffle_bn={self.shuffle_bn}: use model.shuffle_bn=off or auto")


@dataclass
class LossConfig:
    """The ``loss:`` section: ``name`` (a key of :data:`pretrain.losses.LOSSES`) and that loss's hyper-parameters,
    flat (``loss.tau``, ``loss.lam``): the section is built as :func:`loss_config` of the name, the fields of the
    loss's ``Params`` with their defaults and checks; a key the loss does not take is rejected."""

    name: str = "moco"

    @classmethod
    def config_variant(cls, data: Mapping) -> type:
        return loss_config(str(data.get("name", cls.name)))

    def hparams(self) -> dict:
        """The arguments of the selected loss, taken from this config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


@functools.cache
def loss_config(name: str) -> type[LossConfig]:
    """The ``loss:`` section of loss ``name``: :class:`LossConfig` (``name``) + the loss's ``Params`` fields."""
    if name not in LOSSES:
        raise choices_error("loss", name, LOSSES)
    cls = dataclasses.make_dataclass(f"LossConfig_{name}", [("name", str, field(default=name))],
                                     bases=(LOSSES[name].Params, LossConfig))
    cls.__module__ = __name__  # picklable by name
    globals()[cls.__name__] = cls
    return cls


@dataclass
class DataConfig:
    path: str = ""  # ImageNet-layout train folder; set by --data (default: the toy ImageNet)
    augmentation: Literal["moco_v1", "moco_v2"] = "moco_v2"
    image_size: int = 224  # training crop
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # moco_v2 Gaussian blur σ range (pixels of the crop)
    num_keys: int = 1  # M positive keys per query (JCL); the image is decoded once for all 1 + M views
    workers: int = 8  # DataLoader workers per process
    # where the augmentation after the crop runs. cpu: all of it in the workers (PIL, as MoCo's main_moco.py);
    # gpu: the workers decode + cut the 1 + M crops (uint8), colour jitter / grayscale / blur / flip / normalise run
    # batched on the training device (pretrain.gpu_aug; same parameter draws as PIL; on a CPU-only run: the main
    # process's CPU tensors); auto: gpu on CUDA, cpu elsewhere
    aug_device: Literal["auto", "cpu", "gpu"] = "auto"
    prefetch: bool = True  # CUDA: pinned batches copied (and augmented) one step ahead on a side stream

    def validate(self) -> None:
        check(self.image_size >= 32, f"data.image_size must be >= 32, got {self.image_size}")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], f"data.blur_sigma must be 0 < min <= max, got "
              f"{list(self.blur_sigma)}")
        check(self.num_keys >= 1, f"data.num_keys (M) must be >= 1, got {self.num_keys}")
        check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")


@dataclass
class OptimConfig:
    lr: float = 0.03  # learning rate for a global batch of `lr_batch`; scaled linearly to the actual batch
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step"] = "cosine"  # cosine: per step, to 0 at the end; step: x0.1 at milestones
    # step schedule: x0.1 at each milestone, a fraction of the schedule in (0, 1) (0.6 = 60 % of train.epochs) or an
    # epoch >= 1; MoCo v1's 120 and 160 of 200 epochs (main_moco.py --schedule 120 160) = [0.6, 0.8]
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
    warmup_epochs: float = 0.0  # linear warm-up from 0, then the schedule over the remaining epochs
    # linear warm-up factor 0.001 -> 1 over this many steps, multiplying the schedule (cvpods WarmupCosineLR)
    warmup_steps: int = 0

    def validate(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.lr_batch >= 1, f"optim.lr_batch must be >= 1, got {self.lr_batch}")
        check(self.weight_decay >= 0 and self.momentum >= 0, "optim.weight_decay and optim.momentum must be >= 0")
        check(self.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(not (self.warmup_steps and self.warmup_epochs), "set optim.warmup_steps or optim.warmup_epochs, "
              "not both")
        check(list(self.milestones) == sorted(self.milestones), "optim.milestones must be increasing")
        for m in self.milestones:
            check(0 < m < 1 or (m >= 1 and float(m).is_integer()), "optim.milestones: each must be a fraction of "
                  f"the schedule in (0, 1) or a whole epoch >= 1, got {m:g}")


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch (all processes together)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only
    max_steps: int = 0  # stop after this many steps in total (smoke runs, tests); 0 = the whole schedule
    log_every: int = 20  # steps between metric lines (the only host syncs of the loop)
    ckpt_every: int = 0  # steps between checkpoints, besides every epoch end; 0 = epoch ends only
    # keep checkpoint_%04d.pth.tar (0-based epoch) every N epochs; 0 = off. 1: MoCo main_moco.py keeps every epoch
    keep_every: int = 1
    nonfinite: Literal["stop", "skip"] = "stop"  # non-finite loss: stop (last good checkpoint kept) or skip the step
    dist_timeout_s: float = 1800.0  # DDP: a collective waiting longer (a peer died or hung) stops the run
    compile: bool = False  # torch.compile both encoders (nn.Module.compile: state-dict keys unchanged); off until
    #                        measured on a GPU (benchmarks/README.md)
    # keep the optimizer state (SGD momentum, ~1/3 of a checkpoint) in the final checkpoint; false: dropped once the
    # run is complete (a complete run needs it for nothing; it cannot be trained further then)
    keep_optimizer: bool = True

    def validate(self) -> None:
        check(self.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")
        check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 2, f"train.batch_size must be >= 2, got {self.batch_size}")
        check(self.max_steps >= 0 and self.ckpt_every >= 0, "train.max_steps and train.ckpt_every must be >= 0")
        check(self.keep_every >= 0, f"train.keep_every must be >= 0 (0 = off), got {self.keep_every}")
        check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")


@dataclass
class MonitorConfig:
    knn_every: int = 0  # epochs between kNN top-1 evaluations of the query backbone (pretrain.knn); 0 = off
    knn_val: str = ""  # val folder (ImageNet layout); default: <data>/../val
    knn_k: int = 20  # neighbours
    knn_t: float = 0.07  # temperature of the exp(s / t) votes
    knn_max_train: int = 0  # seeded subset of the train images used as the memory; 0 = all

    def validate(self) -> None:
        check(self.knn_every >= 0, f"monitor.knn_every must be >= 0, got {self.knn_every}")
        check(self.knn_k >= 1 and self.knn_t > 0, f"monitor.knn_k must be >= 1 and monitor.knn_t > 0, got "
              f"{self.knn_k} and {self.knn_t}")
        check(self.knn_max_train >= 0, f"monitor.knn_max_train must be >= 0 (0 = all), got {self.knn_max_train}")


@dataclass
class PretrainConfig:
    method: str = "moco_v2"
    scale: Literal["toy", "full"] = "full"
    # modules imported before the config is built: a loss defined outside the package registers itself there
    # (LOSSES["name"] = TheLoss), as mmcv's custom_imports
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=lambda: loss_config("moco")())
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub) if dataclasses.is_dataclass(sub) else ():
                v = getattr(sub, f.name)
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    check(not isinstance(x, float) or math.isfinite(x),
                          f"{section.name}.{f.name} must be a finite number, got {v!r}")
        m, b = self.data.num_keys, self.train.batch_size
        multi = " or ".join(n for n, loss in LOSSES.items() if loss.multi_key)
        check(m == 1 or LOSSES[self.loss.name].multi_key,
              f"data.num_keys = {m} needs the {multi} loss (loss.name = {self.loss.name!r} takes one key)")
        if self.model.queue_size > 0:
            check(self.model.queue_size % b == 0, f"model.queue_size ({self.model.queue_size}) must be a multiple "
                  f"of the global batch train.batch_size ({b})")
            check(self.model.batch_negatives == 0, "model.batch_negatives needs model.queue_size = 0")
        else:
            check(self.model.batch_negatives < b, f"model.batch_negatives ({self.model.batch_negatives}) must be "
                  f"smaller than the global batch ({b}): each query has {b - 1} other samples")
        if self.optim.schedule == "step":
            e = self.train.epochs
            for ms in self.optim.milestones:
                check(ms < e, f"optim.milestones: epoch {ms:g} is not before the end of train.epochs = {e}; set "
                      f"optim.milestones to fractions of the schedule (e.g. optim.milestones=[0.6,0.8]) or epochs "
                      f"below {e}")


def milestone_epochs(milestones: list[float], epochs: int) -> list[float]:
    """``optim.milestones`` in epochs: a fraction ``f`` in (0, 1) is ``f x epochs``, an epoch stays itself."""
    return [m * epochs if m < 1 else float(m) for m in milestones]


def preset_path(method: str) -> Path:
    if method not in METHODS:
        raise choices_error("method", method, METHODS)
    return PRESETS_DIR / f"{method}.yaml"


def resolve_config(method: str, scale: str = "full", preset: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = (), data_path: str | Path | None = None
                   ) -> PretrainConfig:
    """The resolved config of a run (see the module docstring for the order)."""
    if scale not in ("toy", "full"):
        raise choices_error("scale", scale, ("toy", "full"))
    merged = read_yaml(preset_path(method))
    merged.pop("recipe", None)  # the run record's, pretrain.protocol.recipe
    toy_delta = merged.pop("toy", {}) or {}
    if scale == "toy":
        merged = deep_merge(deep_merge(merged, read_yaml(PRESETS_DIR / "toy.yaml")), toy_delta)
    if preset is not None:
        merged = deep_merge(merged, read_yaml(preset))
    merged = deep_merge(merged, {"method": method, "scale": scale})
    if data_path is not None:
        merged = deep_merge(merged, {"data": {"path": str(data_path)}})
    _import(parse_overrides(overrides).get("imports", merged.get("imports", [])))
    return load_config(PretrainConfig, None, overrides, extra=merged)


def _import(modules: object) -> None:
    if not isinstance(modules, list):
        raise UserError(f"imports must be a list of module names, got {modules!r}")
    for name in modules:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise UserError(f"imports: cannot import {name!r} ({e}); put its folder on PYTHONPATH") from e


# Keys whose change does not make a different run (resuming with another value is fine).
RESUMABLE_CHANGES = ("data.path", "data.workers", "data.aug_device", "data.prefetch", "train.device",
                     "train.compile", "train.keep_optimizer", "train.max_steps", "train.log_every",
                     "train.ckpt_every", "train.keep_every", "train.nonfinite", "train.dist_timeout_s", "monitor")


def config_differences(old: dict, new: PretrainConfig) -> list[str]:
    """``key: old -> new`` for every key that differs and would make a different run (a key the old config lacks
    counts as its default; a loss key the new run's loss does not take is not compared: no loss read it)."""
    old = dict(old)
    if isinstance(old.get("loss"), Mapping):
        keys = {f.name for f in dataclasses.fields(new.loss)}
        old["loss"] = {k: v for k, v in old["loss"].items() if k in keys}
    default = dataclasses.replace(PretrainConfig(), loss=type(new.loss)())
    return ctbench_config.config_differences(old, new, RESUMABLE_CHANGES, default=default)


def config_keys() -> dict[str, list[str]]:
    """Section -> its keys (for --help); the loss section's keys per loss."""
    hints = typing.get_type_hints(PretrainConfig)
    keys = {name: [f.name for f in dataclasses.fields(tp)]
            for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    keys["loss"] = ["name"] + [f"{name} ({', '.join(loss_config(name)().hparams())})" for name in LOSSES]
    return keys
