"""What ``--weights`` means, where the converted file lives, and which pretraining run the numbers belong to.

==========================  ============================================================================
``--weights``               used as
==========================  ============================================================================
(none)                      the newest ``checkpoint.pth.tar`` under ``$CTBENCH_OUTPUT/pretrain`` (converted)
``random``                  random initialisation (detectron2's), run name ``random``
``X.pkl``                   a detectron2 model-zoo pickle (``python -m transfer.convert`` output, MoCo's),
                            or a Caffe2/Detectron1 ImageNet pickle (detectron2's MSRA ``R-50.pkl``)
``detectron2://…``          downloaded by detectron2 (cached in ``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``);
                            the default of ``voc_det_supervised_msra``: its config's ``MODEL.WEIGHTS``
``CKPT.pth.tar`` / ``.pth`` ours, a MoCo/JCL release or torchvision weights: converted once, beside the
                            checkpoint (``model_d2.pkl`` / ``<stem>_d2.pkl`` + ``.record.json`` side-car;
                            reused while newer than the checkpoint), or in the run directory when that
                            directory is read-only
``model_final.pth``         a detectron2 training checkpoint (e.g. for ``--eval-only``): used as is
==========================  ============================================================================

Run name (the output directory ``transfer/<task>/<name>``): the pretraining run's directory name when its record is
found, ``supervised`` for torchvision weights without a pretraining record and for Caffe2 ImageNet pickles (the
Detectron1 model zoo's ``ImageNetPretrained`` models are supervised ImageNet classifiers), ``random`` for random init.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from ctbench.checkpoints import read_checkpoint, supervised_release
from ctbench.errors import UserError
from ctbench.paths import newest_checkpoint
from ctbench.records import RECORD_NAME, find_input, load_input, load_record
from transfer.convert import convert, default_output, read_detectron2_pkl


@dataclass
class Weights:
    spec: str  # what the user gave ("" = the default)
    path: str  # MODEL.WEIGHTS ("" = random init)
    name: str  # run name
    kind: str  # random | pkl | caffe2 | converted | detectron2
    provenance: dict = field(default_factory=dict)  # the record (or file description) the weights came from

    def inputs(self) -> list[dict]:
        return [self.provenance] if self.provenance else []


def resolve(spec: str | None, log=print) -> Weights:
    """Find the weights ``spec`` names, converting a checkpoint when needed (see the module docstring)."""
    if spec == "random":
        return Weights("random", "", "random", "random")
    if spec and spec.startswith(URL_SCHEMES):
        path = download(spec)
        log(f"weights: {spec} -> {path}")
    else:
        path = Path(spec).expanduser() if spec else newest_checkpoint()
    if not spec:
        log(f"weights: newest pretraining checkpoint {path}")
    if not path.is_file():
        raise UserError(f"weights not found: {path} (give a .pkl, a checkpoint, or 'random')")
    if path.suffix == ".pkl":
        try:
            read_detectron2_pkl(path)
        except UserError:
            if not is_caffe2_pkl(path):  # read only when the model-zoo reading failed: one load for the usual case
                raise
            return Weights(str(spec or path), str(path), "supervised", "caffe2", load_input(path))
        prov = load_input(path)
        return Weights(str(spec or path), str(path), run_name(path, prov), "pkl", prov)
    if _is_detectron2_checkpoint(path):
        prov = load_input(path)
        return Weights(str(spec), str(path), run_name(path, prov), "detectron2", prov)
    pkl = _cached_conversion(path)
    if pkl is None:
        pkl = default_output(path, "detectron2")
        if not os.access(path.parent, os.W_OK):
            pkl = None  # converted into the run directory by the caller (convert_into)
        else:
            convert(path, pkl, log=log)
    else:
        log(f"weights: {pkl} (converted earlier from {path.name}; newer than it)")
    prov = load_input(pkl) if pkl is not None else {"kind": "convert", "inputs": [load_input(path)],
                                                      "config": {"checkpoint": str(path.resolve())}}
    return Weights(str(spec or path), str(pkl) if pkl else "", run_name(path, prov), "converted", prov)


URL_SCHEMES = ("detectron2://", "https://", "http://")


def download(url: str) -> Path:
    """The local copy of ``url`` (detectron2's PathManager: downloaded once into its cache); one line if it fails."""
    from detectron2.utils.file_io import PathManager

    quiet = io.StringIO()  # iopath's progress bar and its own "Failed to download" line
    try:
        with contextlib.redirect_stderr(quiet):
            return Path(PathManager.get_local_path(url))
    except Exception as e:  # noqa: BLE001 -- URLError, HTTPError, OSError, ...: any failure to fetch means the same
        http = url.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
        reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot download {url} ({reason}); fetch {http} on a machine with internet and give "
                        f"--weights /path/{http.rsplit('/', 1)[-1]}") from None


