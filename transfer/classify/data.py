"""Data of the classification evaluations: transforms, a seeded resumable epoch order, the labelled subsets.

Determinism (a run killed at any point resumes bit-exactly, whatever the number of processes):

- epoch ``e`` visits the train images in the permutation drawn from ``(seed, e)``; global batch ``s`` holds
  permutation positions ``[s B, (s + 1) B)`` and process ``r`` of ``W`` takes positions ``r, r + W, ...`` of it, so
  the global batches do not depend on ``W``; the last, partial batch is kept when every process gets an image;
- the augmentation of the image at position ``p`` runs under its own seed ``(seed, e, p)``
  (:func:`ctbench.imagefolder.sample_seed`), so crops do not depend on workers, processes or restarts.

Semi-supervised subsets use SimCLR's list format (``1percent.txt`` / ``10percent.txt`` of
google-research/simclr ``imagenet_subsets/``): one train file name per line, ``n01440764_10026.JPEG``, the class
being the wnid before the first ``_`` and the file living in ``train/<wnid>/``. SimCLR's own lists are looked for
under the ImageNet root (``<root>/1percent.txt``, then ``<root>/imagenet_subsets/1percent.txt``) and recognised by
their content (:data:`SIMCLR_LISTS`: the sha256 of their sorted names), whatever their name or line order.

    path = find_simclr_list(root, pct=1)                         # <root>[/imagenet_subsets]/1percent.txt or None
    files = read_subset("1percent.txt", train_dir)              # checked against the folder
    simclr_pct(files)                                            # 1: it is SimCLR's 1 % list
    check_share("1percent.txt", len(files), count_images(train_dir), pct=1)
    files = balanced_subset(train_dir, pct=10, seed=0)           # exactly pct % of each class's share, seeded
    write_subset(out / "subset.txt", files)

Under DDP, what lists a whole folder (the subset, the dataset fingerprint) runs on rank 0 only and is broadcast
(:func:`on_rank0`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

from ctbench import atomic
from ctbench import distributed as D
from ctbench.errors import UserError
from ctbench.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    ImageFolder,
    SeededDataset,
    collate_skip_bad,
    eval_transform,
    list_classes,
    sample_seed,
)

__all__ = ["SIMCLR_LISTS", "SUBSET_DIRS", "EpochSampler", "SeededImages", "balanced_subset", "check_share",
           "count_images", "data_dirs", "find_simclr_list", "names_sha256",
           "on_rank0", "read_subset", "simclr_pct", "subset_sha256", "train_transform", "val_loader",
           "write_subset"]


def train_transform(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), augment: bool = True
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """MoCo main_lincls' training transform: RandomResizedCrop + horizontal flip (the val transform when
    ``augment`` is false)."""
    if not augment:
        return eval_transform(image_size)
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(crop_scale)), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeededImages(SeededDataset):
    """``folder[index]`` with ``transform`` applied under the sample's seed; indexed by ``(index, seed)`` pairs
    from :class:`EpochSampler`. ``None`` for an unreadable image."""

    def __init__(self, folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor]):
        super().__init__(folder)
        self.transform = transform

    def views(self, img: Image.Image) -> tuple[torch.Tensor]:
        return (self.transform(img),)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 104729, epoch]).generate_state(1)[0]))
    return torch.randperm(n, generator=g)


class EpochSampler:
    """Batches of ``(index, sample_seed)`` for one process; see the module docstring. Resumable mid-epoch."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if n < world_size:
            raise UserError(f"{n} training images cannot be split over {world_size} processes")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.epoch = 0
        self.start_step = 0
        full, rest = divmod(n, batch_size)
        self.steps_per_epoch = full + (1 if rest >= world_size else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_size(self, step: int) -> int:
        """Images in global batch ``step`` (all processes together): the loss divides by it."""
        return min(self.batch_size, self.n - step * self.batch_size)

    def batch(self, perm: torch.Tensor, step: int) -> list[tuple[int, int]]:
        lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, self.n)
        return [(int(perm[p]), sample_seed(self.seed, self.epoch, p)) for p in range(lo + self.rank, hi,
                                                                                      self.world_size)]

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            yield self.batch(perm, step)


