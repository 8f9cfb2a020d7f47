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
back to the pretraining run, its config and its data. Each stage also sets ``protocol``: ``{"recipe": the original
recipe the run follows, with its source, "deviations": [how this run departs from it, in short stable phrases]}``
(an empty list: exactly the published recipe); ``results/`` groups and labels table rows by it.
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
from ctbench.paths import TOY_MARKER, toy_marker

SCHEMA = "ctbench.record/1"
RECORD_NAME = "record.json"
KINDS = ("pretrain", "convert", "transfer", "linear", "semisup", "knn", "bench")
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


def dataset_info(path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """Path, fingerprint and toy flag of a dataset directory (or file); ``cache_dir``: see :func:`fingerprint`."""
    if path is None:
        return None
    p = Path(path).expanduser()
    info: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(p),
                            "fingerprint": fingerprint(p, cache_dir)}
    marker = toy_marker(p)
    info["toy"] = marker is not None
    if marker is not None:
        try:
            info["toy_spec"] = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            info["toy_spec"] = None
    return info


FINGERPRINT_CACHE = ".fingerprint.json"  # in a run directory: the fingerprints of the datasets that run read


def listing(path: str | os.PathLike) -> list[str]:
    """The sorted relative names (``./a.JPEG``, ``n01/b.JPEG``) of the files below the directory ``path``, as
    ``os.walk`` lists them: from the directory entries alone, no ``stat`` per file. The toy marker and ``.tmp-*``
    files of interrupted writes are left out."""
    names = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        names += [f"{rel}/{f}" for f in files if f != TOY_MARKER and not f.startswith(".tmp-")]
    names.sort()
    return names


def _sized_fingerprint(path: str | os.PathLike, names: list[str]) -> str:
    """sha256 over (relative name, size) of ``names`` (one ``stat`` each; a file that vanished is left out)."""
    entries = []
    for name in names:
        try:
            size = os.stat(os.path.join(path, name)).st_size
        except OSError:
            continue
        entries.append(f"{name}\0{size}")
    entries.sort()
    h = hashlib.sha256()
    for e in entries:
        h.update(e.encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()[:16]}:{len(entries)}files"


def fingerprint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str | None:
    """``sha256:<16 hex>:<N>files``: sha256 over (relative path, size) of every file below the directory ``path``
    (``sha256:<16 hex>`` over name and size for a file; ``None`` when ``path`` does not exist). It changes when
    files are added, removed, renamed or resized; it does not depend on where the data lives or on file times.

    Computing it costs one ``stat`` per file (minutes for ImageNet on a network file system). With ``cache_dir``
    (a run directory) the result is kept in ``cache_dir/.fingerprint.json``, per resolved dataset path, with the
    sha256 of the directory listing (:func:`listing`: the sorted relative names, read without a ``stat`` per file);
    a later call whose listing is unchanged (a resumed run, another stage writing into the same run directory)
    returns the cached value without any ``stat``. So while the cache is there, a file rewritten in place under the
    same name with another size goes unnoticed: delete the cache file (or use a fresh run directory) after such a
    change. A cache that cannot be read is recomputed; one that cannot be written is skipped."""
    p = Path(path)
    if not p.exists():
        return None
    if p.is_file():
        h = hashlib.sha256()
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
        return "sha256:" + h.hexdigest()[:16]
    names = listing(p)
    if cache_dir is None:
        return _sized_fingerprint(p, names)
    key = "sha256:" + hashlib.sha256("\n".join(names).encode()).hexdigest()
    cache, where = Path(cache_dir) / FINGERPRINT_CACHE, str(p.resolve())
    try:
        entries = json.loads(cache.read_text()).get("entries", {})
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError, AttributeError):
        entries = {}
    hit = entries.get(where)
    if isinstance(hit, dict) and hit.get("listing") == key and isinstance(hit.get("fingerprint"), str):
        return hit["fingerprint"]
    fp = _sized_fingerprint(p, names)
    entries[where] = {"listing": key, "files": len(names), "fingerprint": fp}
    with contextlib.suppress(UserError):  # a read-only run directory: no cache, same fingerprint
        atomic.write_json(cache, {"schema": "ctbench.fingerprint/1", "entries": entries})
    return fp


class RunRecord:
    """Context manager that writes ``out_dir/record.json`` when the run succeeds (nothing on failure).

    ``write=False`` (the other ranks of a distributed run) keeps the record in memory only and computes no dataset
    fingerprint; with ``write=True`` it is computed once and cached in ``fingerprint_cache`` (default ``out_dir``;
    :func:`fingerprint`), so a resumed run lists the dataset's directories but stats no file.
    """

    def __init__(self, kind: str, name: str, out_dir: str | os.PathLike, *, config: Mapping | None = None,
                 dataset: str | os.PathLike | None = None, seed: int | None = None,
                 inputs: Iterable[Mapping | str | os.PathLike] = (), task: str | None = None,
                 write: bool = True, filename: str = RECORD_NAME,
                 fingerprint_cache: str | os.PathLike | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; choose from {', '.join(KINDS)}")
        self.out_dir = Path(out_dir)
        self.write = write
        self.filename = filename  # a side-car name (``<file>.record.json``) where record.json belongs to another run
        # where the dataset fingerprint is cached (default out_dir; e.g. the directory above a run's trial0/, trial1/)
        self.fingerprint_cache = Path(fingerprint_cache) if fingerprint_cache is not None else self.out_dir
        self._dataset = dataset
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "id": uuid.uuid4().hex[:12], "kind": kind, "name": name, "task": task,
            "metrics": {}, "config": dict(config or {}),
            "dataset": dataset_info(dataset, self.fingerprint_cache) if write else None, "seed": seed,
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
        if self.data["dataset"] is None and self._dataset is not None:  # built with write=False, saved anyway
            self.data["dataset"] = dataset_info(self._dataset, self.fingerprint_cache)
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
