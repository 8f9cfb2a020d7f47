"""The transfer tasks: one home for their names, what each reproduces, its schedule and the program that runs it.

``python -m transfer.detection --task`` runs the detectron2 tasks (:data:`TASKS`) from
``transfer/configs/<task>.yaml``; ``python -m transfer.voc07_svm`` runs the VOC07 linear-SVM classification on frozen
features. ``make transfer TASK=...`` takes any of :data:`ALL_TASKS`; ``python -m transfer.tasks`` (``make tasks``)
lists them. The orchestrators (``orchestrate.sweep``, ``orchestrate.demo``) choose from :data:`PRETRAINED_TASKS`. No
detectron2 and no torch here, so the list can be read without importing either.
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
VOC07_SVM = "voc07_svm"  # frozen features + one linear SVM per class (python -m transfer.voc07_svm)
VOC07_SVM_INFO = Task("VOC07 linear SVM (Goyal et al. 2019): facebookresearch/fair_self_supervision_benchmark, "
                      "open-mmlab/mmselfsup tools/benchmarks/classification/svm_voc07 (feat5: res5 AvgPool2d(6, 1), "
                      "LinearSVC, costs 1/10/100 + 0.5^4..0.5^19, 3-fold CV of AP)", "-")
ALL_TASKS = (*TASKS, VOC07_SVM)  # what make transfer TASK= takes
PROGRAMS = {**{t: "transfer.detection" for t in TASKS}, VOC07_SVM: "transfer.voc07_svm"}
OWN_WEIGHTS = ("voc_det_supervised_msra",)  # baselines that bring their own weights (MSRA R-50.pkl): no pretraining
PRETRAINED_TASKS = tuple(t for t in TASKS if t not in OWN_WEIGHTS)  # the tasks that evaluate pretrained weights


def listing() -> str:
    """One line per task: name, program, schedule, recipe (what ``make tasks`` prints)."""
    info = {**TASK_INFO, VOC07_SVM: VOC07_SVM_INFO}
    width = max(map(len, ALL_TASKS))
    lines = [f"{'task':<{width}}  {'program':<20} {'schedule':<8} recipe"]
    lines += [f"{t:<{width}}  {PROGRAMS[t]:<20} {info[t].schedule:<8} {info[t].recipe}" for t in ALL_TASKS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(listing())
