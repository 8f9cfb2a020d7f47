"""Pretraining data: the MoCo augmentations, one decode per image for all views, the seeded resumable order (same
crops whatever the workers, the restart point or the number of processes), and unreadable images refilled."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ctbench.errors import UserError
from ctbench.imagefolder import ImageFolder, sample_seed
from pretrain.data import EpochBatchSampler, MultiViewDataset, build_augmentation, collate_views


@pytest.fixture(scope="module")
def folder(tmp_path_factory, noise_folder):
    root = noise_folder(tmp_path_factory.mktemp("pt_data") / "train", size=(40, 48))
    (root / "n00" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root


def _dataset(folder, views=3):
    return MultiViewDataset(ImageFolder(folder), build_augmentation("moco_v2", 32, blur_sigma=(0.1, 0.5)), views)


@pytest.mark.parametrize("name", ["moco_v1", "moco_v2"])
def test_augmentations_give_normalised_crops(name):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    x = build_augmentation(name, 32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -3 < x.mean() < 3 and x.min() < 0 < x.max()


def test_unknown_augmentation_lists_the_choices():
    with pytest.raises(UserError, match="unknown augmentation 'v3'; choose from moco_v1, moco_v2"):
        build_augmentation("v3")


def test_seeded_views_repeat_and_global_rng_is_restored(folder):
    ds = _dataset(folder)
    random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    a, ta = ds[(1, 123)]
    b, _ = ds[(1, 123)]
    c, _ = ds[(1, 124)]
    assert (random.random(), torch.rand(1)) == before
    assert a.shape == (3, 3, 32, 32) and ta == 0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "query and key must be independent augmentations"


def test_each_image_is_decoded_once_for_all_views(folder, monkeypatch):
    ds = _dataset(folder, views=6)
    calls = []
    original = ImageFolder.__getitem__
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: calls.append(i) or original(self, i))
    views, _ = ds[(2, 7)]
    assert views.shape[0] == 6 and calls == [2]


def test_sampler_resumes_mid_epoch_with_the_same_batches():
    full = EpochBatchSampler(50, 4, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == full.steps_per_epoch == 12
    resumed = EpochBatchSampler(50, 4, seed=3)
    resumed.set_epoch(2, start_step=5)
    assert list(resumed) == batches[5:] and len(resumed) == 7
    other = EpochBatchSampler(50, 4, seed=3)
    other.set_epoch(3)
    assert list(other) != batches


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = EpochBatchSampler(40, 8, world_size=1, rank=0, seed=1)
    one.set_epoch(0)
    two = [EpochBatchSampler(40, 4, world_size=2, rank=r, seed=1) for r in range(2)]
    for s in two:
        s.set_epoch(0)
    for step, (a, b0, b1) in enumerate(zip(one, *two)):
        assert sorted(a) == sorted(b0 + b1), step  # same images with the same augmentation seeds
    assert sample_seed(1, 0, 5) != sample_seed(1, 1, 5)


def test_loader_is_identical_with_and_without_workers(folder):
    ds = _dataset(folder, views=2)
    out = []
    for workers in (0, 2):
        sampler = EpochBatchSampler(len(ds), 4, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_views, num_workers=workers)
        out.append([(x, y, n) for x, y, n in loader])
    assert len(out[0]) == 3
    for (x0, y0, n0), (x1, y1, n1) in zip(*out):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and n0 == n1


def test_unreadable_images_are_counted_and_refilled(folder):
    ds = _dataset(folder, views=2)
    broken = next(i for i, (rel, _) in enumerate(ds.folder.samples) if rel.endswith("broken.JPEG"))
    images, targets, n_bad = collate_views([ds[(broken, 0)], ds[(0, 1)], ds[(broken, 2)], ds[(5, 3)]])
    assert n_bad == 2 and images.shape == (4, 2, 3, 32, 32) and targets.shape == (4,)
    assert torch.equal(images[2], images[0]) and torch.equal(images[3], images[1])
    assert collate_views([ds[(broken, 0)]]) == (None, None, 1)
