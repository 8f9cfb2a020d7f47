"""Task configs: ``transfer/configs/<task>.yaml`` (+ ``toy.yaml``) + command-line ``KEY VALUE`` pairs, then the
adaptations to the number of processes and the device, each one logged and recorded as a protocol deviation.

Every task is written as MoCo ran it: 8 GPUs x 2 images (``SOLVER.IMS_PER_BATCH 16``, ``BASE_LR 0.02``), BN
synchronised over the 8 GPUs. ``IMS_PER_BATCH`` is detectron2's total batch, so on any number of processes the
default keeps MoCo's batch of 16, lr and schedule (``SOLVER.REFERENCE_WORLD_SIZE`` 0: nothing is rescaled):

- one process (one GPU, or the CPU): all 16 images on that worker, and the synchronised norms become ``BN``: a single
  worker has nothing to synchronise with, and BN over its 16 images is what naiveSyncBN computes over 8 x 2.
- ``--linear-scaling`` (opt-in): keep MoCo's 2 images per worker instead, with detectron2's ``auto_scale_workers``
  from 8 workers: on one process batch 16 -> 2, lr 0.02 -> 0.0025, iterations, steps and warm-up x 8 (VOC 24k ->
  192k), BN over 2 images, the regime MoCo's synchronised BN avoids. For a GPU that cannot hold 16 images: a CUDA
  out-of-memory error at batch 16 says so in one line (``transfer.detection.train``).
- a config that sets ``SOLVER.REFERENCE_WORLD_SIZE`` N > 0 (``toy.yaml``: 1) is read as written for N workers and
  scaled to the world size here (before, detectron2's trainer did it without the record knowing).
- several processes on CPU: ``SyncBN`` -> ``naiveSyncBN`` (``nn.SyncBatchNorm`` needs GPUs; detectron2's
  ``NaiveSyncBatchNorm`` all-reduces over gloo).
- no GPU: ``MODEL.DEVICE cpu``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer

from ctbench.errors import UserError, choices_error
from transfer.detection.sem_seg import add_sem_seg_config, is_sem_seg_file
from transfer.tasks import TASK_INFO, TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TOY = CONFIG_DIR / "toy.yaml"
TOY_SEM_SEG = CONFIG_DIR / "toy_seg.yaml"  # the toy override of a segmentation config (toy.yaml sizes detection)
MOCO_WORLD_SIZE = 8  # MoCo's detection runs: 8 GPUs x 2 images
_SYNC_NORMS = ("SyncBN", "naiveSyncBN", "nnSyncBN")
# Keys whose value does not change a run's numbers: a command-line override of them is no protocol deviation.
# (MODEL.WEIGHTS is what is evaluated, the run name says which; SOLVER.REFERENCE_WORLD_SIZE and MODEL.DEVICE are
# recorded by adapt(), as the scaling they cause and "CPU".)
NOT_PROTOCOL = {"OUTPUT_DIR", "SEED", "MODEL.WEIGHTS", "MODEL.DEVICE", "SOLVER.REFERENCE_WORLD_SIZE",
                "SOLVER.CHECKPOINT_PERIOD", "DATALOADER.NUM_WORKERS", "VIS_PERIOD", "TEST.EVAL_PERIOD"}
log = logging.getLogger("transfer.detection")


@dataclass
class Adaptation:
    """What :func:`adapt` changed: ``notes`` for the log, ``deviations`` for the record's ``protocol``."""

    notes: list[str] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)


def config_file(task: str) -> Path:
    if task not in TASK_INFO:
        raise choices_error("task", task, TASKS)
    return CONFIG_DIR / f"{task}.yaml"


