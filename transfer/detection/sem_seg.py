"""Semantic segmentation on detectron2's ``SemanticSegmentor``: MoCo's FCN head, its config keys, its data pipeline.

MoCo (He et al. 2020, arXiv:1911.05722, appendix "Semantic segmentation"; the protocol CO2 follows) fine-tunes an
FCN: ResNet-50 with the 3x3 convolutions of res5 at dilation 2 and stride 1 (total stride 16, "FCN-16s"), then two
3x3 convolutions of 256 channels with BN and ReLU at dilation 6 (DeepLab's large field of view) and a 1x1 classifier.
Training: random scaling by a ratio in [0.5, 2.0], a 513 x 513 crop, horizontal flip; inference on the original
image. ``transfer/configs/voc_seg.yaml`` holds every value with its source.

- :class:`DilatedFCNHead`, registered in detectron2's ``SEM_SEG_HEADS_REGISTRY`` on ``import transfer.detection``.
- :func:`add_sem_seg_config`: the keys the head and the augmentation read that detectron2's ``get_cfg`` lacks
  (``MODEL.SEM_SEG_HEAD.NUM_CONVS``, ``MODEL.SEM_SEG_HEAD.DILATION``, ``INPUT.RANDOM_SCALE``), as detectron2's
  projects add theirs (``add_deeplab_config``); the launcher adds them to every segmentation config.
- :class:`SemSegDatasetMapper`: reads the label PNG as class indices. detectron2's ``DatasetMapper`` reads it with
  ``read_image(..., "L")``, which turns VOC's palette PNGs (mode ``P``) into the grey levels of their colours, not
  the class indices; ``SemSegEvaluator`` reads them as indices, so training and evaluation would disagree.
"""

from __future__ import annotations

import copy
from pathlib import Path

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ctbench.errors import UserError

SEM_SEG_ARCH = "SemanticSegmentor"
LABEL_MODES = ("P", "L")  # class-index PNGs: VOC's palette masks (SegmentationClass) or grey ones (SBD-aug releases)


def add_sem_seg_config(cfg: CfgNode) -> None:
    """Add the keys of :class:`DilatedFCNHead` and of the training augmentation, with MoCo's values as defaults."""
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2  # MoCo appendix: "two extra 3x3 convolutions of 256 channels"
    cfg.MODEL.SEM_SEG_HEAD.DILATION = 6  # MoCo appendix: "dilation = 6 in the two extra 3x3 convolutions"
    cfg.INPUT.RANDOM_SCALE = (0.5, 2.0)  # MoCo appendix: "random scaling (by a ratio in [0.5, 2.0])"


def is_sem_seg(cfg: CfgNode) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == SEM_SEG_ARCH


def is_sem_seg_file(config: str | Path) -> bool:
    """Whether a detectron2 YAML (with its ``_BASE_`` chain) builds a ``SemanticSegmentor``."""
    try:
        merged = CfgNode.load_yaml_with_base(str(config), allow_unsafe=False)
    except Exception:  # noqa: BLE001 -- unreadable: merge_from_file gives the one-line error
        return False
    return (merged.get("MODEL") or {}).get("META_ARCHITECTURE") == SEM_SEG_ARCH


@SEM_SEG_HEADS_REGISTRY.register()
class DilatedFCNHead(nn.Module):
    """MoCo's segmentation head on one backbone feature (``res5`` at stride 16):
    ``NUM_CONVS`` x [3x3 conv, ``CONVS_DIM`` channels, dilation ``DILATION``, ``NORM``, ReLU] -> 1x1 conv to
    ``NUM_CLASSES`` logits, upsampled bilinearly by the feature stride.

    Training: per-pixel cross-entropy (mean over the pixels whose label is not ``IGNORE_VALUE``) x ``LOSS_WEIGHT``,
    on the logits cut to the target's size (a 513 crop at stride 16 has 33 x 33 features = 528 px upsampled).
    Inference: the upsampled logits; ``SemanticSegmentor`` cuts them to the image and resizes to its original size.

    Shape: features ``[N, C, H/16, W/16]`` -> logits ``[N, NUM_CLASSES, 16 * ceil(H/16), 16 * ceil(W/16)]``.

    Init (the appendix names none): the 3x3 convolutions as detectron2's ``SemSegFPNHead`` (``c2_msra_fill``), the
    classifier as detectron2's ``projects/DeepLab`` heads (normal, std 0.001; bias 0).
    """

    def __init__(self, cfg: CfgNode, input_shape: dict[str, ShapeSpec]):
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise UserError(f"DilatedFCNHead reads one feature map; MODEL.SEM_SEG_HEAD.IN_FEATURES is "
                            f"{list(head.IN_FEATURES)}")
        self.in_feature = head.IN_FEATURES[0]
        shape = input_shape[self.in_feature]
        if shape.stride != head.COMMON_STRIDE:
            raise UserError(f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE {head.COMMON_STRIDE} but {self.in_feature} has stride "
                            f"{shape.stride} (MODEL.RESNETS.RES5_DILATION {cfg.MODEL.RESNETS.RES5_DILATION})")
        self.stride = shape.stride
        self.ignore_value = head.IGNORE_VALUE
        self.loss_weight = head.LOSS_WEIGHT
        channels, d = shape.channels, head.DILATION
        self.convs = nn.Sequential()
        for i in range(head.NUM_CONVS):
            conv = Conv2d(channels, head.CONVS_DIM, kernel_size=3, padding=d, dilation=d, bias=not head.NORM,
                          norm=get_norm(head.NORM, head.CONVS_DIM), activation=F.relu)
            weight_init.c2_msra_fill(conv)
            self.convs.add_module(f"conv{i + 1}", conv)
            channels = head.CONVS_DIM
        self.predictor = Conv2d(channels, head.NUM_CLASSES, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, features: dict[str, torch.Tensor], targets: torch.Tensor | None = None):
        x = self.predictor(self.convs(features[self.in_feature]))  # [N, K, h, w]
        x = F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)  # [N, K, 16h, 16w]
        if not self.training:
            return x, {}
        h, w = targets.shape[-2:]
        loss = F.cross_entropy(x[..., :h, :w], targets, ignore_index=self.ignore_value, reduction="mean")
        return None, {"loss_sem_seg": loss * self.loss_weight}


