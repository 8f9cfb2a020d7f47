"""Where data and outputs live.

Datasets follow detectron2's convention: everything under ``$DETECTRON2_DATASETS`` (default ``./datasets``), with
``imagenet/``, ``coco/``, ``VOC2007/`` and ``VOC2012/`` inside. Outputs go under ``$CTBENCH_OUTPUT``
(default ``./outputs``): ``pretrain/<run>/``, ``transfer/<task>/<run>/``, ``linear/<run>/``, ``semisup/<run>/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctbench.errors import UserError

TOY_MARKER = "CTBENCH_TOY.json"  # written by ctbench.toydata at the root of each generated dataset


def toy_marker(path: str | os.PathLike) -> Path | None:
    """The toy-data marker of ``path`` or of one of its parents (up to 3 levels), if any."""
    p = Path(path).expanduser()
    for d in [p, *p.resolve().parents][:4]:
        if (d / TOY_MARKER).is_file():
            return d / TOY_MARKER
    return None


def detect_scale(data: str | os.PathLike) -> str:
    """``toy`` when the data (or a parent up to 3 levels up) carries the toy-data marker, else ``full``: what every
    stage runs at by default."""
    return "toy" if toy_marker(data) is not None else "full"


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
