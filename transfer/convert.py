"""Convert a pretraining checkpoint to detectron2's model-zoo format (or to a clean torchvision ``state_dict``).

    python -m transfer.convert outputs/pretrain/moco_v2/checkpoint.pth.tar            # -> .../model_d2.pkl
    python -m transfer.convert moco_v2_800ep_pretrain.pth.tar                         # -> moco_v2_800ep_pretrain_d2.pkl
    python -m transfer.convert --newest                                               # newest pretraining output
    python -m transfer.convert CKPT backbone.pth --format torchvision                 # for other tools
    make convert CKPT=path/to/checkpoint.pth.tar

Accepted inputs are those of :func:`ctbench.checkpoints.load_backbone`: our checkpoints (``encoder_q.*``), the
official MoCo / JCL releases (``module.encoder_q.*``) and plain torchvision ResNet-50 ``state_dict``s (e.g. the
supervised ImageNet weights). The output holds the 318 ResNet-50 backbone tensors (weights, BN running statistics
and BN counters) and nothing else; everything dropped (projection head, key encoder, queue, ...) is listed.
Anything that is not a complete ResNet-50 (another architecture, a truncated or empty file, missing tensors) is a
one-line error with exit code 2, and no output file is left behind (the write is atomic).

detectron2 format (what MoCo's ``detection/convert-pretrain-to-detectron2.py`` writes)::

    {"model": {detectron2 name: numpy array}, "__author__": "ctbench", "matching_heuristics": True}

with torchvision -> detectron2 names ``conv1/bn1`` -> ``stem.conv1[.norm]``, ``layerN`` -> ``res{N+1}``,
``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut[.norm]``. Configs that load it must use RGB input,
ImageNet mean/std in 0-255 and ``STRIDE_IN_1X1: False`` (``transfer/configs/`` do).

Provenance: beside ``OUT`` the converter writes ``OUT.record.json``, a run record of kind ``convert`` whose
``inputs`` hold the pretraining record (found beside the checkpoint). ``ctbench.records.load_input(OUT)`` reads that
side-car, so a transfer run that consumed ``OUT`` traces back to the pretraining run wherever ``OUT`` lives. The
default ``OUT`` is beside the input: ``model_d2.pkl`` (``backbone_torchvision.pth``) for our ``checkpoint.pth.tar``,
``<stem>_d2.pkl`` (``<stem>_torchvision.pth``) for any other file name.

This module does not import detectron2 (a converter must run where detectron2 is not installed).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from ctbench import atomic
from ctbench.checkpoints import Backbone, load_backbone, summarize_dropped
from ctbench.errors import UserError, cli_main
from ctbench.paths import newest_checkpoint
from ctbench.records import RECORD_NAME, RunRecord

AUTHOR = "ctbench"
DEFAULT_NAMES = {"detectron2": "model_d2.pkl", "torchvision": "backbone_torchvision.pth"}
_BN = re.compile(r"\bbn(\d)\b")
_LAYER = re.compile(r"^layer(\d)\.")


def detectron2_name(name: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``)."""
    m = _LAYER.match(name)
    name = f"res{int(m.group(1)) + 1}." + name[m.end():] if m else "stem." + name
    name = _BN.sub(lambda b: f"conv{b.group(1)}.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(backbone: Backbone) -> dict:
    """detectron2's model-zoo dict for a backbone (numpy arrays, detectron2 names)."""
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in backbone.state_dict.items()}
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True}


