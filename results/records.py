"""Run records: one JSON file per run, the only thing ``results/`` builds tables from.

Every stage (pretrain, convert, transfer, linear, semisup, bench) writes ``record.json`` next to its outputs::

    with RunRecord("pretrain", "moco_v2", out_dir, config=cfg_dict, dataset=data_dir, seed=0) as rec:
        ...train...
        rec.metrics["loss_final"] = 6.1
        rec.outputs["checkpoint"] = "checkpoint.pth.tar"
    # -> out_dir/record.json (written atomically on success)

A record holds: ``kind``, ``name``, ``task``, ``metrics``, the resolved ``config``, ``dataset`` (path, fingerprint,
whether it is the embedded toy data), ``seed``, ``git`` (commit + dirty flag), library ``versions``, ``hardware``,
``started``/``ended``/``wall_s``, ``outputs`` (paths relative to the record) and ``inputs``: full copies of the
records of what the run consumed (e.g. the pretraining record a transfer run used), so one file traces a number
back to the pretraining run, its config and its data.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ctbench import atomic
from ctbench.errors import UserError

SCHEMA = "ctbench.record/1"
RECORD_NAME = "record.json"
TOY_MARKER = "CTBENCH_TOY.json"  # written by the toy-data generator at the root of each generated dataset
KINDS = ("pretrain", "convert", "transfer", "linear", "semisup", "bench")
_REPO = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_info(repo: Path = _REPO) -> dict:
    """Commit and dirty flag of the checkout the code runs from (``None`` outside a git checkout)."""
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict:
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for dist in ("ctbench", "torch", "torchvision", "numpy", "detectron2", "sal-detectron2", "pycocotools",
                 "faster-coco-eval", "fvcore", "pandas"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    if "sal-detectron2" in out:  # the repackaged wheel: say so, and what it is
        out["detectron2"] = out.pop("sal-detectron2") + " (sal-detectron2 = upstream a59f0563)"
    return out


def hardware_info() -> dict:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    return info


def dataset_info(path: str | os.PathLike | None) -> dict | None:
    """Path, fingerprint and toy flag of a dataset directory (or file)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    info: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(p), "fingerprint": fingerprint(p)}
    marker = _find_toy_marker(p)
    info["toy"] = marker is not None
    if marker is not None:
        try:
            info["toy_spec"] = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            info["toy_spec"] = None
    return info


def _find_toy_marker(p: Path) -> Path | None:
    for d in [p, *p.parents][:4]:
        m = d / TOY_MARKER
        if m.is_file():
            return m
    return None


def fingerprint(path: str | os.PathLike) -> str | None:
    """sha256 over (relative path, size) of every file below ``path``: changes when files are added, removed or
    resized; independent of where the data lives and of file times. Cached beside large trees' listing time."""
    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    if p.is_file():
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
        return "sha256:" + h.hexdigest()[:16]
    entries = []
    for root, dirs, files in os.walk(p):
        dirs.sort()
        rel = os.path.relpath(root, p)
        for f in files:
            if f == TOY_MARKER or f.startswith(".tmp-"):
                continue
            try:
                size = os.stat(os.path.join(root, f)).st_size
            except OSError:
                continue
            entries.append(f"{rel}/{f}\0{size}")
    entries.sort()
    for e in entries:
        h.update(e.encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()[:16]}:{len(entries)}files"


class RunRecord:
    """Context manager that writes ``out_dir/record.json`` when the run succeeds (nothing on failure)."""

    def __init__(self, kind: str, name: str, out_dir: str | os.PathLike, *, config: Mapping | None = None,
                 dataset: str | os.PathLike | None = None, seed: int | None = None,
                 inputs: Iterable[Mapping | str | os.PathLike] = (), task: str | None = None,
                 write: bool = True, filename: str = RECORD_NAME):
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; choose from {', '.join(KINDS)}")
        self.out_dir = Path(out_dir)
        self.write = write
        self.filename = filename  # a side-car name (``<file>.record.json``) where record.json belongs to another run
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "id": uuid.uuid4().hex[:12], "kind": kind, "name": name, "task": task,
            "metrics": {}, "config": dict(config or {}), "dataset": dataset_info(dataset), "seed": seed,
            "outputs": {}, "inputs": [load_input(i) for i in inputs], "notes": [],
        }
        self._t0 = 0.0

    @property
    def metrics(self) -> dict:
        return self.data["metrics"]

    @property
    def outputs(self) -> dict:
        return self.data["outputs"]

    def __enter__(self) -> RunRecord:
        self._t0 = time.time()
        self.data["started"] = now_iso()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.write:
            self.save()

    def save(self) -> Path:
        self.data.update(ended=now_iso(), wall_s=round(time.time() - self._t0, 3), git=git_info(),
                         versions=library_versions(), hardware=hardware_info())
        path = self.out_dir / self.filename
        atomic.write_json(path, self.data)
        return path


def write_record(kind: str, name: str, out_dir: str | os.PathLike, metrics: Mapping, **kwargs: Any) -> Path:
    """One-shot form of :class:`RunRecord` for runs timed elsewhere."""
    rec = RunRecord(kind, name, out_dir, **kwargs)
    rec.__enter__()
    rec.metrics.update(metrics)
    return rec.save()


def load_record(path: str | os.PathLike) -> dict:
    """Read a record (a ``record.json`` file or the directory holding one); adds ``_path``."""
    p = Path(path)
    if p.is_dir():
        p = p / RECORD_NAME
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"no run record at {p}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a readable run record ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise UserError(f"{p}: not a ctbench run record (schema {schema!r})")
    data["_path"] = str(p)
    return data


def load_input(item: Mapping | str | os.PathLike) -> dict:
    """An input of a run as stored in its record: a record dict, a record path, or a file whose side-car
    ``<file>.record.json``, directory or sibling ``record.json`` holds the record of the run that produced it
    (a converted ``model_d2.pkl`` has a side-car; a ``checkpoint.pth.tar`` has the pretraining record beside it)."""
    if isinstance(item, Mapping):
        return {k: v for k, v in item.items()}
    p = Path(item)
    sidecar = p.with_name(p.name + "." + RECORD_NAME)
    for cand in ([p] if p.name == RECORD_NAME else []) + [sidecar, p / RECORD_NAME, p.parent / RECORD_NAME]:
        if cand.is_file():
            return load_record(cand)
    return {"kind": "file", "path": str(p.resolve()) if p.exists() else str(p), "fingerprint": fingerprint(p)}


def iter_records(root: str | os.PathLike, kind: str | None = None) -> Iterator[dict]:
    """All records below ``root`` (sorted by path), optionally of one kind."""
    root = Path(root)
    if not root.exists():
        return
    for p in sorted(root.glob(f"**/{RECORD_NAME}")):
        rec = load_record(p)
        if kind is None or rec.get("kind") == kind:
            yield rec


def find_input(record: Mapping, kind: str) -> dict | None:
    """The nearest ancestor record of ``kind`` (depth-first through ``inputs``)."""
    for inp in record.get("inputs", []):
        if inp.get("kind") == kind:
            return inp
        found = find_input(inp, kind)
        if found is not None:
            return found
    return None


def jsonl_row(line: str) -> dict:
    """A ``metrics.jsonl`` line as a dict; ``{}`` for a blank or torn line (a process killed mid-write)."""
    try:
        row = json.loads(line)
    except ValueError:
        return {}
    return row if isinstance(row, dict) else {}
