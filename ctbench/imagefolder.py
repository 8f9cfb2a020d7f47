"""ImageNet-layout reading (``root/<wnid>/*.JPEG``) that survives bad files, and what every stage does with the images
it reads: the ImageNet normalisation (``IMAGENET_MEAN`` / ``IMAGENET_STD``), the evaluation view
(:func:`eval_transform`: resize in the 256/224 ratio + centre crop) and per-sample seeded views
(:class:`SeededDataset`, :func:`sample_seed`, :func:`seeded`).

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

import abc
import contextlib
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from ctbench.errors import UserError

# torchvision's ImageNet normalisation (MoCo's); detectron2's configs hold it x 255 (transfer/configs/Base-MoCo.yaml)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def eval_resize(image_size: int) -> int:
    """The resize before the centre crop, in the 256/224 ratio of the ImageNet protocol (64 -> 73, 224 -> 256)."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_size: int) -> T.Compose:
    """Resize (short side) + centre crop + normalise: the val transform of MoCo's main_lincls at any size."""
    return T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed seed for python ``random`` and torch's CPU generator, then restore both."""
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of epoch ``epoch``'s permutation."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class SeededDataset(Dataset, abc.ABC):
    """Base of the datasets indexed by ``(index, sample_seed)`` pairs (:class:`EpochBatchSampler`,
    ``transfer.classify.data.EpochSampler``): decodes ``folder[index]`` once, runs :meth:`views` on the image under
    the sample's seed (so a sample's augmentation depends only on its seed, not on the worker or the order) and
    returns ``(*views(img), target)``, or ``None`` for an unreadable image (see ``collate_skip_bad``)."""

    def __init__(self, folder: ImageFolder):
        if folder.transform is not None:
            raise ValueError(f"{type(self).__name__} transforms the images itself; give it an ImageFolder without a "
                             "transform")
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    @abc.abstractmethod
    def views(self, img: Image.Image) -> tuple:
        """What the dataset makes of one decoded image (called under the sample's seed)."""

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        sample = self.folder[index]
        if sample is None:
            return None
        img, target = sample
        with seeded(seed):
            return (*self.views(img), target)
