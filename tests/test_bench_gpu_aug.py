"""pretrain.gpu_aug (the batched device-side MoCo augmentation) against its references: torchvision's tensor ops
(exact up to float rounding), the PIL ops on fixed parameters, the whole PIL pipeline under the same seed, and the
parameter distribution of MoCo v2 (per-image jitter order and factors)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD, seeded
from pretrain import gpu_aug as G
from pretrain.data import build_augmentation


def _image(w=64, h=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def _t(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img)[None].float() / 255  # 1 x 3 x H x W


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * 255


@pytest.mark.parametrize("f", [0.6, 0.9, 1.4])
def test_blend_ops_equal_torchvision_tensor_ops(f):
    x = torch.cat([_t(_image(seed=s)) for s in range(3)])  # 3 x 3 x H x W
    fv = torch.full((3,), f)
    for ours, tv in [(G.adjust_brightness, TF.adjust_brightness), (G.adjust_contrast, TF.adjust_contrast),
                     (G.adjust_saturation, TF.adjust_saturation)]:
        torch.testing.assert_close(ours(x, fv), tv(x, f), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h", [-0.4, -0.1, 0.0, 0.05, 0.3])
def test_hue_equals_torchvision_tensor_op(h):
    x = torch.cat([_t(_image(seed=s)) for s in range(2)])
    x[0, :, :4, :4] = 0.5  # grey pixels (max == min) take the no-hue branch
    torch.testing.assert_close(G.adjust_hue(x, torch.full((2,), h)), TF.adjust_hue(x, h), rtol=0, atol=2e-6)


def test_ops_match_pil_on_fixed_parameters():
    img = _image(64, 64)
    x = _t(img)
    cases = [
        (TF.adjust_brightness(img, 1.3), G.adjust_brightness(x, torch.tensor([1.3])), 1.0),
        (TF.adjust_contrast(img, 0.7), G.adjust_contrast(x, torch.tensor([0.7])), 1.0),
        (TF.adjust_saturation(img, 1.4), G.adjust_saturation(x, torch.tensor([1.4])), 1.0),
        (TF.adjust_hue(img, 0.08), G.adjust_hue(x, torch.tensor([0.08])), 2.0),  # PIL rotates a uint8 HSV image
        (TF.rgb_to_grayscale(img, 3), G.grayscale(x).expand(1, 3, 64, 64), 1.0),
    ]
    for sigma in (0.3, 1.0, 2.0):  # PIL: 3-pass box approximation of the Gaussian; ours: the Gaussian
        cases.append((img.filter(ImageFilter.GaussianBlur(radius=sigma)),
                      G.gaussian_blur(x, torch.tensor([sigma]), 2.0), 1.0))
    for pil, ours, mean_levels in cases:
        d = _levels(_t(pil), ours)
        assert d.mean() < mean_levels, (d.mean(), mean_levels)


def test_blur_leaves_unblurred_images_and_uses_each_sigma():
    x = torch.cat([_t(_image(seed=s)) for s in range(3)])
    out = G.gaussian_blur(x, torch.tensor([0.0, 0.5, 2.0]), 2.0)
    assert torch.equal(out[0], x[0])
    err_small = _levels(out[1], x[1]).mean()
    err_large = _levels(out[2], x[2]).mean()
    assert 0 < err_small < err_large
    ref = G.gaussian_blur(x[2:3], torch.tensor([2.0]), 2.0)
    torch.testing.assert_close(out[2:3], ref)  # batching does not mix images


def test_jitter_order_is_per_image():
    """Two images with different op orders in one batch: each equals its own ops applied in its own order."""
    x = torch.cat([_t(_image(seed=s)) for s in range(4)])
    orders = [(3, 0, 2, 1), (1, 2, 0, 3), (3, 0, 2, 1), (0, 1, 2, 3)]
    factors = [(1.3, 0.7, 1.4, 0.1), (0.8, 1.2, 0.6, -0.07), (0.9, 1.1, 1.2, 0.05), (1.0, 1.0, 1.0, 0.0)]
    p = torch.zeros(4, G.N_PARAMS)
    for i in range(3):
        p[i, G.JITTER_ON] = 1
        p[i, G.ORDER] = torch.tensor(orders[i], dtype=torch.float32)
        p[i, G.FACTORS] = torch.tensor(factors[i])
    out = G.color_jitter(x, p)
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(3):
        ref = x[i:i + 1]
        for op in orders[i]:
            ref = tv_ops[op](ref, factors[i][op])
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=3e-6)
    assert torch.equal(out[3], x[3])  # jitter not applied
    in_fixed_order = x[0:1]  # same factors, fixed order 0,1,2,3: a different image, so the order was honoured
    for op in range(4):
        in_fixed_order = tv_ops[op](in_fixed_order, factors[0][op])
    assert (out[0:1] - in_fixed_order).abs().max() > 1e-2


@pytest.mark.parametrize("aug", ["moco_v2", "moco_v1"])
def test_whole_view_matches_pil_pipeline_under_the_same_seed(aug):
    """Same seed -> same parameters as the PIL Compose -> images within ~1.5 grey levels on average."""
    img = _image(96, 72)
    pil = build_augmentation(aug, 48, blur_sigma=(0.1, 2.0))
    spec = G.AugSpec.preset(aug, 48, blur_sigma=(0.1, 2.0))
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    means = []
    for seed in range(24):
        with seeded(seed):
            a = pil(img)  # 3 x S x S normalised
        with seeded(seed):
            crops, params = G.crop_views(img, spec, 1)
        b = G.augment_batch(crops, params, spec)[0]
        means.append(float(((a - b) * std).abs().mean() * 255))
    assert np.mean(means) < 2.0 and max(means) < 4.0, means


def test_parameter_distribution_is_moco_v2():
    spec = G.AugSpec.preset("moco_v2", 32)
    with seeded(123):
        p = torch.stack([G.sample_view(spec, 80, 60)[1] for _ in range(1500)])
    on = p[:, G.JITTER_ON] > 0
    assert abs(on.float().mean() - 0.8) < 0.04
    assert abs((p[:, G.GRAY] > 0).float().mean() - 0.2) < 0.04
    assert abs((p[:, G.SIGMA] > 0).float().mean() - 0.5) < 0.05
    assert abs((p[:, G.FLIP] > 0).float().mean() - 0.5) < 0.05
    sig = p[p[:, G.SIGMA] > 0, G.SIGMA]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    f = p[on][:, G.FACTORS]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert f[:, j].min() >= lo and f[:, j].max() <= hi
        assert abs(float(f[:, j].mean()) - (lo + hi) / 2) < 0.03 * (hi - lo) * 4
    orders = {tuple(o) for o in p[on][:, G.ORDER].long().tolist()}
    assert orders == set(itertools.permutations(range(4)))  # every order occurs: drawn per image


def test_crop_dataset_and_collate_give_uint8_views(tmp_path):
    from ctbench.imagefolder import ImageFolder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _image(50, 40, seed=i).save(tmp_path / c / f"{i}.JPEG")
    (tmp_path / "b" / "bad.JPEG").write_bytes(b"not an image")
    spec = G.AugSpec.preset("moco_v2", 24)
    ds = G.CropDataset(ImageFolder(tmp_path), spec, num_views=3)
    batch = [ds[(i, 100 + i)] for i in range(len(ds))]
    crops, params, targets, n_bad = G.collate_crops(batch)
    assert n_bad == 1 and crops.shape == (5, 3, 3, 24, 24) and crops.dtype == torch.uint8
    assert params.shape == (5, 3, G.N_PARAMS) and targets.shape == (5,)
    again = ds[(0, 100)]
    assert torch.equal(again[0], batch[0][0]) and torch.equal(again[1], batch[0][1])  # seeded per sample
    x = G.augment_batch(crops.flatten(0, 1), params.flatten(0, 1), spec, torch.bfloat16, channels_last=True)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.isfinite(x.float()).all() and x.float().mul(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).add(
        mean).min() >= -1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    img = _image(96, 72)
    spec = G.AugSpec.preset("moco_v2", 48)
    with seeded(0):
        pairs = [G.crop_views(img, spec, 2) for _ in range(8)]
    crops = torch.cat([c for c, _ in pairs])
    params = torch.cat([p for _, p in pairs])
    cpu = G.augment_batch(crops, params, spec)
    gpu = G.augment_batch(crops.cuda(), params, spec).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)


def test_tensor_crop_backend_is_close_to_pil():
    img = _image(96, 72)
    pil_spec = G.AugSpec.preset("moco_v2", 40)
    tensor_spec = G.AugSpec(40, crop_backend="tensor")
    with seeded(7):
        a, pa = G.crop_views(img, pil_spec, 4)
    with seeded(7):
        b, pb = G.crop_views(img, tensor_spec, 4)
    assert torch.equal(pa, pb)  # same parameters
    assert (a.float() - b.float()).abs().mean() < 1.5  # grey levels
