"""The ``protocol`` entry of a linear-probe or semi-supervised record: the original evaluation the run follows and how
it departs from it.

    rec.data["protocol"] = linear_protocol(cfg, world_size=1, precision="fp32", complete=True, steps=40, total=40)
    # {"recipe": "MoCo linear classification: facebookresearch/moco@132aea9 main_lincls.py ...",
    #  "deviations": ["toy scale", "1 process (recipe: 8 GPUs)", "cached features: centre crop", "+bn head",
    #                 "100 -> 10 epochs", "milestones [60, 80] -> [6, 8]", "lr 30 -> 0.01",
    #                 "data.image_size 224 -> 64"]}

The recipe's values are those of the full-scale preset it names (each value cites its source there; for a baseline
checkpoint of the semi-supervised evaluation, with that baseline's setting), so the deviations are the run's
differences from that preset, in a fixed order and wording: scale, precision, world size, BN, probe mode, head
normalisation, subset list, epochs, milestones, early stop, batch and lr, head lr multiplier, then every other
setting that changes the result as ``key recipe -> run``. Seeds, paths, devices, timings and logging settings are not
protocol: two trials of one protocol get equal lists. An empty list is exactly the published evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctbench.config import flatten, fmt_value, to_dict, under
from transfer.classify.config import LINEAR_PRESETS, RESUMABLE_CHANGES, LinearConfig, SemisupConfig, resolve


@dataclass(frozen=True)
class Recipe:
    text: str  # the original evaluation, with its source
    gpus: int  # processes it ran on


LINEAR_RECIPES = {
    "moco": Recipe("MoCo linear classification: facebookresearch/moco@132aea9 main_lincls.py (frozen backbone, "
                   "lr 30, batch 256, 100 epochs, x0.1 at 60 and 80, 8 GPUs; reports best_acc1, the best top-1 over "
                   "the epochs)", 8),
    "selfsup": Recipe("SiMo linear evaluation: V2AI/SelfSup@29f7d33 examples/simo/"
                      "simo.res50.scratch.imagenet.224size.256bs.200e.lin_cls/config.py (cvpods; frozen backbone, "
                      "lr 30, batch 256, 90 epochs, x0.1 at 60 and 80, 8 GPUs x 32; reports the last top-1)", 8),
}
SEMISUP_GPUS = 4  # OpenSelfSup benchmarks/dist_train_semi.sh: GPUS=4 ("in the standard setting"), 64 images each
# OpenSelfSup's config file per baseline; None = the default setting of every method it evaluates
SEMISUP_CONFIGS = {None: {1: "r50_lr0_01_head100.py", 10: "r50_lr0_01_head100.py"},
                   "random": {1: "r50_lr0_01_head1.py", 10: "r50_lr0_01_head1.py"},
                   "supervised": {1: "r50_lr0_001_head100.py", 10: "r50_lr0_001_head10.py"}}

_NOT_PROTOCOL = ("protocol", "recipe", "scale", "mode", "cache", "head", "pct", "subset", "sync_bn", "train.seed",
                 "train.precision", "train.channels_last")
_WORDED = ("train.epochs", "train.batch_size", "optim.lr", "optim.lr_batch", "optim.milestones", "optim.head_lr_mult")


def semisup_recipe(pct: int, baseline: str | None) -> str:
    conf = SEMISUP_CONFIGS[baseline][pct]
    which = {None: "", "random": "; random-init baseline at its best setting (MODEL_ZOO.md)",
             "supervised": "; supervised torchvision baseline at its best setting (MODEL_ZOO.md)"}[baseline]
    wd = "5e-4" if pct == 1 else "1e-4"
    return (f"OpenSelfSup semi-supervised {pct} %: open-mmlab/OpenSelfSup@1db69ec configs/benchmarks/"
            f"semi_classification/imagenet_{pct}percent/{conf} (SimCLR's {pct}percent.txt, all layers fine-tuned, "
            f"SyncBN, 4 GPUs x 64, 20 epochs, x0.2 at 12 and 16, wd {wd}; top-1 / top-5 after the last epoch"
            f"{which})")


def _skip(key: str) -> bool:
    return under(key, (*RESUMABLE_CHANGES, *_NOT_PROTOCOL, *_WORDED))


def _processes(world_size: int, gpus: int) -> list[str]:
    if world_size == gpus:
        return []
    return [f"{world_size} process{'es' if world_size > 1 else ''} (recipe: {gpus} GPUs)"]


def _schedule(cfg, ref, *, complete: bool, steps: int, total: int) -> list[str]:
    """Epochs, milestones, an early stop, batch, lr (at the run's batch) and the head lr multiplier."""
    dev: list[str] = []
    if cfg.train.epochs != ref.train.epochs:
        dev.append(f"{ref.train.epochs} -> {cfg.train.epochs} epochs")
    if list(cfg.optim.milestones) != list(ref.optim.milestones):
        dev.append(f"milestones {fmt_value(list(ref.optim.milestones))} -> {fmt_value(list(cfg.optim.milestones))}")
    if not complete:
        dev.append(f"stopped at step {steps} of {total}")
    if cfg.train.batch_size != ref.train.batch_size:
        dev.append(f"batch {ref.train.batch_size} -> {cfg.train.batch_size}")
    lr = cfg.optim.lr * cfg.train.batch_size / cfg.optim.lr_batch
    ref_lr = ref.optim.lr * ref.train.batch_size / ref.optim.lr_batch
    if abs(lr - ref_lr) > 1e-12 * ref_lr:
        dev.append(f"lr {ref_lr:g} -> {lr:g}")
    if cfg.optim.head_lr_mult != ref.optim.head_lr_mult:
        dev.append(f"head lr x{ref.optim.head_lr_mult:g} -> x{cfg.optim.head_lr_mult:g}")
    return dev


def _others(cfg, ref) -> list[str]:
    run, base = flatten(to_dict(cfg)), flatten(to_dict(ref))
    return [f"{k} {fmt_value(base.get(k))} -> {fmt_value(run[k])}" for k in sorted(run)
            if not _skip(k) and run[k] != base.get(k)]


def _precision(precision: str) -> list[str]:
    return [] if precision == "fp32" else [f"{precision} autocast"]


def linear_reference(recipe: str) -> LinearConfig:
    """The full-scale config of a linear-probe recipe (``moco``, ``selfsup``)."""
    return resolve(LinearConfig, LINEAR_PRESETS[recipe], "full")


def linear_protocol(cfg: LinearConfig, *, world_size: int, precision: str, complete: bool, steps: int,
                    total: int) -> dict:
    """``{"recipe", "deviations"}`` of a linear probe of ``cfg`` on ``world_size`` processes at ``precision`` (fp32,
    bf16: the backbone's forward) that ran ``steps`` of ``total`` steps."""
    recipe = LINEAR_RECIPES[cfg.recipe]
    ref = linear_reference(cfg.recipe)
    dev = ["toy scale"] if cfg.scale == "toy" else []
    dev += _precision(precision)
    dev += _processes(world_size, recipe.gpus)
    if cfg.mode == "cached":
        what = "centre crop" if cfg.cache.views == 0 else f"{cfg.cache.views} view{'s' if cfg.cache.views > 1 else ''}"
        dev.append(f"cached features: {what}" + ("" if cfg.cache.dtype == "float32" else f", {cfg.cache.dtype}"))
    if cfg.head.norm == "bn":
        dev.append("+bn head")
    dev += _schedule(cfg, ref, complete=complete, steps=steps, total=total)
    dev += _others(cfg, ref)
    return {"recipe": recipe.text, "deviations": dev}


def semisup_reference(pct: int, baseline: str | None) -> SemisupConfig:
    """The full-scale config of the semi-supervised recipe at ``pct`` for a checkpoint of kind ``baseline``."""
    return resolve(SemisupConfig, f"semisup_{pct}pct", "full", fixed={"pct": pct}, baseline=baseline)


def semisup_protocol(cfg: SemisupConfig, *, world_size: int, precision: str, sync_bn: bool, subset: dict,
                     baseline: str | None, complete: bool, steps: int, total: int) -> dict:
    """``{"recipe", "deviations"}`` of a fine-tuning of ``cfg`` on ``world_size`` processes at ``precision``, with
    SyncBN (``sync_bn``) or per-process BN, on the labelled list described by ``subset`` (the record's ``subset``
    entry: ``source`` simclr / generated / given), from a checkpoint of kind ``baseline`` (random, supervised,
    None)."""
    ref = semisup_reference(cfg.pct, baseline)
    dev = ["toy scale"] if cfg.scale == "toy" else []
    dev += _precision(precision)
    dev += _processes(world_size, SEMISUP_GPUS)
    if world_size > 1 and not sync_bn:  # on one process BN over the whole batch is what SyncBN over 4 x 64 computes
        dev.append(f"per-process BN over {cfg.train.batch_size // world_size} images (recipe: SyncBN)")
    if subset["source"] == "generated":
        dev.append(f"subset: generated (seed {subset['seed']})")
    elif subset["source"] == "given":
        dev.append(f"subset: given {subset['name']} ({subset['sha256'].replace('sha256:', 'sha256 ')[:15]})")
    dev += _schedule(cfg, ref, complete=complete, steps=steps, total=total)
    dev += _others(cfg, ref)
    return {"recipe": semisup_recipe(cfg.pct, baseline), "deviations": dev}
