"""ImageFolder: bad files are skipped and counted, odd modes become RGB, empty class folders are tolerated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as F

from ctbench.errors import UserError
from ctbench.imagefolder import ImageFolder, collate_skip_bad


def _to_tensor(img):
    return F.pil_to_tensor(img.resize((8, 8)))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    a, b, empty = root / "n01", root / "n02", root / "n03"
    for d in (a, b, empty):
        d.mkdir(parents=True)
    rgb = Image.fromarray(np.full((12, 12, 3), 200, np.uint8))
    rgb.save(a / "ok.JPEG")
    rgb.convert("L").save(a / "gray.JPEG")
    rgb.convert("CMYK").save(a / "cmyk.JPEG")
    rgb.convert("P").save(b / "palette.png")
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(b / "sixteen.png")
    (b / "empty.JPEG").write_bytes(b"")
    (b / "text.JPEG").write_text("not an image")
    data = (a / "ok.JPEG").read_bytes()
    (b / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    return root


def test_bad_files_are_skipped_and_counted(folder):
    ds = ImageFolder(folder, transform=_to_tensor)
    assert ds.classes == ["n01", "n02", "n03"] and ds.empty_classes == ["n03"]
    assert len(ds) == 8
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_skip_bad)
    (images, targets), n_bad = next(iter(loader))
    assert n_bad == 3
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
    assert sorted(targets.tolist()) == [0, 0, 0, 1, 1]


def test_subset_file_list_and_errors(folder, tmp_path):
    ds = ImageFolder(folder, files=["n01/ok.JPEG", "n02_palette.png"])
    assert [s for s, _ in ds.samples] == ["n01/ok.JPEG", "n02/n02_palette.png"]  # SimCLR lists keep the prefix
    with pytest.raises(UserError, match="class 'n09' is not a folder"):
        ImageFolder(folder, files=["n09/x.JPEG"])
    with pytest.raises(UserError, match="image folder not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "void" / "n01").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        ImageFolder(tmp_path / "void")
