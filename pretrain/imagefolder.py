"""ImageNet-layout reading (``root/<wnid>/*.JPEG``) that survives bad files.

One reader for every stage that reads class folders (pretraining, linear probe, semi-supervised, benchmarks):

    ds = ImageFolder("datasets/imagenet/train", transform=t)          # all images
    ds = ImageFolder(root, transform=t, files=["n01440764/x.JPEG"])   # a subset (SimCLR 1percent.txt style)
    loader = DataLoader(ds, batch_size=256, collate_fn=collate_skip_bad)
    for (images, targets), n_bad in loader: ...

A file that cannot be decoded (zero bytes, truncated, not an image) yields ``None`` from ``__getitem__``;
:func:`collate_skip_bad` drops it and returns how many were dropped, so the training loop counts and reports them
instead of crashing inside a worker. Grayscale, CMYK, palette and 16-bit images are converted to 8-bit RGB.
Class folders without images are skipped (listed in ``empty_classes``) but keep their index out of the mapping.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset, default_collate

from ctbench.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_classes(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (expected ImageNet layout root/<class>/<image>)")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any supported image to 8-bit RGB (handles L, LA, P, CMYK, I;16, I, F and alpha)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.size and a.max() > 0 else 1.0
                im = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
            return im.convert("RGB")


class ImageFolder(Dataset):
    """``(image, class_index)`` pairs from ``root/<class>/<file>``; ``None`` for an unreadable file."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 files: Sequence[str] | None = None, classes: Sequence[str] | None = None):
        self.root = Path(root)
        self.transform = transform
        self.classes = list(classes) if classes is not None else list_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if files is None:
            self.samples = []
            self.empty_classes = []
            for c in self.classes:
                d = self.root / c
                entries = os.scandir(d) if d.is_dir() else []
                names = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
                if not names:
                    self.empty_classes.append(c)
                self.samples.extend((f"{c}/{n}", self.class_to_idx[c]) for n in names)
        else:
            self.empty_classes = []
            self.samples = []
            for f in files:
                c = f.split("/", 1)[0] if "/" in f else f.split("_", 1)[0]
                if c not in self.class_to_idx:
                    raise UserError(f"{f!r}: class {c!r} is not a folder of {self.root}")
                rel = f if "/" in f else f"{c}/{f}"
                self.samples.append((rel, self.class_to_idx[c]))
        if not self.samples:
            raise UserError(f"no images found under {self.root} (extensions: {', '.join(IMG_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __getitem__(self, index: int):
        rel, target = self.samples[index]
        try:
            img = load_rgb(self.root / rel)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return (self.transform(img) if self.transform is not None else img), target


# Truncated JPEGs raise instead of being silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def collate_skip_bad(batch: list) -> tuple[Any, int]:
    """``default_collate`` over the readable samples, plus how many were unreadable (``None``)."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    return (default_collate(good) if good else None), n_bad
