"""Embedded toy datasets in the real on-disk layouts (ImageNet, COCO 2017, Pascal VOC 2007/2012), seeded.

    python -m ctbench.toydata --root datasets                 # what `make data` runs (default size, < 1 min)
    python -m ctbench.toydata --root datasets --scale 4       # 4x the images, for GPU machines
    python -m ctbench.toydata --root /tmp/d --tiny            # the tiny copy the tests use
    python -m ctbench.toydata --root datasets --only imagenet --force

    from ctbench.toydata import generate
    info = generate("datasets", scale=1.0, only=None, seed=0, force=False)   # {dataset: {status, path, ...}}

Each dataset directory (``imagenet/``, ``coco/``, ``VOC2007/``, ``VOC2012/``) gets a ``CTBENCH_TOY.json`` marker
holding its spec (generator version, seed, scale, counts). A dataset is built in a temporary directory beside the
root, the marker is written last, and the directory is renamed into place: an interrupted run leaves nothing under
the final name and is redone next time. A second run with the same spec returns at once; a different spec or
``force`` regenerates. A directory without a marker (real data) is never overwritten. Output bytes depend only on
the seed and the spec: :func:`content_fingerprint` is identical across runs and machines with the same Pillow.
See ``ctbench/toydata/README.md`` for what the images contain and the measured baselines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ctbench import atomic
from ctbench.errors import UserError
from ctbench.paths import TOY_MARKER

GENERATOR = "ctbench.toydata"
VERSION = 3  # 2: VOC per-class lists and VOC2012 segmentation masks; 3: toy ImageNet of pattern-filled shapes, 40 px
MARKER = TOY_MARKER
DATASETS = ("imagenet", "coco", "voc")
DIRS = {"imagenet": ("imagenet",), "coco": ("coco",), "voc": ("VOC2007", "VOC2012")}

# Counts at scale 1. "tiny" is the copy the test fixture makes: enough for a detectron2 iteration and evaluation.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "default": {
        "imagenet": {"classes": 10, "train": 100, "val": 20},
        "coco": {"train": 200, "val": 50},
        "voc": {"trainval2007": 150, "test2007": 50, "trainval2012": 150},
    },
    "tiny": {
        "imagenet": {"classes": 10, "train": 8, "val": 4},
        "coco": {"train": 8, "val": 4},
        "voc": {"trainval2007": 8, "test2007": 5, "trainval2012": 8},
    },
}
_TMP_PREFIX = ".tmp-toy-"


def counts_for(dataset: str, scale: float = 1.0, tiny: bool = False) -> dict[str, int]:
    base = SIZES["tiny" if tiny else "default"][dataset]
    return {k: v if k == "classes" else max(1, round(v * scale)) for k, v in base.items()}


def spec_for(dataset: str, seed: int = 0, scale: float = 1.0, tiny: bool = False) -> dict[str, Any]:
    """What the marker of ``dataset`` holds; equal specs mean equal bytes on disk."""
    return {"generator": GENERATOR, "version": VERSION, "dataset": dataset, "seed": int(seed),
            "scale": float(scale), "tiny": bool(tiny), "counts": counts_for(dataset, scale, tiny)}


def _module(dataset: str):
    if dataset == "imagenet":
        from ctbench.toydata import imagenet

        return imagenet
    if dataset == "coco":
        from ctbench.toydata import coco

        return coco
    if dataset == "voc":
        from ctbench.toydata import voc

        return voc
    raise ValueError(dataset)


def parse_only(only: str | Iterable[str] | None) -> tuple[str, ...]:
    if only is None:
        return DATASETS
    names = [s.strip().lower() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    for n in names:
        if n not in DATASETS:
            raise UserError(f"unknown dataset {n!r} in --only; choose from {', '.join(DATASETS)}")
    return tuple(d for d in DATASETS if d in names)


def read_marker(directory: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def generate(root: str | os.PathLike, scale: float = 1.0, only: str | Iterable[str] | None = None, seed: int = 0,
             force: bool = False, tiny: bool = False, workers: int | None = None,
             log: Callable[[str], None] | None = None, if_missing: bool = False) -> dict[str, dict]:
    """Generate (or keep, when up to date) the toy datasets under ``root``; returns per-dataset info.

    ``scale`` multiplies the image counts; ``tiny`` selects the test-size spec; ``workers`` processes render
    images (default: the CPU count, at most 8; 1 for tiny); ``log`` receives one line per dataset; ``if_missing``
    keeps every toy dataset that exists whatever its spec (what a stage needs: some toy data, not a given size).
    Every directory that would be written is checked before anything is: a dataset directory without the toy
    marker (real data) is a one-line error and nothing under ``root`` changes.
    """
    if not scale > 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    root = Path(root).expanduser()
    todo = {}  # dataset -> (spec, status when kept)
    for dataset in parse_only(only):
        spec = spec_for(dataset, seed, scale, tiny)
        dirs = [root / d for d in DIRS[dataset]]
        if if_missing and not force and all(read_marker(d) is not None for d in dirs):
            todo[dataset] = (spec, "present")
        elif not force and all(read_marker(d) == spec for d in dirs):
            todo[dataset] = (spec, "up to date")
        else:
            for d in dirs:
                _check_replaceable(d)  # before anything is written
            todo[dataset] = (spec, None)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create dataset root {root}: {e.strerror}") from e
    _clean_stale(root)
    if workers is None:
        workers = 1 if tiny else min(os.cpu_count() or 1, 8)
    out = {}
    for dataset, (spec, kept) in todo.items():
        dirs = [root / d for d in DIRS[dataset]]
        counts = spec["counts"] if kept != "present" else (read_marker(dirs[0]) or {}).get("counts", {})
        info: dict[str, Any] = {"path": str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs], "counts": counts}
        if kept is not None:
            info.update(status=kept, seconds=0.0)
        else:
            t0 = time.time()
            _build(root, dataset, spec, workers)
            info.update(status="generated", seconds=round(time.time() - t0, 2))
        out[dataset] = info
        if log is not None:
            log(_summary(dataset, info))
    return out


def _summary(dataset: str, info: dict) -> str:
    c = dict(info["counts"])
    per_class = f"{c.pop('classes')} classes x " if "classes" in c else ""  # ImageNet counts are per class
    counts = per_class + ("(" if per_class else "") + ", ".join(f"{v} {k}" for k, v in c.items()) \
        + (") images" if per_class else " images")
    where = info["path"] if isinstance(info["path"], str) else " + ".join(info["path"])
    tail = info["status"] if info["status"] != "generated" else f"generated in {info['seconds']:.1f} s"
    return f"{dataset}: {counts} -> {where} ({tail})"


def _check_replaceable(d: Path) -> None:
    if not d.exists() or read_marker(d) is not None:
        return
    if d.is_dir() and not any(d.iterdir()):
        return
    raise UserError(f"{d} exists and is not toy data (no {MARKER}); it may be a real dataset, so it is left alone: "
                    "move it away or pass another --root")


def _clean_stale(root: Path) -> None:
    """Remove build directories left by an interrupted run (their name says which process made them)."""
    for p in root.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(p.name.rsplit("-", 1)[-1])
        except ValueError:
            pid = -1
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(root: Path, dataset: str, spec: dict, workers: int) -> None:
    """Render into ``root/.tmp-toy-<dataset>-<pid>/<dir>``, write each marker last, then rename into place."""
    mod = _module(dataset)
    tmp = root / f"{_TMP_PREFIX}{dataset}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        mod.make_dirs(tmp, spec["counts"])
        results = _run(mod.write_image, mod.jobs(tmp, spec["counts"], spec["seed"]), workers)
        mod.write_meta(tmp, spec["counts"], results)
        for d in DIRS[dataset]:
            atomic.write_json(tmp / d / MARKER, spec)
        for d in DIRS[dataset]:
            final, old = root / d, root / f"{_TMP_PREFIX}old-{d}-{os.getpid()}"
            if final.exists():
                final.rename(old)
            (tmp / d).rename(final)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"could not write the toy {dataset} under {root}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(fn: Callable, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) < 64:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8)))


def content_fingerprint(root: str | os.PathLike, only: str | Iterable[str] | None = None) -> str:
    """sha256 over every file's relative path and bytes in the toy datasets under ``root`` (determinism check)."""
    root = Path(root)
    h = hashlib.sha256()
    for dataset in parse_only(only):
        for d in DIRS[dataset]:
            base = root / d
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(root)).encode() + b"\0")
                    with contextlib.suppress(OSError):
                        h.update(hashlib.sha256(p.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


__all__ = ["DATASETS", "DIRS", "MARKER", "SIZES", "VERSION", "content_fingerprint", "counts_for", "generate",
           "read_marker", "spec_for"]
