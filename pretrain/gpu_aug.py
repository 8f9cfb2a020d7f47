"""MoCo v1/v2 augmentation split in two: decode + crop in the DataLoader workers (uint8), then colour jitter,
grayscale, blur, flip and normalisation on whole batches on the device (GPU, or the CPU in the main process).

    spec = AugSpec.preset("moco_v2", image_size=224)
    ds = CropDataset(ImageFolder(root), spec, num_views=2)          # decode once, 1 + M uint8 crops per image
    loader = DataLoader(ds, batch_sampler=EpochBatchSampler(len(ds), 256), collate_fn=collate_crops,
                        num_workers=16, pin_memory=True)
    for crops, params, targets, n_bad in loader:                     # crops: B x V x 3 x S x S uint8
        x = augment_batch(crops.flatten(0, 1).to("cuda", non_blocking=True), params.flatten(0, 1), spec)
        images = x.unflatten(0, crops.shape[:2])                     # B x V x 3 x S x S, normalised float

Why: MoCo v2's PIL augmentation costs ~8 ms per image per core (hue jitter and blur dominate), so a 16-core host
feeds at most ~2,000 img/s (measured per image on the 2-core CPU); on the GPU the same work is a few batched kernels.

Same semantics as the PIL pipeline of ``pretrain.data.build_augmentation`` (facebookresearch/moco main_moco.py):

- every random parameter is drawn on the host, per view, by the same torchvision calls in the same order as the
  PIL ``Compose`` (``RandomResizedCrop.get_params``, ``RandomApply``'s ``torch.rand``, ``ColorJitter.get_params``,
  python ``random.uniform`` for the blur σ, ...), so under one seed both pipelines draw identical parameters
  (``ctbench.imagefolder.seeded`` makes that seed per sample);
- colour jitter is per image, with its own factors AND its own random order of the four ops (torchvision's
  ``fn_idx``); the ops are torchvision's tensor formulas (``_blend`` for brightness/contrast/saturation, an HSV hue
  shift); images are grouped on the host by their op order, so no step needs a device->host sync;
- blur is a true Gaussian with the image's own σ (PIL's ``GaussianBlur(radius=σ)`` is a 3-pass box approximation
  of it), edge pixels replicated as PIL does; grayscale uses ITU-R 601 luma (torchvision's constants);
- differences from PIL are float vs per-op uint8 rounding and the box-vs-true Gaussian (tested in
  ``tests/test_bench_gpu_aug.py``: on fixed parameters each op is within about one grey level on average, hue
  (PIL rotates a uint8 HSV image) within about two; a whole view, same seed, within about 1.5).

Parameters per view (``params`` columns, float32): 0 jitter applied, 1-4 the jitter op order (0 brightness,
1 contrast, 2 saturation, 3 hue), 5-8 the brightness/contrast/saturation/hue factors, 9 grayscale, 10 blur σ
(0 = no blur), 11 horizontal flip.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

from ctbench.errors import choices_error
from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, SeededDataset, collate_skip_bad
from pretrain.data import AUGMENTATIONS

N_PARAMS = 12
JITTER_ON, ORDER, FACTORS, GRAY, SIGMA, FLIP = 0, slice(1, 5), slice(5, 9), 9, 10, 11
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale on tensors


@dataclass(frozen=True)
class AugSpec:
    """One augmentation recipe; :meth:`preset` gives MoCo v1's and v2's."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # 1.0: always (v1, no RandomApply)
    gray_p: float = 0.2
    gray_first: bool = False  # v1 converts to grayscale before the jitter, v2 after
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    crop_backend: str = "pil"  # "pil": PIL's crop + bilinear resize (the reference's pixels); "tensor": torch's
    # antialiased bilinear on uint8 (about 2x faster per crop on one core, within a grey level or so of PIL)

    @staticmethod
    def preset(name: str, image_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0),
               blur_sigma: tuple[float, float] = (0.1, 2.0)) -> AugSpec:
        """The same recipes and arguments as ``pretrain.data.build_augmentation``."""
        if name == "moco_v1":
            return AugSpec(image_size, tuple(crop_scale), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                           gray_first=True, blur_p=0.0)
        if name == "moco_v2":
            return AugSpec(image_size, tuple(crop_scale), blur_sigma=tuple(blur_sigma))
        raise choices_error("augmentation", name, AUGMENTATIONS)

    @property
    def max_sigma(self) -> float:
        return self.blur_sigma[1] if self.blur_p > 0 else 0.0


