"""What the benchmarks feed: a synthetic ImageNet-layout JPEG folder and the data pipelines compared.

The folder is generated (smooth colour fields plus fine noise, JPEG quality 90: ImageNet-like file sizes and decode
cost), so the benchmark runs the same on a laptop, in CI and on a GPU machine without ImageNet. It is cached under
``$CTBENCH_OUTPUT/bench/data/<W>x<H>-<N>/`` and reused.

Pipelines (ours yield N x V x 3 x S x S float batches on the device, V = 1 + M views of one image; the reference
yields its ``[q, k]`` host tensors, which its step copies):

- ``reference``: ``benchmarks.reference_moco.reference_loader`` (torchvision ImageFolder + TwoCropsTransform, PIL);
- ``pil``: ours with the augmentation in the workers (``data.aug_device=cpu``: ``make pretrain``'s default off CUDA);
- ``device``: ours with decode + crop in the workers and the rest batched on the device (``data.aug_device=gpu``,
  ``pretrain.gpu_aug``; ``make pretrain``'s default on CUDA; on a CPU run: batched on CPU tensors in the main
  process);

Ours are the engine's own loaders (``pretrain.engine.build_pipeline`` + ``Pipeline.loader``: the same dataset,
collate, ``DeviceLoader`` and prefetch as ``make pretrain``).
- ``pil_decode_per_view``: ``pil`` but decoding the file again for every view (shows what decoding once saves
  with JCL's 1 + M views).
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.reference_moco import reference_loader
from ctbench.imagefolder import ImageFolder, seeded
from ctbench.paths import outputs_root
from pretrain.config import resolve_config
from pretrain.data import EpochBatchSampler, MultiViewDataset, collate_views
from pretrain.engine import Pipeline
from pretrain.engine import build_pipeline as engine_pipeline
from pretrain.gpu_aug import CropDataset, collate_crops

PIPELINES = ("reference", "pil", "device", "pil_decode_per_view")


def synthetic_imagefolder(n_images: int, size: tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0,
                          root: Path | None = None, n_val: int = 0) -> Path:
    """``root/train/<class>/<i>.JPEG`` with ``n_images`` images of ``size`` (W, H) (and ``n_val`` in ``val/``);
    returns the train folder."""
    name = f"{size[0]}x{size[1]}-{n_images}" + (f"-val{n_val}" if n_val else "")
    root = root or outputs_root() / "bench" / "data" / name
    train = root / "train"
    marker = root / "SPEC.json"
    spec = {"n_images": n_images, "size": list(size), "classes": classes, "seed": seed, "n_val": n_val}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return train
    w, h = size

    def write(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        d = (train if i < n_images else root / "val") / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:06d}.JPEG", quality=90)

    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 16)) as pool:
        list(pool.map(write, range(n_images + n_val)))
    marker.write_text(json.dumps(spec))
    return train


class DecodePerViewDataset(MultiViewDataset):
    """``MultiViewDataset`` that decodes the file again for every view (the cost decoding once avoids)."""

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        views, target = [], None
        with seeded(seed):
            for _ in range(self.num_views):
                sample = self.folder[index]
                if sample is None:
                    return None
                img, target = sample
                views.append(self.transform(img))
        return torch.stack(views), target  # V x 3 x H x W


def blur_sigma_for(image_size: int) -> tuple[float, float]:
    """MoCo v2's σ range (0.1, 2.0) at 224 px, scaled with the crop (the toy preset's convention)."""
    return (0.1 * image_size / 224, 2.0 * image_size / 224)


class Endless:
    """Iterate a loader across epochs (a new epoch when one ends; for benchmarks that need more batches)."""

    def __init__(self, loader, sampler: EpochBatchSampler | None = None):
        self.loader = loader
        self.sampler = sampler

    def __iter__(self):
        epoch = 0
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1


def build_pipeline(kind: str, root: Path, device: torch.device, *, augmentation: str = "moco_v2",
                   image_size: int = 224, batch: int = 256, num_views: int = 2, workers: int = 8,
                   prefetch: bool = True, out_dtype: torch.dtype = torch.float32, seed: int = 0,
                   crop_backend: str = "pil") -> Endless:
    """An endless iterator of ``(images N x V x 3 x S x S on device, ...)`` batches for pipeline ``kind``."""
    sigma = blur_sigma_for(image_size)
    if kind == "reference":
        if augmentation != "moco_v2" or num_views != 2:
            raise ValueError("the reference pipeline is MoCo v2's two crops")
        loader = reference_loader(str(root), image_size, batch, workers, sigma,
                                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        return Endless(_ReferenceOnDevice(loader, device))
    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline {kind!r}; choose from {', '.join(PIPELINES)}")
    method = "jcl" if num_views > 2 else ("moco_v1" if augmentation == "moco_v1" else "moco_v2")
    cfg = resolve_config(method, "full", overrides=[
        f"data.augmentation={augmentation}", f"data.image_size={image_size}",
        f"data.blur_sigma=[{sigma[0]},{sigma[1]}]",
        f"data.num_keys={num_views - 1}", f"data.workers={workers}", f"data.prefetch={str(prefetch).lower()}",
        f"data.aug_device={'gpu' if kind == 'device' else 'cpu'}", f"train.batch_size={batch}",
        f"train.seed={seed}", "model.queue_size=0"])
    folder = ImageFolder(root)
    pipe = engine_pipeline(cfg, folder, device)
    if kind == "pil_decode_per_view":
        pipe = Pipeline(DecodePerViewDataset(folder, pipe.dataset.transform, num_views), collate_views, None, "cpu")
    elif kind == "device" and crop_backend != "pil":
        spec = dataclasses.replace(pipe.spec, crop_backend=crop_backend)
        pipe = Pipeline(CropDataset(folder, spec, num_views), collate_crops, spec, "gpu")
    sampler = EpochBatchSampler(len(folder), batch, seed=seed)
    return Endless(pipe.loader(sampler, cfg, device, out_dtype), sampler)


class _ReferenceOnDevice:
    """The reference loader's batches as ``([q, k], targets, 0)``, still on the host (pinned on a GPU machine):
    ``benchmarks.reference_moco.reference_step`` copies them with ``.to(device, non_blocking=True)`` per view on
    the step's stream, as main_moco.py does."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader = loader
        self.device = device

    def __iter__(self):
        for views, targets in self.loader:
            yield views, targets, 0
