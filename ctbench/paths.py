"""Where data and outputs live.

Datasets follow detectron2's convention: everything under ``$DETECTRON2_DATASETS`` (default ``./datasets``), with
``imagenet/``, ``coco/``, ``VOC2007/`` and ``VOC2012/`` inside. Outputs go under ``$CTBENCH_OUTPUT``
(default ``./outputs``): ``pretrain/<run>/``, ``transfer/<task>/<run>/``, ``linear/<run>/``, ``semisup/<run>/``.
"""

from __future__ import annotations

import json
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


def _print_on_rank0(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def newest_checkpoint(root: str | os.PathLike | None = None, log=_print_on_rank0) -> Path:
    """The checkpoint of the newest *complete* pretraining run under ``<outputs>/pretrain`` (what the evaluation
    targets use without ``CKPT``): its ``record.json`` beside it says ``metrics.complete: true``. Runs still going,
    stopped early (``train.max_steps``) or without a record are passed over and counted; name one with ``CKPT=`` /
    ``--ckpt`` to use it anyway. ``log`` gets one line saying which run was picked and why."""
    root = Path(root) if root is not None else outputs_root() / "pretrain"
    cands = sorted(root.glob("**/checkpoint.pth.tar"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for skipped, ckpt in enumerate(reversed(cands)):
        record = _read_json(ckpt.parent / "record.json")
        metrics = record.get("metrics") if isinstance(record, dict) else None
        if isinstance(metrics, dict) and metrics.get("complete") is True:
            method = ((record.get("config") or {}).get("method") or record.get("name") or "?")
            more = f"; {skipped} newer incomplete run(s) passed over (give CKPT= to use one)" if skipped else ""
            if log is not None:
                log(f"using the newest complete pretraining run: {ckpt} ({method}, {metrics.get('epochs', '?')} "
                    f"epochs, finished {record.get('ended', '?')}){more}")
            return ckpt
    if cands:
        raise UserError(f"no complete pretraining run under {root}: {len(cands)} checkpoint(s), none with a record "
                        "saying complete (still running, stopped by train.max_steps, or killed); finish one, or "
                        "name a checkpoint with CKPT=path/to/checkpoint.pth.tar (--ckpt / --weights)")
    raise UserError(f"no pretraining checkpoint found under {root}; run `make pretrain LOSS=moco_v2` first "
                    "or pass CKPT=path/to/checkpoint.pth.tar")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