def default_output(ckpt: Path, fmt: str) -> Path:
    """Beside the checkpoint: ``model_d2.pkl`` for our ``checkpoint.pth.tar``, ``<stem>_d2.pkl`` for other files
    (``backbone_torchvision.pth`` / ``<stem>_torchvision.pth`` with ``--format torchvision``)."""
    if ckpt.name == "checkpoint.pth.tar":
        return ckpt.parent / DEFAULT_NAMES[fmt]
    stem = ckpt.name.split(".")[0]
    return ckpt.parent / (f"{stem}_d2.pkl" if fmt == "detectron2" else f"{stem}_torchvision.pth")


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, fmt: str = "detectron2",
            log=print) -> Path:
    """Convert ``src`` to ``dst`` (default: beside ``src``); returns ``dst``. Raises :class:`UserError`."""
    if fmt not in DEFAULT_NAMES:
        raise UserError(f"unknown format {fmt!r}; choose from {', '.join(DEFAULT_NAMES)}")
    src = Path(src)
    dst = Path(dst) if dst is not None else default_output(src, fmt)
    if dst.is_dir():
        dst = dst / DEFAULT_NAMES[fmt]
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise UserError(f"output {dst} is the input checkpoint; choose another OUT")
    if fmt == "detectron2" and dst.suffix != ".pkl":
        raise UserError(f"output {dst}: detectron2 reads model-zoo weights from a .pkl file; name it *.pkl")

    bb = load_backbone(src)
    epoch = bb.meta.get("epoch")
    method = (bb.meta.get("ctbench") or {}).get("method")
    log(f"read {src}: {bb.source} checkpoint" + (f", method {method}" if method else "")
        + (f", epoch {epoch}" if epoch is not None else "") + f"; {len(bb.state_dict)} ResNet-50 backbone tensors")
    if bb.dropped:
        log(f"dropped {len(bb.dropped)} tensors that are not part of the backbone: {summarize_dropped(bb.dropped)}")

    with RunRecord("convert", dst.name, dst.parent, filename=dst.name + "." + RECORD_NAME, inputs=[src],
                   config={"format": fmt, "source": bb.source, "checkpoint": str(src.resolve()),
                           "checkpoint_epoch": epoch, "method": method}) as rec:
        if fmt == "detectron2":
            with atomic.atomic_open(dst, "wb") as f:
                pickle.dump(to_detectron2(bb), f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            atomic.torch_save(bb.state_dict, dst)
        rec.metrics.update(tensors=len(bb.state_dict), dropped=len(bb.dropped))
        rec.outputs["weights"] = dst.name
        rec.data["dropped"] = bb.dropped
    log(f"wrote {dst} ({fmt}, {len(bb.state_dict)} tensors, {dst.stat().st_size / 2**20:.1f} MiB); "
        f"provenance in {dst.name}.{RECORD_NAME}")
    return dst


def read_detectron2_pkl(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``model`` dict of a model-zoo .pkl (ours or MoCo's), with a one-line error for a bad file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise UserError(f"weights not found: {p}") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError) as e:
        raise UserError(f"{p}: not a readable detectron2 .pkl (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model", obj.get("blobs")), dict):
        raise UserError(f"{p}: not a detectron2 model-zoo pickle (expected a dict with 'model')")
    return obj.get("model", obj.get("blobs"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m transfer.convert",
        description="Convert a pretraining checkpoint (ours, MoCo/JCL release, torchvision ResNet-50) to "
                    "detectron2's model-zoo .pkl with backbone tensors only, or to a clean torchvision state_dict.",
        epilog="Example: python -m transfer.convert outputs/pretrain/moco_v2/checkpoint.pth.tar  "
               "(writes outputs/pretrain/moco_v2/model_d2.pkl and model_d2.pkl.record.json)")
    ap.add_argument("input", nargs="?", help="checkpoint to convert (.pth.tar / .pth)")
    ap.add_argument("output", nargs="?",
                    help="output file (default beside the input: model_d2.pkl for checkpoint.pth.tar, "
                         "else <stem>_d2.pkl; *_torchvision.pth with --format torchvision)")
    ap.add_argument("--newest", action="store_true",
                    help="convert the newest pretraining checkpoint under $CTBENCH_OUTPUT/pretrain")
    ap.add_argument("--format", choices=sorted(DEFAULT_NAMES), default="detectron2",
                    help="detectron2 model-zoo .pkl (default) or a torchvision ResNet-50 state_dict without fc")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.newest:
        if args.output is not None:
            raise UserError("with --newest give at most OUT (the input is the newest checkpoint)")
        src, dst = newest_checkpoint(), args.input
    elif args.input is None:
        raise UserError("give a checkpoint to convert (or --newest); see --help")
    else:
        src, dst = args.input, args.output
    convert(src, dst, args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