def data_dirs(cfg) -> tuple[Path, Path, list[str]]:
    """``(train dir, val dir, classes)`` of ``cfg.data.path``, with a one-line error when a split is missing."""
    root = Path(cfg.data.path)
    train, val = root / "train", root / "val"
    for d in (train, val):
        if not d.is_dir():
            raise UserError(f"{d} not found: --data must be an ImageNet-layout root holding train/ and val/ "
                            "(run `make data` for the toy ImageNet)")
    return train, val, list_classes(train)


def val_loader(cfg, val_dir: Path, classes: list[str], pin: bool) -> DataLoader:
    """This process's share (``rank::world``) of the val set at the val transform, in order."""
    val = ImageFolder(val_dir, transform=eval_transform(cfg.data.image_size), classes=classes)
    shard = Subset(val, range(D.rank(), len(val), D.world_size()))
    return DataLoader(shard, batch_size=cfg.train.eval_batch_size, shuffle=False, num_workers=cfg.data.workers,
                      collate_fn=collate_skip_bad, pin_memory=pin)


def on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` computed on rank 0 only and its result broadcast to every rank (``fn`` itself on one process).
    A :class:`UserError` on rank 0 is raised on every rank, so no rank waits for a broadcast that never comes."""
    if D.world_size() == 1:
        return fn(*args)
    box: list = [None]
    if D.rank() == 0:
        try:
            box = [("ok", fn(*args))]
        except UserError as e:
            box = [("user", str(e))]
        except BaseException as e:
            dist.broadcast_object_list([("crash", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# ---- semi-supervised subsets -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimclrList:
    name: str  # file name in google-research/simclr imagenet_subsets/
    images: int  # lines
    file_sha256: str  # of the file as committed
    names_sha256: str  # of its names, sorted (names_sha256): the same list in any order or line ending


# google-research/simclr@383d414 imagenet_subsets/ (1 % is a subset of 10 %; 189 classes x 12 + 811 x 13 and
# 884 x 128 + 116 x 129 images).
SIMCLR_LISTS = {
    1: SimclrList("1percent.txt", 12_811,
                  "sha256:71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17",
                  "sha256:c03b85c3942f663c123a38b0d7a0eecb01730a1e96bd97384f0f3e60c6f3397c"),
    10: SimclrList("10percent.txt", 128_116,
                   "sha256:6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091",
                   "sha256:d9bc1445836f11cbba81b22781ccafab15a3a6a31dd14e22e6cf7617e1ee3f68"),
}
# Where SimCLR's lists are looked for, relative to the ImageNet root (the folder holding train/ and val/), in order.
SUBSET_DIRS = (".", "imagenet_subsets")
# A list is accepted for --pct P when its share of the train images lies within a factor sqrt(10) of P: nearer P
# than the other percentage on a log scale (1 % accepts 0.32-3.2 %, 10 % accepts 3.2-32 %). SimCLR's lists are
# 0.99995 % and 10.0000 % of ImageNet's 1,281,167 train images.
SHARE_TOLERANCE = math.sqrt(10)


def find_simclr_list(root: str | os.PathLike, pct: int) -> Path | None:
    """``<root>/<name>`` or ``<root>/imagenet_subsets/<name>`` (``name`` = SimCLR's file name for ``pct``)."""
    name = SIMCLR_LISTS[pct].name
    for d in SUBSET_DIRS:
        p = Path(root) / d / name
        if p.is_file():
            return p
    return None


def names_sha256(names: Sequence[str]) -> str:
    """sha256 of the sorted file names, one per line: a list's identity whatever its order and line endings."""
    return "sha256:" + hashlib.sha256("".join(n + "\n" for n in sorted(names)).encode()).hexdigest()


def simclr_pct(names: Sequence[str]) -> int | None:
    """1 or 10 when ``names`` is exactly SimCLR's 1 % / 10 % list, else None."""
    if len(names) not in {s.images for s in SIMCLR_LISTS.values()}:
        return None
    h = names_sha256(names)
    return next((pct for pct, s in SIMCLR_LISTS.items() if s.names_sha256 == h), None)


def count_images(folder: str | os.PathLike) -> int:
    """Image files in the class folders of ``folder`` (names only: no file is opened or stat'ed)."""
    n = 0
    for c in list_classes(folder):
        with os.scandir(Path(folder) / c) as it:
            n += sum(1 for e in it if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    return n


def check_share(path: str | os.PathLike, listed: int, train_images: int, pct: int) -> None:
    """One-line error unless a list of ``listed`` images is ``pct`` % of ``train_images`` (see SHARE_TOLERANCE)."""
    share = 100.0 * listed / max(train_images, 1)
    lo, hi = pct / SHARE_TOLERANCE, pct * SHARE_TOLERANCE
    if not lo <= share <= hi:
        other = 10 if pct == 1 else 1
        fits = other / SHARE_TOLERANCE <= share <= other * SHARE_TOLERANCE
        raise UserError(f"{path}: {listed} images are {share:.3g} % of the {train_images} train images, not {pct} % "
                        f"(a {pct} % list holds {lo:.2g}-{hi:.2g} % of them); "
                        + (f"pass --pct {other}, or a {pct} % list" if fits else f"pass a {pct} % list"))


def _class_of(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else name.split("_", 1)[0]


def read_subset(path: str | os.PathLike, train_dir: str | os.PathLike, pct: int | None = None) -> list[str]:
    """File names of a SimCLR-format subset list, checked against ``train_dir`` (one-line error otherwise).

    Blank lines and ``#`` comments are ignored; duplicates are an error (they would silently re-weight a class).
    With ``pct``, SimCLR's list of the other percentage is an error too (before the folder is looked at).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"subset list not found: {p}")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a readable text file ({e})") from e
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise UserError(f"{p}: no file names (expected one per line, like n01440764_10026.JPEG)")
    bad = [n for n in names if not n.lower().endswith(IMG_EXTENSIONS) or "_" not in n.split("/")[-1]]
    if bad:
        raise UserError(f"{p}: {bad[0]!r} is not an image file name like n01440764_10026.JPEG "
                        f"({len(bad)} such line(s))")
    seen: set[str] = set()
    dups = [n for n in names if n in seen or seen.add(n)]
    if dups:
        raise UserError(f"{p}: {dups[0]!r} is listed more than once ({len(dups)} duplicate(s))")
    simclr = simclr_pct(names) if pct is not None else None
    if simclr is not None and simclr != pct:
        raise UserError(f"{p} is SimCLR's {SIMCLR_LISTS[simclr].name}, not the {pct} % list; pass --pct {simclr}, "
                        f"or the {SIMCLR_LISTS[pct].name} list for {pct} %")
    train_dir = Path(train_dir)
    classes = set(list_classes(train_dir))
    missing = [n for n in names if _class_of(n) not in classes
               or not (train_dir / _class_of(n) / n.split("/")[-1]).is_file()]
    if missing:
        raise UserError(f"{p}: {len(missing)} of {len(names)} listed images are not under {train_dir} "
                        f"(e.g. {missing[0]}); is it the list of another dataset?")
    return names


def balanced_subset(train_dir: str | os.PathLike, pct: float, seed: int = 0) -> list[str]:
    """A seeded, exactly class-balanced ``pct`` % of ``train_dir``: every class gets
    ``max(1, round(pct / 100 * images / classes))`` images, drawn without replacement; SimCLR's name format."""
    folder = ImageFolder(train_dir)
    by_class: dict[str, list[str]] = {c: [] for c in folder.classes}
    for rel, _ in folder.samples:
        c, name = rel.split("/", 1)
        by_class[c].append(name)
    present = {c: sorted(v) for c, v in by_class.items() if v}
    per_class = max(1, round(pct / 100 * len(folder) / len(present)))
    short = {c: len(v) for c, v in present.items() if len(v) < per_class}
    if short:
        c = min(short, key=short.get)
        raise UserError(f"{pct} % needs {per_class} images per class but class {c} of {train_dir} has only "
                        f"{short[c]}; give a subset list with --subset")
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(round(pct * 1000))]))
    out = []
    for c in sorted(present):
        pick = rng.choice(len(present[c]), size=per_class, replace=False)
        out.extend(present[c][i] for i in sorted(pick))
    return out


def write_subset(path: str | os.PathLike, names: Sequence[str]) -> None:
    atomic.write_text(path, "".join(n + "\n" for n in names))


def subset_sha256(path: str | os.PathLike) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
