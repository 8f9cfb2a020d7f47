"""The ``protocol`` entry of a pretraining record: the method's original recipe and how this run departs from it.

    rec.data["protocol"] = protocol(cfg, world_size=1, shuffle_bn="split", bn_splits=8, precision="bf16",
                                    stop_at=62, total_steps=62)
    # {"recipe": "MoCo v2: facebookresearch/moco@132aea9 main_moco.py ...",
    #  "deviations": ["toy scale", "bf16 autocast", "1 process (recipe: 8 GPUs)",
    #                 "1 process: split-BN in 8 sub-batches (queries and keys)", ...]}

The recipe is the ``recipe:`` of the method's preset and its values those of the full-scale preset (each names its
source), so the deviations are
the run's differences from that preset, in a fixed order and wording: scale, precision, world size, BN emulation,
queue initialisation, zero-init, epochs, early stop, batch and lr, then every other setting that changes the
result as ``key recipe -> run``. Seeds, paths, devices, timings and logging settings are not protocol: two trials
of one protocol get equal lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctbench.config import flatten, fmt_value, read_yaml, to_dict, under
from ctbench.errors import UserError
from pretrain.config import RESUMABLE_CHANGES, PretrainConfig, preset_path, resolve_config
from pretrain.model import effective_residual_gamma


@dataclass(frozen=True)
class Recipe:
    text: str  # the original recipe, with its source
    gpus: int = 8  # processes the recipe ran on
    bn: str = "shuffle"  # "shuffle": per-GPU BN + shuffle-BN of the keys (MoCo); "global": synchronised BN (SiMo)


def recipe(method: str) -> Recipe:
    """The ``recipe:`` of the method's preset (``text``, ``gpus``, ``bn``; inherited through ``_base_``)."""
    path = preset_path(method)
    raw = read_yaml(path).get("recipe")
    if not isinstance(raw, dict) or not raw.get("text"):
        raise UserError(f"{path} has no recipe: text (the original recipe its runs cite, with its source); add a "
                        "'recipe: {text: ...}' mapping to the preset")
    try:
        return Recipe(**raw)
    except TypeError as e:
        raise UserError(f"{path}: recipe takes text, gpus and bn ({e})") from None


# settings that are not protocol (besides RESUMABLE_CHANGES), and those worded by protocol() itself
_NOT_PROTOCOL = ("method", "scale", "train.seed", "train.precision", "train.channels_last")
_WORDED = ("model.shuffle_bn", "model.bn_splits", "model.sync_bn", "model.queue_init", "model.zero_init_residual",
           "model.residual_gamma", "train.epochs", "train.batch_size", "optim.lr", "optim.lr_batch")


def init_deviation(gamma: float, ref_gamma: float) -> str | None:
    """How a run's residual-branch init (γ of the bottlenecks' last BN) departs from the recipe's, or None."""
    if gamma == ref_gamma:
        return None
    if gamma == 0 and ref_gamma == 1:
        return "zero-init residuals (recipe: none)"
    if gamma == 1 and ref_gamma == 0:
        return "no zero-init residuals (recipe: zero-init)"
    ref = "zero-init" if ref_gamma == 0 else "torchvision's 1" if ref_gamma == 1 else f"{ref_gamma:g}"
    return f"residual branches' last BN γ {gamma:g} at init (recipe: {ref})"


def _skip(key: str) -> bool:
    return under(key, (*RESUMABLE_CHANGES, *_NOT_PROTOCOL, *_WORDED))


def protocol(cfg: PretrainConfig, *, world_size: int, shuffle_bn: str, bn_splits: int, precision: str,
             stop_at: int, total_steps: int) -> dict:
    """``{"recipe": ..., "deviations": [...]}`` for a run of ``cfg`` on ``world_size`` processes, with the BN mode
    the engine resolved (``shuffle_bn`` in ddp/split/off, ``bn_splits`` sub-batches), ``precision`` (fp32, bf16,
    fp16) and the step it stops at out of the schedule's ``total_steps``."""
    original = recipe(cfg.method)
    ref = resolve_config(cfg.method, "full")
    dev: list[str] = []
    if cfg.scale == "toy":
        dev.append("toy scale")
    if precision != "fp32":
        dev.append(f"{precision} autocast")
    if world_size != original.gpus:
        dev.append(f"{world_size} process{'es' if world_size > 1 else ''} (recipe: {original.gpus} GPUs)")
    local, recipe_local = cfg.train.batch_size // world_size, ref.train.batch_size // original.gpus
    if cfg.model.sync_bn:
        if original.bn != "global" and world_size > 1:
            dev.append("global BN, no shuffle (recipe: per-GPU BN + shuffle-BN)")
        elif original.bn != "global":
            dev.append("BN over the whole batch, no shuffle (recipe: per-GPU BN + shuffle-BN)")
    elif shuffle_bn == "split" and bn_splits > 1:
        dev.append(f"1 process: split-BN in {bn_splits} sub-batches (queries and keys)"
                   + (" (recipe: global BN)" if original.bn == "global" else ""))
    elif original.bn == "global" and world_size > 1:
        dev.append(f"per-process BN over {local} images (recipe: global BN)")
    elif original.bn == "shuffle" and shuffle_bn == "off":
        dev.append(f"BN over {local} images, no shuffle (recipe: per-GPU BN over {recipe_local} + shuffle-BN)")
    elif original.bn == "shuffle" and world_size > 1 and local != recipe_local:
        dev.append(f"per-process BN over {local} images (recipe: {recipe_local})")
    if cfg.model.queue_size > 0 and cfg.model.queue_init != ref.model.queue_init:
        dev.append(f"queue initialised with {cfg.model.queue_init} (recipe: {ref.model.queue_init})")
    init = init_deviation(*(effective_residual_gamma(c.model.zero_init_residual, c.model.residual_gamma)
                            for c in (cfg, ref)))
    if init:
        dev.append(init)
    if cfg.train.epochs != ref.train.epochs:
        dev.append(f"{ref.train.epochs} -> {cfg.train.epochs} epochs")
    if stop_at < total_steps:
        dev.append(f"stopped at step {stop_at} of {total_steps}")
    if cfg.train.batch_size != ref.train.batch_size:
        dev.append(f"batch {ref.train.batch_size} -> {cfg.train.batch_size}")
    lr = cfg.optim.lr * cfg.train.batch_size / cfg.optim.lr_batch
    ref_lr = ref.optim.lr * ref.train.batch_size / ref.optim.lr_batch
    if abs(lr - ref_lr) > 1e-12 * ref_lr:
        dev.append(f"lr {ref_lr:g} -> {lr:g}")
    run, base = flatten(to_dict(cfg)), flatten(to_dict(ref))
    for key in sorted(run):
        if not _skip(key) and run[key] != base.get(key):
            dev.append(f"{key} {fmt_value(base.get(key))} -> {fmt_value(run[key])}")
    return {"recipe": original.text, "deviations": dev}
