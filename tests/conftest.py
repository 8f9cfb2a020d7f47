"""Shared fixtures.

``toy_datasets``: a tiny copy of every toy dataset (ImageNet 10 classes x 8 train + 4 val, COCO 8 train + 4 val
with instances and keypoints, VOC07 8 trainval + 5 test, VOC12 8 trainval) generated once per test session in a
temporary directory; returns its root, laid out as ``$DETECTRON2_DATASETS`` is::

    def test_x(toy_datasets):
        ImageFolder(toy_datasets / "imagenet" / "train")

``toy_detectron2``: the same root after detectron2's builtin names (``coco_2017_train``, ``keypoints_coco_2017_val``,
``voc_2007_test``, ...) were re-pointed at it (see ``ctbench.toydata.catalog``); DETECTRON2_DATASETS is set to it
for the rest of the session, so subprocesses see it too.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads libgomp (see the Makefile): sleeping OpenMP threads, so parallel test processes on 2 cores do
# not spin against each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from ctbench.toydata import generate


@pytest.fixture(scope="session")
def toy_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_datasets")
    generate(root, tiny=True, seed=0)
    return root


@pytest.fixture(scope="session")
def toy_detectron2(toy_datasets: Path):
    from ctbench.toydata.catalog import register_builtin

    before = os.environ.get("DETECTRON2_DATASETS")
    register_builtin(toy_datasets)
    yield toy_datasets
    if before is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = before


def write_noise_folder(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 40)) -> Path:
    """An ImageNet-layout folder ``root/n0<c>/<i>.JPEG`` of seeded random-noise JPEGs (height x width ``size``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"n0{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    return root


@pytest.fixture(scope="session")
def noise_folder():
    """:func:`write_noise_folder` as a fixture (tests import nothing from conftest)."""
    return write_noise_folder