def split_opts(opts: list[str]) -> list[tuple[str, str]]:
    if len(opts) % 2:
        raise UserError(f"config overrides come in KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    return list(zip(opts[0::2], opts[1::2]))


def load_config(config: str | Path, *, toy: bool, opts: list[str]) -> CfgNode:
    """``config`` + (``toy.yaml``, or ``toy_seg.yaml`` for a segmentation config) + ``opts``, with one-line errors
    for unknown keys or bad values. A segmentation config (``MODEL.META_ARCHITECTURE: SemanticSegmentor``) gets the
    keys of :func:`transfer.detection.sem_seg.add_sem_seg_config` first; detection configs are detectron2's alone."""
    cfg = get_cfg()
    sem_seg = is_sem_seg_file(config)
    if sem_seg:
        add_sem_seg_config(cfg)
    try:
        cfg.merge_from_file(str(config))
        if toy:
            cfg.merge_from_file(str(TOY_SEM_SEG if sem_seg else TOY))
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        msg = str(e).strip("'\"") or type(e).__name__
        raise UserError(f"bad config override or file ({config}): {msg}") from None
    return cfg


def adapt(cfg: CfgNode, world_size: int, user_keys: set[str], *, linear_scaling: bool = False) -> Adaptation:
    """Adapt ``cfg`` (in place) to ``world_size`` processes and the device (see the module docstring)."""
    out = Adaptation()
    if world_size != MOCO_WORLD_SIZE:
        out.deviations.append(f"{world_size} process{'es' if world_size > 1 else ''} (recipe: {MOCO_WORLD_SIZE} GPUs)")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        out.notes.append("no GPU: MODEL.DEVICE cpu")
    if cfg.MODEL.DEVICE == "cpu":  # (so, not in override_deviations: NOT_PROTOCOL)
        out.deviations.append("CPU (recipe: GPUs)")
    swap = "BN" if world_size == 1 else "naiveSyncBN" if cfg.MODEL.DEVICE == "cpu" else None
    if swap is not None:
        changed = _swap_norm(cfg, swap)
        why = "one process" if world_size == 1 else f"{world_size} processes on CPU (gloo)"
        for old in dict.fromkeys(o for _, o in changed):
            keys = ", ".join(k for k, o in changed if o == old)
            out.notes.append(f"{why}: {keys} {old} -> {swap}")
            out.deviations.append(f"{old} -> {swap} ({keys})")
    if linear_scaling:
        if "SOLVER.REFERENCE_WORLD_SIZE" in user_keys or cfg.SOLVER.REFERENCE_WORLD_SIZE:
            raise UserError(f"--linear-scaling scales from MoCo's {MOCO_WORLD_SIZE} workers, but the config is already "
                            f"written for SOLVER.REFERENCE_WORLD_SIZE {cfg.SOLVER.REFERENCE_WORLD_SIZE} worker(s)"
                            + (" (toy.yaml)" if cfg.SOLVER.REFERENCE_WORLD_SIZE == 1 else "") + "; drop one of them")
        if cfg.SOLVER.IMS_PER_BATCH % MOCO_WORLD_SIZE:
            raise UserError(f"--linear-scaling needs SOLVER.IMS_PER_BATCH divisible by MoCo's {MOCO_WORLD_SIZE} "
                            f"workers, got {cfg.SOLVER.IMS_PER_BATCH}")
        cfg.SOLVER.REFERENCE_WORLD_SIZE = MOCO_WORLD_SIZE
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference not in (0, world_size):
        before = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER)
        try:
            cfg.merge_from_other_cfg(DefaultTrainer.auto_scale_workers(cfg, world_size))
        except AssertionError:
            raise UserError(f"SOLVER.IMS_PER_BATCH {before[0]} is not divisible by SOLVER.REFERENCE_WORLD_SIZE "
                            f"{reference}") from None
        after = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER)
        what = (f"batch {before[0]} -> {after[0]}, lr {before[1]:g} -> {after[1]:g}, "
                f"{iters(before[2])} -> {iters(after[2])} iters")
        source = "--linear-scaling" if linear_scaling else "SOLVER.REFERENCE_WORLD_SIZE"
        out.notes.append(f"{source}: linear scaling from {reference} to {world_size} worker(s): {what}, steps "
                         f"{tuple(cfg.SOLVER.STEPS)}, warm-up {cfg.SOLVER.WARMUP_ITERS}")
        if reference == MOCO_WORLD_SIZE:
            out.deviations.append(f"linear scaling from {reference} GPUs: {what}")
        else:  # a config written for another world size (toy.yaml's 1 worker) run on this many
            out.deviations.append(f"linear scaling from {reference} to {world_size} workers: {what}")
    elif world_size != MOCO_WORLD_SIZE and not reference:
        out.notes.append(f"{world_size} process{'es' if world_size > 1 else ''}: batch {cfg.SOLVER.IMS_PER_BATCH} "
                         f"({cfg.SOLVER.IMS_PER_BATCH // world_size} per process), lr {cfg.SOLVER.BASE_LR:g}, "
                         f"{iters(cfg.SOLVER.MAX_ITER)} iterations, not rescaled (--linear-scaling: "
                         f"{cfg.SOLVER.IMS_PER_BATCH // MOCO_WORLD_SIZE} per process as MoCo's 8 GPUs, lr and "
                         "schedule scaled)")
    return out


