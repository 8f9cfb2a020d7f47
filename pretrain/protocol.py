"""The ``protocol`` entry of a pretraining record: the method's original recipe and how this run departs from it.

    rec.data["protocol"] = protocol(cfg, world_size=1, shuffle_bn="split", bn_splits=8, precision="bf16",
                                    stop_at=62, total_steps=62)
    # {"recipe": "MoCo v2: facebookresearch/moco@132aea9 main_moco.py ...",
    #  "deviations": ["toy scale", "bf16 autocast", "1 process (recipe: 8 GPUs)",
    #                 "1 process: split-BN in 8 sub-batches (queries and keys)", ...]}

The recipe's values are those of the method's full-scale preset (each names its source), so the deviations are
the run's differences from that preset, in a fixed order and wording: scale, precision, world size, BN emulation,
queue initialisation, zero-init, epochs, early stop, batch and lr, then every other setting that changes the
result as ``key recipe -> run``. Seeds, paths, devices, timings and logging settings are not protocol: two trials
of one protocol get equal lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctbench.config import to_dict
from pretrain.config import RESUMABLE_CHANGES, PretrainConfig, resolve_config


@dataclass(frozen=True)
class Recipe:
    text: str  # the original recipe, with its source
    gpus: int  # processes the recipe ran on
    bn: str  # "shuffle": per-GPU BN + shuffle-BN of the keys (MoCo); "global": synchronised BN, no shuffle (SiMo)


RECIPES = {
    "moco_v1": Recipe("MoCo v1: facebookresearch/moco@132aea9 main_moco.py defaults (8 GPUs, batch 256, lr 0.03, "
                      "200 epochs, x0.1 at 120 and 160)", 8, "shuffle"),
    "moco_v2": Recipe("MoCo v2: facebookresearch/moco@132aea9 main_moco.py --mlp --moco-t 0.2 --aug-plus --cos "
                      "(8 GPUs, batch 256, lr 0.03, 200 epochs)", 8, "shuffle"),
    "jcl": Recipe("JCL, the paper's setting: Cai et al. 2020 (arXiv:2009.14776) on MoCo v2, M 5, lambda 4, "
                  "batch 512 on 8 GPUs, lr 0.06, 200 epochs", 8, "shuffle"),
    "jcl_official": Recipe("JCL, the official script: caiqi/Joint-Contrastive-Learning@1cefabb "
                           "scripts/main_pretrain.sh (--lr 0.03 --batch-size 256 --k_crops 5 --jcl_lambda 2.0 "
                           "--epochs 200, 8 GPUs)", 8, "shuffle"),
    "eqco": Recipe("EqCo: Zhu et al. 2020 (arXiv:2010.01929) on MoCo v2, K 256, alpha 65536 (8 GPUs, batch 256)",
                   8, "shuffle"),
    "simo": Recipe("SiMo: V2AI/SelfSup@29f7d33 examples/simo/simo.res50.scratch.imagenet.224size.256bs.200e "
                   "(cvpods; 8 GPUs x 32, SyncBN everywhere, no shuffle, 200 epochs)", 8, "global"),
    "co2": Recipe("CO2: Wei et al. 2021 (arXiv:2010.02217) on MoCo v2 (8 GPUs, batch 256; alpha 1 and tau_con 0.05 "
                  "unverified)", 8, "shuffle"),
    "co2_moco_v1": Recipe("CO2: Wei et al. 2021 (arXiv:2010.02217) on MoCo v1 (MoCo v1's recipe, 8 GPUs, batch 256; "
                          "alpha 1 and tau_con 0.05 unverified)", 8, "shuffle"),
}

# settings that are not protocol (besides RESUMABLE_CHANGES), and those worded by protocol() itself
_NOT_PROTOCOL = ("method", "scale", "train.seed", "train.precision", "train.channels_last")
_WORDED = ("model.shuffle_bn", "model.bn_splits", "model.sync_bn", "model.queue_init", "model.zero_init_residual",
           "train.epochs", "train.batch_size", "optim.lr", "optim.lr_batch")


def _fmt(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _skip(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*RESUMABLE_CHANGES, *_NOT_PROTOCOL, *_WORDED))


def protocol(cfg: PretrainConfig, *, world_size: int, shuffle_bn: str, bn_splits: int, precision: str,
             stop_at: int, total_steps: int) -> dict:
    """``{"recipe": ..., "deviations": [...]}`` for a run of ``cfg`` on ``world_size`` processes, with the BN mode
    the engine resolved (``shuffle_bn`` in ddp/split/off, ``bn_splits`` sub-batches), ``precision`` (fp32, bf16,
    fp16) and the step it stops at out of the schedule's ``total_steps``."""
    recipe = RECIPES[cfg.method]
    ref = resolve_config(cfg.method, "full")
    dev: list[str] = []
    if cfg.scale == "toy":
        dev.append("toy scale")
    if precision != "fp32":
        dev.append(f"{precision} autocast")
    if world_size != recipe.gpus:
        dev.append(f"{world_size} process{'es' if world_size > 1 else ''} (recipe: {recipe.gpus} GPUs)")
    local, recipe_local = cfg.train.batch_size // world_size, ref.train.batch_size // recipe.gpus
    if cfg.model.sync_bn:
        if recipe.bn != "global" and world_size > 1:
            dev.append("global BN, no shuffle (recipe: per-GPU BN + shuffle-BN)")
        elif recipe.bn != "global":
            dev.append("BN over the whole batch, no shuffle (recipe: per-GPU BN + shuffle-BN)")
    elif shuffle_bn == "split" and bn_splits > 1:
        dev.append(f"1 process: split-BN in {bn_splits} sub-batches (queries and keys)"
                   + (" (recipe: global BN)" if recipe.bn == "global" else ""))
    elif recipe.bn == "global" and world_size > 1:
        dev.append(f"per-process BN over {local} images (recipe: global BN)")
    elif recipe.bn == "shuffle" and shuffle_bn == "off":
        dev.append(f"BN over {local} images, no shuffle (recipe: per-GPU BN over {recipe_local} + shuffle-BN)")
    elif recipe.bn == "shuffle" and world_size > 1 and local != recipe_local:
        dev.append(f"per-process BN over {local} images (recipe: {recipe_local})")
    if cfg.model.queue_size > 0 and cfg.model.queue_init != ref.model.queue_init:
        dev.append(f"queue initialised with {cfg.model.queue_init} (recipe: {ref.model.queue_init})")
    if cfg.model.zero_init_residual != ref.model.zero_init_residual:
        dev.append("zero-init residuals (recipe: none)" if cfg.model.zero_init_residual
                   else "no zero-init residuals (recipe: zero-init)")
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
    run, base = _flat(to_dict(cfg)), _flat(to_dict(ref))
    for key in sorted(run):
        if not _skip(key) and run[key] != base.get(key):
            dev.append(f"{key} {_fmt(base.get(key))} -> {_fmt(run[key])}")
    return {"recipe": recipe.text, "deviations": dev}
