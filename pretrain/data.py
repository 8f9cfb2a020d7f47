"""Pretraining data: MoCo v1/v2 augmentation, 1 query + M keys per decoded image, a seeded resumable order.

    views = build_augmentation("moco_v2", image_size=224)
    ds = MultiViewDataset(ImageFolder(root), views, num_views=1 + M)
    batches = EpochBatchSampler(len(ds), batch_size=local_batch, world_size=W, rank=r, seed=0)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate_views, num_workers=8)
    batches.set_epoch(epoch, start_step=s)           # resume mid-epoch: the same batches and crops follow
    for images, targets, n_bad in loader: ...        # images: B x (1+M) x 3 x H x W

Determinism, so that a run killed at any step resumes bit-exactly:

- the order of an epoch is torch's ``DistributedSampler`` permutation for ``(seed, epoch)`` (also with one
  process); the sampler state is ``(epoch, step within the epoch)``;
- every sample carries its own seed, derived from ``(seed, epoch, position in the epoch's permutation)``; the
  augmentation of that sample runs under it (python ``random`` and torch's CPU generator, restored afterwards), so
  the crops do not depend on the worker that makes them, on the number of workers, or on a restart;
- global batch ``s`` of an epoch holds permutation positions ``[s B, (s+1) B)`` whatever the number of processes.

The image is decoded once per sample; the ``1 + M`` views are independent augmentations of it (JCL's M keys).
An unreadable image is dropped by :func:`ctbench.imagefolder.collate_skip_bad` and its slot refilled with a
readable image of the same batch, so every process keeps the same batch size (the all_gathers and the queue
need it); the count is returned with the batch and reported at epoch ends and in the run record.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from ctbench.errors import choices_error
from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, SeededDataset, collate_skip_bad, sample_seed

AUGMENTATIONS = ("moco_v1", "moco_v2")


class GaussianBlur:
    """MoCo v2's blur (from SimCLR): PIL Gaussian blur with σ uniform in ``sigma`` (pixels)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={list(self.sigma)})"


def build_augmentation(name: str, image_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0),
                       blur_sigma: tuple[float, float] = (0.1, 2.0)) -> Callable[[Image.Image], torch.Tensor]:
    """The published MoCo augmentation (facebookresearch/moco main_moco.py), PIL image -> normalised 3 x H x W.

    - ``moco_v1`` (InstDisc's): crop, grayscale p 0.2, jitter (0.4, 0.4, 0.4, 0.4) always, flip;
    - ``moco_v2`` (``--aug-plus``): crop, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5, flip.
    """
    crop = T.RandomResizedCrop(image_size, scale=tuple(crop_scale))
    tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if name == "moco_v1":
        return T.Compose([crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), *tail])
    if name == "moco_v2":
        return T.Compose([crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                          T.RandomGrayscale(p=0.2), T.RandomApply([GaussianBlur(tuple(blur_sigma))], p=0.5), *tail])
    raise choices_error("augmentation", name, AUGMENTATIONS)


class MultiViewDataset(SeededDataset):
    """``num_views`` augmentations of one decoded image: ``(views V x 3 x H x W, target)``, or ``None`` if unreadable.

    Indexed by ``(index, sample_seed)`` pairs from :class:`EpochBatchSampler`.
    """

    def __init__(self, folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor], num_views: int):
        super().__init__(folder)
        self.transform = transform
        self.num_views = num_views

    def views(self, img: Image.Image) -> tuple[torch.Tensor]:
        return (torch.stack([self.transform(img) for _ in range(self.num_views)]),)  # V x 3 x H x W


class EpochBatchSampler:
    """Batches of ``(index, sample_seed)`` for one process: ``DistributedSampler`` order, resumable mid-epoch.

    ``batch_size`` is the per-process batch; incomplete batches are dropped, so every epoch has
    ``steps_per_epoch`` steps on every process.
    """

    def __init__(self, dataset_len: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.steps_per_epoch = len(self.sampler) // batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)  # this rank's share: permutation positions rank, rank + W, rank + 2W, ...
        b = self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            yield [(indices[j], sample_seed(self.seed, self.epoch, self.rank + j * self.world_size))
                   for j in range(step * b, (step + 1) * b)]


def collate_views(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """``(images B x V x 3 x H x W, targets B, n_bad)``; unreadable samples are replaced by readable ones of the
    same batch (``images`` is ``None`` when none was readable)."""
    collated, n_bad = collate_skip_bad(batch)
    if collated is None:
        return None, None, n_bad
    images, targets = collated
    if n_bad:
        fill = torch.arange(len(batch)) % images.shape[0]  # B
        images, targets = images[fill], targets[fill]
    return images, targets, n_bad