def can_scale_linearly(cfg: CfgNode, world_size: int, user_keys: set[str]) -> bool:
    """Whether ``--linear-scaling`` would give this run a smaller per-process batch (what an OOM message offers)."""
    return (world_size < MOCO_WORLD_SIZE and not cfg.SOLVER.REFERENCE_WORLD_SIZE
            and "SOLVER.REFERENCE_WORLD_SIZE" not in user_keys and cfg.SOLVER.IMS_PER_BATCH % MOCO_WORLD_SIZE == 0)


def oom_message(cfg: CfgNode, world_size: int, offer_linear_scaling: bool) -> str:
    """The one line a CUDA out-of-memory error in training becomes."""
    per = cfg.SOLVER.IMS_PER_BATCH // world_size
    fix = (f"rerun with --linear-scaling (MoCo's {cfg.SOLVER.IMS_PER_BATCH // MOCO_WORLD_SIZE} images per GPU, lr "
           "and schedule scaled linearly, BN over those images only) or on more GPUs (--num-gpus)"
           if offer_linear_scaling else "lower SOLVER.IMS_PER_BATCH (and the lr with it) or use more GPUs (--num-gpus)")
    return (f"CUDA out of memory training with {per} images per GPU (SOLVER.IMS_PER_BATCH "
            f"{cfg.SOLVER.IMS_PER_BATCH} on {world_size} process{'es' if world_size > 1 else ''}); {fix}")


def override_deviations(base: CfgNode, cfg: CfgNode, keys: list[str]) -> list[str]:
    """The command-line overrides ``keys`` (in order) that change ``base`` (the config they were merged into), in
    words: ``24k -> 2 iters``, ``lr 0.02 -> 0.01``, ``KEY old -> new``; keys that change no number are left out."""
    out = []
    for key in dict.fromkeys(keys):
        if key in NOT_PROTOCOL:
            continue
        old, new = _get(base, key), _get(cfg, key)
        if old == new:
            continue
        if key == "SOLVER.MAX_ITER":
            out.append(f"{iters(old)} -> {iters(new)} iters")
        elif key == "SOLVER.STEPS":
            out.append(f"steps {'/'.join(map(iters, old)) or 'none'} -> {'/'.join(map(iters, new)) or 'none'}")
        elif key == "SOLVER.WARMUP_ITERS":
            out.append(f"warm-up {old} -> {new}")
        elif key == "SOLVER.BASE_LR":
            out.append(f"lr {old:g} -> {new:g}")
        elif key == "SOLVER.IMS_PER_BATCH":
            out.append(f"batch {old} -> {new}")
        else:
            out.append(f"{key} {_show(old)} -> {_show(new)}")
    return out


def iters(n: int) -> str:
    """``24000`` -> ``24k``, ``180000`` -> ``180k``, ``8`` -> ``8``."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _get(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _show(value) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def _swap_norm(node: CfgNode, to: str, prefix: str = "") -> list[tuple[str, str]]:
    """Set every synchronised ``NORM`` under ``node`` to ``to``; returns ``(key, old value)`` of each one changed."""
    changed = []
    for key, value in node.items():
        if isinstance(value, CfgNode):
            changed += _swap_norm(value, to, f"{prefix}{key}.")
        elif key == "NORM" and value in _SYNC_NORMS and value != to:
            node[key] = to
            changed.append((f"{prefix}{key}", value))
    return changed