def is_caffe2_pkl(path: Path) -> bool:
    """A Caffe2/Detectron1 ImageNet pickle, a flat dict of named arrays (``conv1_w``, ``res2_0_branch2a_w``, ...),
    e.g. detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``; detectron2's checkpointer renames them
    (``c2_model_loading``). Detectron1 detection models (``{"blobs": ...}``) are read as model-zoo pickles."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception:  # noqa: BLE001 -- unreadable: read_detectron2_pkl gives the one-line error
        return False
    return isinstance(obj, dict) and "conv1_w" in obj and "res2_0_branch2a_w" in obj


def convert_into(weights: Weights, run_dir: Path, log=print) -> Weights:
    """Convert into ``run_dir`` when the checkpoint's directory was read-only (``resolve`` left ``path`` empty)."""
    if weights.kind != "converted" or weights.path:
        return weights
    ckpt = Path(weights.provenance["config"]["checkpoint"])
    pkl = convert(ckpt, run_dir / default_output(ckpt, "detectron2").name, log=log)
    return Weights(weights.spec, str(pkl), weights.name, "converted", load_input(pkl))


def run_name(path: Path, provenance: dict) -> str:
    pre = provenance if provenance.get("kind") == "pretrain" else find_input(provenance, "pretrain")
    if pre is not None and pre.get("_path"):
        return Path(pre["_path"]).parent.name
    if provenance.get("kind") == "transfer" and provenance.get("name"):
        return str(provenance["name"])
    conv = provenance if provenance.get("kind") == "convert" else find_input(provenance, "convert")
    if conv is not None and (conv.get("config") or {}).get("source") == "torchvision" \
            and supervised_release((conv.get("config") or {}).get("checkpoint", "")) is not None:
        return "supervised"  # a known ImageNet-supervised release; another torchvision state_dict keeps its file name
    if conv is not None and (conv.get("config") or {}).get("checkpoint"):
        path = Path(conv["config"]["checkpoint"])
    if path.name in ("checkpoint.pth.tar", "model_d2.pkl", "model_final.pth"):
        return path.parent.name
    return path.name.split(".")[0]


def _cached_conversion(ckpt: Path) -> Path | None:
    pkl = default_output(ckpt, "detectron2")
    sidecar = pkl.with_name(pkl.name + "." + RECORD_NAME)
    if not (pkl.is_file() and sidecar.is_file()) or pkl.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    try:
        rec = load_record(sidecar)
    except UserError:
        return None
    return pkl if (rec.get("config") or {}).get("checkpoint") == str(ckpt.resolve()) else None


def _is_detectron2_checkpoint(path: Path) -> bool:
    """A detectron2 training checkpoint: ``{"model": {"backbone.…", "roi_heads.…"}, ...}``."""
    if path.name.endswith(".pth.tar"):
        return False  # pretraining checkpoints (ours, MoCo's)
    obj = read_checkpoint(path)
    model = obj.get("model")
    return isinstance(model, dict) and any(str(k).startswith(("backbone.", "roi_heads.")) for k in model)
