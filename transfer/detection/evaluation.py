"""Evaluators for the transfer tasks: COCO (bbox, segm, keypoints, as the predictions hold), Pascal VOC detection,
and semantic segmentation (detectron2's ``SemSegEvaluator``: mIoU, fwIoU, mACC, pACC, IoU and accuracy per class,
label 255 ignored; on the images evaluated, so ``eval_images`` needs nothing more there).

Two additions to detectron2's own evaluators, both off unless asked for:

- ``eval_images``: evaluate on the first N images of the test set only (the toy runs); the COCO evaluator restricts
  ``COCOeval`` to those image ids and the VOC evaluator reads a split file listing them, so ground truth of images
  that were not run does not count as missed.
- ``coco_impl="faster"``: compute COCO AP with ``faster-coco-eval`` (C++ ``evaluate``/``accumulate``, a drop-in
  for pycocotools' ``COCOeval``) in place of detectron2's compiled fast evaluator, which a pure-Python install of
  detectron2 lacks ("Fast COCO eval is not built"). ``tests/test_detection.py`` checks identical AP on the toy
  data; ``transfer/README.md`` has the timings. ``"pycocotools"`` is the official COCO API.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator, SemSegEvaluator
from detectron2.evaluation import coco_evaluation as _coco_evaluation

from ctbench.errors import UserError
from transfer.detection.sem_seg import read_label_png

COCO_IMPLS = ("faster", "pycocotools")
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _cocoeval_fast_impl(impl: str) -> Iterator[None]:
    """Point detectron2's "fast" COCOeval at ``impl`` for the duration of one evaluation (not process-wide)."""
    if impl == "pycocotools":
        yield
        return
    saved = _coco_evaluation.COCOeval_opt
    _coco_evaluation.COCOeval_opt = faster_cocoeval
    try:
        yield
    finally:
        _coco_evaluation.COCOeval_opt = saved


def faster_cocoeval(coco_gt, coco_dt, iou_type: str):
    """``faster_coco_eval.COCOeval_faster`` on the ground truth and results detectron2 loaded with pycocotools.

    faster-coco-eval's evaluator reads indexes that only its own ``COCO`` class builds (``cat_img_map``), so both
    sides are re-indexed from their ``dataset`` dicts (no copy, no change to the annotations: the results keep the
    areas and boxes pycocotools' ``loadRes`` computed, so both implementations score the very same records)."""
    from faster_coco_eval import COCO, COCOeval_faster

    def index(c):
        return c if isinstance(c, COCO) else COCO(c.dataset)

    return COCOeval_faster(index(coco_gt), index(coco_dt), iou_type)


class CocoEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator with an image subset and a choice of COCOeval implementation."""

    def __init__(self, dataset_name: str, output_dir: str | None, *, coco_impl: str = "faster",
                 img_ids: list | None = None, distributed: bool = True, kpt_oks_sigmas=()):
        if coco_impl not in COCO_IMPLS:
            raise UserError(f"unknown COCO evaluation {coco_impl!r}; choose from {', '.join(COCO_IMPLS)}")
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed, kpt_oks_sigmas=kpt_oks_sigmas,
                         use_fast_impl=False)
        self._impl = coco_impl
        self._use_fast_impl = coco_impl == "faster"
        self._img_ids = img_ids

    def evaluate(self, img_ids=None):
        with _cocoeval_fast_impl(self._impl):
            return super().evaluate(img_ids=img_ids if img_ids is not None else self._img_ids)


class VocEvaluator(PascalVOCDetectionEvaluator):
    """detectron2's VOC evaluator (AP at IoU .50:.95, AP50, AP75; 11-point metric on VOC2007, as MoCo reports),
    optionally on the first images of the split only."""

    def __init__(self, dataset_name: str, output_dir: str | None = None, img_ids: list | None = None):
        super().__init__(dataset_name)
        if img_ids is not None:
            if output_dir is None:
                raise ValueError("an image subset needs an output_dir for its split file")
            split = Path(output_dir) / f"{dataset_name}_first{len(img_ids)}.txt"
            split.parent.mkdir(parents=True, exist_ok=True)
            split.write_text("".join(f"{i}\n" for i in img_ids))
            self._image_set_path = str(split)


def load_label(path: str, dtype=int) -> np.ndarray:
    """``SemSegEvaluator``'s ground-truth reader: the class-index PNG as the training mapper reads it (detectron2's
    default ``np.array(..., copy=False)`` raises under NumPy 2: "Unable to avoid copy while creating an array")."""
    return read_label_png(path).astype(dtype)


def build_evaluator(cfg, dataset_name: str, output_dir: str | os.PathLike | None, *, coco_impl: str = "faster",
                    img_ids: list | None = None) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``'s ``evaluator_type`` (``coco``, ``pascal_voc`` or ``sem_seg``)."""
    kind = MetadataCatalog.get(dataset_name).evaluator_type
    out = str(output_dir) if output_dir is not None else None
    if kind == "coco":
        return CocoEvaluator(dataset_name, out, coco_impl=coco_impl, img_ids=img_ids,
                             kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS)
    if kind == "pascal_voc":
        return VocEvaluator(dataset_name, out, img_ids=img_ids)
    if kind == "sem_seg":
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=out, sem_seg_loading_fn=load_label)
    raise UserError(f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}); expected coco, pascal_voc "
                    "or sem_seg")
