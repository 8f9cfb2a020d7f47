"""The transfer tasks: one home for their names, what each reproduces and its schedule.

``python -m transfer.detection --task`` runs each from ``transfer/configs/<task>.yaml``; the orchestrators
(``orchestrate.sweep``, ``orchestrate.demo``) choose from :data:`PRETRAINED_TASKS`. No detectron2 here, so the list
can be read without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

MOCO = "facebookresearch/moco@132aea9 detection/configs"
OSS = "open-mmlab/OpenSelfSup@1db69ec benchmarks/detection/configs"


@dataclass(frozen=True)
class Task:
    """What a task reproduces: ``recipe`` (the original config it follows, with its source; the record's
    ``protocol.recipe``) and ``schedule`` (``24k``, ``1x`` = 90k iterations, ``2x`` = 180k; the record's
    ``schedule``)."""

    recipe: str
    schedule: str


TASK_INFO: dict[str, Task] = {
    "voc_det": Task(f"MoCo VOC07+12 Faster R-CNN R50-C4, 24k, 8 GPUs x 2: {MOCO}/pascal_voc_R_50_C4_24k_moco.yaml",
                    "24k"),
    "voc_det_supervised_msra": Task(
        "MoCo's ImageNet-supervised VOC07+12 baseline (detectron2 MSRA R-50.pkl, BGR, caffe mean/std, "
        f"STRIDE_IN_1X1 True), Faster R-CNN R50-C4, 24k, 8 GPUs x 2: {MOCO}/pascal_voc_R_50_C4_24k.yaml", "24k"),
    "coco_det": Task(f"MoCo protocol, Faster R-CNN R50-FPN 1x, 8 GPUs x 2: {OSS}/coco_R_50_FPN_1x_moco.yaml without "
                     f"the mask head, naiveSyncBN as {MOCO}/Base-RCNN-C4-BN.yaml", "1x"),
    "coco_mask": Task(f"MoCo protocol, Mask R-CNN R50-FPN 1x, 8 GPUs x 2: {OSS}/coco_R_50_FPN_1x_moco.yaml, "
                      f"naiveSyncBN as {MOCO}/Base-RCNN-C4-BN.yaml", "1x"),
    "coco_det_c4": Task(f"MoCo COCO Faster R-CNN R50-C4 1x, 8 GPUs x 2: {MOCO}/coco_R_50_C4_2x_moco.yaml with the 1x "
                        "schedule and no mask head", "1x"),
    "coco_mask_c4": Task(f"MoCo COCO Mask R-CNN R50-C4 1x, 8 GPUs x 2: {MOCO}/coco_R_50_C4_2x_moco.yaml with the 1x "
                         "schedule", "1x"),
    "coco_det_c4_2x": Task(f"MoCo COCO Faster R-CNN R50-C4 2x, 8 GPUs x 2: {MOCO}/coco_R_50_C4_2x_moco.yaml without "
                           "the mask head", "2x"),
    "coco_mask_c4_2x": Task(f"MoCo COCO Mask R-CNN R50-C4 2x, 8 GPUs x 2: {MOCO}/coco_R_50_C4_2x_moco.yaml", "2x"),
    "coco_kp": Task(f"MoCo protocol, Keypoint R-CNN R50-FPN 1x (the schedule JCL reports), 8 GPUs x 2: "
                    f"{OSS}/keypoint_rcnn_R_50_FPN_2x_moco.yaml with the 1x schedule, naiveSyncBN as "
                    f"{MOCO}/Base-RCNN-C4-BN.yaml", "1x"),
    "coco_kp_2x": Task(f"MoCo protocol, Keypoint R-CNN R50-FPN 2x (MoCo paper Table 6), 8 GPUs x 2: "
                       f"{OSS}/keypoint_rcnn_R_50_FPN_2x_moco.yaml, naiveSyncBN as {MOCO}/Base-RCNN-C4-BN.yaml", "2x"),
    "voc_seg": Task("MoCo VOC semantic segmentation (He et al. 2020, arXiv:1911.05722 appendix; no released config): "
                    "FCN R50, res5 dilation 2 (stride 16), two 3x3 convs 256 BN ReLU dilation 6 + 1x1, "
                    "train_aug2012 -> val2012, batch 16 (8 GPUs x 2 as MoCo's detection runs), lr 0.003, steps at "
                    "70/90 %, 30k, scale 0.5-2.0, crop 513, flip, original-size inference", "30k"),
}
TASKS = tuple(TASK_INFO)
SEM_SEG_TASKS = ("voc_seg",)  # SemanticSegmentor (mIoU); the others are detection tasks (AP)
DETECTION_TASKS = tuple(t for t in TASKS if t not in SEM_SEG_TASKS)
OWN_WEIGHTS = ("voc_det_supervised_msra",)  # baselines that bring their own weights (MSRA R-50.pkl): no pretraining
PRETRAINED_TASKS = tuple(t for t in TASKS if t not in OWN_WEIGHTS)  # the tasks that evaluate pretrained weights
