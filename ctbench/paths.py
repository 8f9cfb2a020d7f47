"""Where data and outputs live.

Datasets follow detectron2's convention: everything under ``$DETECTRON2_DATASETS`` (default ``./datasets``), with
``imagenet/``, ``coco/``, ``VOC2007/`` and ``VOC2012/`` inside. Outputs go under ``$CTBENCH_OUTPUT``
(default ``./outputs``): ``pretrain/<run>/``, ``transfer/<task>/<run>/``, ``linear/<run>/``, ``semisup/<run>/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctbench.errors import UserError


def datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


def imagenet_root() -> Path:
    return datasets_root() / "imagenet"


def outputs_root() -> Path:
    return Path(os.environ.get("CTBENCH_OUTPUT", "outputs")).expanduser()


def newest_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """The newest pretraining checkpoint under ``<outputs>/pretrain`` (what ``make`` targets default to)."""
    root = Path(root) if root is not None else outputs_root() / "pretrain"
    cands = sorted(root.glob("**/checkpoint.pth.tar"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not cands:
        raise UserError(f"no pretraining checkpoint found under {root}; run `make pretrain LOSS=moco_v2` first "
                        "or pass CKPT=path/to/checkpoint.pth.tar")
    return cands[-1]
