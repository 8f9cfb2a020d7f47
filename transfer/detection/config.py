"""Task configs: ``transfer/configs/<task>.yaml`` (+ ``toy.yaml``) + command-line ``KEY VALUE`` pairs, then the
adaptations to the number of processes and the device, each one logged.

- one process: SyncBN -> BN (a single worker has nothing to synchronize with), and unless the command line sets
  ``SOLVER.REFERENCE_WORLD_SIZE``, the config is read as written for MoCo's 8 workers and scaled linearly to one
  with detectron2's ``auto_scale_workers``: images per batch / 8, lr / 8, iterations, steps and warm-up x 8
  (batch 16 -> 2, lr 0.02 -> 0.0025, VOC 24k -> 192k iterations). ``SOLVER.REFERENCE_WORLD_SIZE 1`` keeps the
  written batch on one worker (BN over 16 images on one GPU is what SyncBN over 8 x 2 computes).
- several processes on CPU: SyncBN -> naiveSyncBN (``nn.SyncBatchNorm`` needs GPUs; detectron2's
  ``NaiveSyncBatchNorm`` all-reduces over gloo).
- no GPU: ``MODEL.DEVICE cpu``.

The toy override (``toy.yaml``) is already written for one worker (``REFERENCE_WORLD_SIZE: 1``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer

from ctbench.errors import UserError, choices_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("voc_det", "coco_det", "coco_mask", "coco_det_c4", "coco_mask_c4", "coco_det_c4_2x", "coco_mask_c4_2x",
         "coco_kp")
TOY = CONFIG_DIR / "toy.yaml"
MOCO_WORLD_SIZE = 8  # MoCo's detection runs: 8 GPUs x 2 images
_SYNC_NORMS = ("SyncBN", "naiveSyncBN", "nnSyncBN")
log = logging.getLogger("transfer.detection")


def config_file(task: str) -> Path:
    if task not in TASKS:
        raise choices_error("task", task, TASKS)
    return CONFIG_DIR / f"{task}.yaml"


def split_opts(opts: list[str]) -> list[tuple[str, str]]:
    if len(opts) % 2:
        raise UserError(f"config overrides come in KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    return list(zip(opts[0::2], opts[1::2]))


def load_config(config: str | Path, *, toy: bool, opts: list[str]) -> CfgNode:
    """``config`` + (``toy.yaml``) + ``opts``, with one-line errors for unknown keys or bad values."""
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(config))
        if toy:
            cfg.merge_from_file(str(TOY))
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        msg = str(e).strip("'\"") or type(e).__name__
        raise UserError(f"bad config override or file ({config}): {msg}") from None
    return cfg


def adapt(cfg: CfgNode, world_size: int, user_keys: set[str]) -> list[str]:
    """Adapt ``cfg`` (in place) to ``world_size`` processes and the device; returns what was changed, in words."""
    notes: list[str] = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        notes.append("no GPU: MODEL.DEVICE cpu")
    swap = "BN" if world_size == 1 else "naiveSyncBN" if cfg.MODEL.DEVICE == "cpu" else None
    if swap is not None:
        changed = _swap_norm(cfg, swap)
        if changed:
            why = "one process" if world_size == 1 else f"{world_size} processes on CPU (gloo)"
            notes.append(f"{why}: {', '.join(changed)} SyncBN -> {swap}")
    if (world_size == 1 and "SOLVER.REFERENCE_WORLD_SIZE" not in user_keys and cfg.SOLVER.REFERENCE_WORLD_SIZE == 0
            and cfg.SOLVER.IMS_PER_BATCH % MOCO_WORLD_SIZE == 0):
        before = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER)
        cfg.SOLVER.REFERENCE_WORLD_SIZE = MOCO_WORLD_SIZE
        cfg.merge_from_other_cfg(DefaultTrainer.auto_scale_workers(cfg, 1))
        notes.append(
            f"one process: linear scaling from MoCo's {MOCO_WORLD_SIZE} workers: batch {before[0]} -> "
            f"{cfg.SOLVER.IMS_PER_BATCH}, lr {before[1]:g} -> {cfg.SOLVER.BASE_LR:g}, iterations {before[2]} -> "
            f"{cfg.SOLVER.MAX_ITER}, steps {tuple(cfg.SOLVER.STEPS)} (SOLVER.REFERENCE_WORLD_SIZE 1 keeps the "
            "written batch)")
    return notes


def _swap_norm(node: CfgNode, to: str, prefix: str = "") -> list[str]:
    changed = []
    for key, value in node.items():
        if isinstance(value, CfgNode):
            changed += _swap_norm(value, to, f"{prefix}{key}.")
        elif key == "NORM" and value in _SYNC_NORMS and value != to:
            node[key] = to
            changed.append(f"{prefix}{key}")
    return changed