@functools.lru_cache(maxsize=16)
def _jitter_bounds(jitter: tuple[float, float, float, float]) -> tuple:
    cj = T.ColorJitter(*jitter)  # torchvision's own conversion of strengths to ranges
    return cj.brightness, cj.contrast, cj.saturation, cj.hue


_IDENTITY = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # no jitter, order 0..3


def sample_view(spec: AugSpec, height: int, width: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """Crop box ``(top, left, h, w)`` and the ``N_PARAMS`` parameters of one view, drawn with the same RNG calls
    in the same order as the PIL pipeline (see the module docstring)."""
    box = T.RandomResizedCrop.get_params(torch.empty(0, height, width), list(spec.crop_scale), list(spec.crop_ratio))
    p = _IDENTITY.clone()

    def jitter() -> None:
        order, b, c, s, h = T.ColorJitter.get_params(*_jitter_bounds(tuple(spec.jitter)))
        p[JITTER_ON] = 1.0
        p[ORDER] = order.float()
        p[FACTORS] = torch.tensor([b, c, s, h])

    def gray() -> None:
        if torch.rand(1) < spec.gray_p:
            p[GRAY] = 1.0

    if spec.gray_first:
        gray()
    # v1 has no RandomApply (no draw); v2's RandomApply skips when p < rand
    if spec.jitter_p >= 1.0 or not spec.jitter_p < torch.rand(1):
        jitter()
    if not spec.gray_first:
        gray()
    if spec.blur_p > 0 and not spec.blur_p < torch.rand(1):
        p[SIGMA] = random.uniform(spec.blur_sigma[0], spec.blur_sigma[1])
    if torch.rand(1) < spec.flip_p:
        p[FLIP] = 1.0
    return box, p


def crop_views(img: Image.Image, spec: AugSpec, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_views`` random resized crops of one decoded image as uint8, and their parameters.

    Returns crops V x 3 x S x S (uint8) and params V x N_PARAMS. With ``spec.crop_backend == "pil"`` the crop and
    its bilinear resize are PIL's, as in the reference pipeline (same pixels for the same parameters); with
    ``"tensor"`` the image is converted to a tensor once and every crop is torch's antialiased bilinear resize."""
    s = spec.image_size
    crops = torch.empty(num_views, s, s, 3, dtype=torch.uint8)  # V x S x S x 3
    params = torch.empty(num_views, N_PARAMS)
    whole = torch.from_numpy(np.array(img)).permute(2, 0, 1) if spec.crop_backend == "tensor" else None  # 3 x H x W
    for v in range(num_views):
        (i, j, h, w), params[v] = sample_view(spec, img.height, img.width)
        if whole is not None:
            crops[v] = F2.resized_crop(whole, i, j, h, w, [s, s], antialias=True).permute(1, 2, 0)
        else:
            crop = img.resize((s, s), Image.BILINEAR, box=(j, i, j + w, i + h))
            crops[v].numpy()[:] = np.asarray(crop)  # S x S x 3
    return crops.permute(0, 3, 1, 2), params  # V x 3 x S x S (a channels-last view)


class CropDataset(SeededDataset):
    """Like ``pretrain.data.MultiViewDataset`` (same ``(index, seed)`` items, same per-sample seeding) but returns
    ``(crops V x 3 x S x S uint8, params V x N_PARAMS, target)``; the rest of the augmentation runs batched in
    :func:`augment_batch`."""

    def __init__(self, folder: ImageFolder, spec: AugSpec, num_views: int):
        super().__init__(folder)
        self.spec = spec
        self.num_views = num_views

    def views(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return crop_views(img, self.spec, self.num_views)


def collate_crops(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    """``(crops B x V x 3 x S x S, params B x V x N_PARAMS, targets B, n_bad)``; unreadable samples are replaced
    by readable ones of the same batch, as ``pretrain.data.collate_views`` does."""
    collated, n_bad = collate_skip_bad(batch)
    if collated is None:
        return None, None, None, n_bad
    crops, params, targets = collated
    if n_bad:
        fill = torch.arange(len(batch)) % crops.shape[0]  # B
        crops, params, targets = crops[fill], params[fill], targets[fill]
    return crops, params, targets, n_bad


# ---- batched ops (x: N x 3 x H x W float in [0, 1]; f: N factors) ----------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma.  N x 3 x H x W -> N x 1 x H x W."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)  # torchvision's _blend


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f.view(-1, 1, 1, 1) * x).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # N x 1 x 1 x 1
    return _blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f.view(-1, 1, 1, 1))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``f`` turns (torchvision's RGB->HSV, then the closed-form HSV->RGB)."""
    r, g, b = x.unbind(dim=1)  # N x H x W each
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # N x H x W
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)  # N x H x W
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h[:, None], 6.0)  # N x 3 x H x W
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return maxc[:, None] - (maxc * s)[:, None] * ramp  # N x 3 x H x W


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-image jitter with per-image op order.  x: N x 3 x H x W on any device; params: N x N_PARAMS on the
    CPU. Images are gathered by op order (at most 24 groups, known on the host) and written back."""
    p = params.detach().cpu()
    on = p[:, JITTER_ON] > 0
    if not bool(on.any()):
        return x
    order = p[:, ORDER].long()  # N x 4
    code = order @ torch.tensor([64, 16, 4, 1])  # N: one id per permutation
    idx = torch.nonzero(on).flatten()
    idx = idx[torch.argsort(code[idx], stable=True)]  # n: jittered images grouped by op order
    codes, counts = torch.unique_consecutive(code[idx], return_counts=True)
    factors = p[idx][:, FACTORS]  # n x 4
    idx_dev, factors_dev = _to(idx, x.device), _to(factors, x.device, x.dtype)
    xs = x.index_select(0, idx_dev)  # n x 3 x H x W
    out, start = [], 0
    for c, n in zip(codes.tolist(), counts.tolist()):
        seg, f = xs[start:start + n], factors_dev[start:start + n]
        for op in (c // 64, c // 16 % 4, c // 4 % 4, c % 4):
            seg = _JITTER_OPS[op](seg, f[:, op])
        out.append(seg)
        start += n
    return x.index_copy(0, idx_dev, torch.cat(out))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur image i with σ_i (σ ≤ 0: unchanged); edges replicated.  x: N x 3 x H x W; sigma: N on the CPU."""
    sigma = sigma.detach().cpu()
    idx = torch.nonzero(sigma > 0).flatten()
    if idx.numel() == 0:
        return x
    n, c, hgt, wid = idx.numel(), x.shape[1], x.shape[2], x.shape[3]
    radius = max(1, min(math.ceil(3.0 * max_sigma), min(hgt, wid) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)  # 2R+1
    w = torch.exp(-(t[None] ** 2) / (2.0 * sigma[idx, None] ** 2))  # n x (2R+1)
    w = (w / w.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # nC x (2R+1)
    idx_dev, w = _to(idx, x.device), _to(w, x.device, x.dtype)
    sub = x.index_select(0, idx_dev)  # n x C x H x W
    pad = F.pad(sub, (radius, radius, radius, radius), mode="replicate").reshape(1, n * c, hgt + 2 * radius,
                                                                                    wid + 2 * radius)
    out = F.conv2d(pad, w.view(n * c, 1, 1, -1), groups=n * c)  # 1 x nC x (H+2R) x W
    out = F.conv2d(out, w.view(n * c, 1, -1, 1), groups=n * c)  # 1 x nC x H x W
    return x.index_copy(0, idx_dev, out.view(n, c, hgt, wid))


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host tensor -> device without a stream sync (pinned first when the target is a GPU)."""
    if dtype is not None:
        t = t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment_batch(crops: torch.Tensor, params: torch.Tensor, spec: AugSpec, out_dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
    """Finish the augmentation of a batch of crops on their device.

    crops: N x 3 x S x S uint8 (from :class:`CropDataset`, already on the device); params: N x N_PARAMS (CPU or
    device; the host copy is used to group images, the device copy for masks). Returns N x 3 x S x S, normalised
    with the ImageNet mean/std, in ``out_dtype``, channels-last if asked.
    """
    dev = crops.device
    p_host = params.detach().cpu()
    p_dev = params.to(dev, non_blocking=True) if params.device != dev else params
    x = crops.float().div_(255.0)  # N x 3 x S x S in [0, 1]
    gray_mask = (p_dev[:, GRAY] > 0).view(-1, 1, 1, 1)
    if spec.gray_first:
        x = torch.where(gray_mask, grayscale(x).expand_as(x), x)
    x = color_jitter(x, p_host)
    if not spec.gray_first:
        x = torch.where(gray_mask, grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, p_host[:, SIGMA], spec.max_sigma)
    x = torch.where((p_dev[:, FLIP] > 0).view(-1, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(out_dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class DeviceLoader:
    """Batches on the device, one batch ahead: the host->device copy (from pinned memory) and, for
    :class:`CropDataset` batches, :func:`augment_batch` run on a side CUDA stream while the current step computes.

        loader = DeviceLoader(DataLoader(..., pin_memory=True), device, spec)   # spec=None: batches already augmented
        for images, targets, n_bad in loader:                                     # images: B x V x 3 x S x S
            ...

    Accepts ``(images, targets, n_bad)`` batches (``pretrain.data.collate_views``) or ``(crops, params, targets,
    n_bad)`` batches (:func:`collate_crops`, augmented here). On the CPU, or with ``prefetch=False``, batches are
    prepared in turn on the current stream.
    """

    def __init__(self, loader, device: torch.device | str, spec: AugSpec | None = None, prefetch: bool = True,
                 channels_last: bool = False, out_dtype: torch.dtype = torch.float32):
        self.loader = loader
        self.device = torch.device(device)
        self.spec = spec
        self.prefetch = prefetch and self.device.type == "cuda"
        self.channels_last = channels_last
        self.out_dtype = out_dtype

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch: tuple) -> tuple:
        if self.spec is None:
            images, targets, n_bad = batch
            if images is not None:
                images = images.to(self.device, non_blocking=True)  # B x V x 3 x S x S
            return images, targets, n_bad
        crops, params, targets, n_bad = batch
        if crops is None:
            return None, None, n_bad
        b, v = crops.shape[:2]
        x = augment_batch(crops.to(self.device, non_blocking=True).flatten(0, 1), params.flatten(0, 1), self.spec,
                          self.out_dtype, self.channels_last)  # (B V) x 3 x S x S
        return x.unflatten(0, (b, v)), targets, n_bad  # B x V x 3 x S x S

    def __iter__(self):
        it = iter(self.loader)
        if not self.prefetch:
            for batch in it:
                yield self._prepare(batch)
            return
        stream = torch.cuda.Stream(self.device)

        def load() -> tuple | None:
            try:
                batch = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._prepare(batch)

        nxt = load()
        while nxt is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(stream)
            if nxt[0] is not None:
                nxt[0].record_stream(main)  # allocated on the side stream, used on the main one
            cur, nxt = nxt, load()
            yield cur