class PadTransform(T.Transform):
    """Pad at the bottom and right to ``h x w`` at least: the image with ``pixel`` (one value per channel, as float),
    the label with ``seg_value``. A crop smaller than the crop size (an image scaled below it) becomes a full-size
    crop whose padding is the mean pixel (0 after the model's normalisation) and ignored in the loss, as DeepLab's
    pad-then-crop; detectron2's own PadTransform takes one pad value for all channels."""

    def __init__(self, pad_h: int, pad_w: int, pixel: tuple[float, ...], seg_value: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        out = np.empty((h + self.pad_h, w + self.pad_w, *img.shape[2:]), np.float32)
        out[...] = np.asarray(self.pixel, np.float32) if img.ndim == 3 else self.pixel[0]
        out[:h, :w] = img
        return out

    def apply_segmentation(self, seg: np.ndarray) -> np.ndarray:
        return np.pad(seg, ((0, self.pad_h), (0, self.pad_w)), constant_values=self.seg_value)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords  # the origin stays where it is


class PadTo(T.Augmentation):
    """:class:`PadTransform` to ``size`` (h, w)."""

    def __init__(self, size: tuple[int, int], pixel: tuple[float, ...], seg_value: int):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        return PadTransform(max(0, self.size[0] - h), max(0, self.size[1] - w), tuple(self.pixel), self.seg_value)


class RandomScale(T.Augmentation):
    """Resize both sides by one ratio drawn uniformly from ``[low, high]`` (image bilinear, label nearest)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        s = self._rand_range(self.low, self.high)
        return T.ResizeTransform(h, w, max(1, round(h * s)), max(1, round(w * s)), Image.BILINEAR)


def build_augmentation(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Training: ``INPUT.RANDOM_SCALE`` -> ``INPUT.CROP`` (``absolute``; padded to the crop size, see
    :class:`PadTransform`) -> ``INPUT.RANDOM_FLIP``. Test: none when ``INPUT.MIN_SIZE_TEST`` is 0 (the original size,
    MoCo's inference), else detectron2's ``ResizeShortestEdge``."""
    if not is_train:
        if not cfg.INPUT.MIN_SIZE_TEST:
            return []
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    low, high = cfg.INPUT.RANDOM_SCALE
    augs: list[T.Augmentation] = [RandomScale(low, high)]
    if cfg.INPUT.CROP.ENABLED:
        if cfg.INPUT.CROP.TYPE != "absolute":
            raise UserError(f"semantic segmentation crops are INPUT.CROP.TYPE absolute (a crop size in pixels), got "
                            f"{cfg.INPUT.CROP.TYPE!r}")
        size = tuple(int(s) for s in cfg.INPUT.CROP.SIZE)
        augs += [T.RandomCrop("absolute", size),
                 PadTo(size, tuple(cfg.MODEL.PIXEL_MEAN), cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs


def read_label_png(path: str | Path) -> np.ndarray:
    """The class-index array of a label PNG (``P`` or ``L`` mode), ``[H, W]`` uint8."""
    with Image.open(path) as im:
        if im.mode not in LABEL_MODES:
            raise UserError(f"{path}: a {im.mode} image; semantic segmentation labels are class-index PNGs "
                            f"(mode {' or '.join(LABEL_MODES)}: VOC's palette masks, or SegmentationClassAug's grey "
                            "ones), not colour images")
        return np.array(im, dtype=np.uint8)


class SemSegDatasetMapper:
    """Dataset dict -> model input: ``image`` ``[C, H, W]`` in ``INPUT.FORMAT`` (uint8, or float32 once padded) and,
    in training, ``sem_seg`` ``[H, W]`` int64 class indices (``IGNORE_VALUE`` where void or padded)."""

    def __init__(self, cfg: CfgNode, is_train: bool):
        self.augmentations = T.AugmentationList(build_augmentation(cfg, is_train))
        self.image_format = cfg.INPUT.FORMAT
        self.is_train = is_train

    def __call__(self, dataset_dict: dict) -> dict:
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        label_file = d.pop("sem_seg_file_name")
        label = read_label_png(label_file) if self.is_train else None
        if label is not None and label.shape != image.shape[:2]:
            raise UserError(f"{label_file}: {label.shape[1]} x {label.shape[0]} label for a {image.shape[1]} x "
                            f"{image.shape[0]} image {d['file_name']}")
        aug = T.AugInput(image, sem_seg=label)
        self.augmentations(aug)
        d["image"] = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        if label is not None:
            d["sem_seg"] = torch.as_tensor(aug.sem_seg.astype(np.int64))
        return d
