"""Transfer with detectron2: Faster/Mask/Keypoint R-CNN and an FCN for semantic segmentation, fine-tuned from a
pretrained ResNet-50.

    python -m transfer.detection --task voc_det                          # newest pretraining output, toy data if
                                                                         # that is what $DETECTRON2_DATASETS holds
    python -m transfer.detection --task voc_det --weights outputs/pretrain/moco_v2/checkpoint.pth.tar --trials 5
    python -m transfer.detection --task coco_mask --weights moco_v2_800ep_d2.pkl --num-gpus 8
    python -m transfer.detection --task coco_kp --weights random         # random-init baseline
    python -m transfer.detection --task voc_det --weights resnet50-0676ba61.pth  # supervised torchvision weights
    python -m transfer.detection --task voc_det_supervised_msra          # MoCo's supervised row: MSRA R-50.pkl, BGR
    python -m transfer.detection --task voc_det --linear-scaling         # one GPU, 2 images: batch/lr/iters scaled
    python -m transfer.detection --task voc_seg --weights model_d2.pkl --trials 5   # VOC semantic segmentation, mIoU
    python -m transfer.detection --task coco_mask --eval-only \
        --weights outputs/transfer/coco_mask/moco_v2/model_final.pth
    python -m transfer.detection --task voc_det SOLVER.MAX_ITER 100 SOLVER.BASE_LR 0.01   # detectron2 KEY VALUE pairs
    make transfer TASK=coco_mask [WEIGHTS=x.pkl] [TRIALS=5] [NPROC=8]

Tasks (``transfer/configs/<task>.yaml``, MoCo's detection protocol): ``voc_det`` (Faster R-CNN R50-C4, VOC07+12 ->
VOC07 test, 24k), ``voc_det_supervised_msra`` (the same from detectron2's MSRA ``R-50.pkl`` with MoCo's BGR/caffe
config: MoCo's supervised row), ``coco_det`` / ``coco_mask`` (R50-FPN 1x), ``coco_det_c4`` / ``coco_mask_c4``
(R50-C4 1x) and their ``_2x`` variants, ``coco_kp`` / ``coco_kp_2x`` (Keypoint R-CNN R50-FPN 1x / 2x);
``voc_seg`` (MoCo's VOC semantic segmentation: FCN on R50 with res5 dilated, VOC2012 train_aug -> val, 30k, mIoU;
``transfer.detection.sem_seg``). Arguments
follow detectron2's ``train_net.py`` (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``,
``--resume``, ``--eval-only``, trailing ``KEY VALUE`` overrides); processes are started by detectron2's ``launch``.
On the embedded toy data (``CTBENCH_TOY.json`` marker) the ``toy.yaml`` override applies (``toy_seg.yaml`` for
``voc_seg``; ``--full`` to refuse it, ``--toy`` to force it).

Outputs: ``$CTBENCH_OUTPUT/transfer/<task>/<run>/`` (``--out``): ``record.json`` (every AP / IoU metric, the task, the
weights' provenance back to the pretraining record), ``log.txt``, ``config.yaml``, ``metrics.json``, TensorBoard
events, ``model_final.pth`` (not in toy runs unless ``--save-model``).

Importing this package registers ``Res5ROIHeadsExtraNorm`` in detectron2's ``ROI_HEADS_REGISTRY`` and
``DilatedFCNHead`` in ``SEM_SEG_HEADS_REGISTRY``, so the detection configs also work with detectron2's own tools
(``voc_seg`` needs ``add_sem_seg_config(cfg)`` before loading its YAML, and ``SemSegDatasetMapper``)::

    python -c "import transfer.detection, runpy, sys; sys.argv = ['train_net', '--config-file',
    'transfer/configs/voc_det.yaml', 'MODEL.WEIGHTS', 'model_d2.pkl'];
    runpy.run_module('tools.train_net', run_name='__main__')"

One process (one GPU or the CPU) keeps MoCo's batch of 16, lr 0.02 and schedule, with BN over the 16 images;
``--linear-scaling`` opts into 2 images per process with lr and schedule scaled linearly. Every run records its
``protocol``: the original config it follows and each way it departs from it. See ``transfer/README.md`` (a protocol
card per task), trials, the toy budget and timings.
"""

import os
import re
import sys
import warnings

# OpenMP threads that spin while waiting (libgomp's default) collapse on a shared CPU: with the 2 cores busy with
# other work, a toy R50-C4 step took 6-9 s with 2 spinning threads and 1 s with OMP_WAIT_POLICY=PASSIVE (or with
# 1 thread); see transfer/README.md. libgomp reads the policy once, when torch loads it, so this only takes effect
# when this package is imported before torch (``python -m transfer.detection``); a value the user set is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# detectron2 0.7 scripts a few helpers with torch.jit.script when imported, which torch 2.14 reports as deprecated,
# and its model_zoo imports pkg_resources: two warnings printed before every command's output, one-line errors
# included. They say nothing about the run.
# The workers of a multi-process run (``--num-gpus N``, torch.multiprocessing spawn) import detectron2 before this
# package (multiprocessing does not re-run a ``__main__`` module), so the launcher hands them the same filters
# through PYTHONWARNINGS (:data:`WORKER_WARNINGS`), with two more that every worker printed: detectron2's DDP wrapper
# passing ``broadcast_buffers`` and its anchor generator calling ``torch.meshgrid`` without ``indexing``.
_QUIET = (("`torch.jit.script` is deprecated", FutureWarning), ("pkg_resources is deprecated", UserWarning))
_QUIET_WORKERS = (("`broadcast_buffers` is deprecated", FutureWarning), ("torch.meshgrid", UserWarning))
for _message, _category in _QUIET:
    warnings.filterwarnings("ignore", message=re.escape(_message), category=_category)
WORKER_WARNINGS = tuple(f"ignore:{m}:{c.__name__}" for m, c in _QUIET + _QUIET_WORKERS)

from transfer.detection.roi_heads import Res5ROIHeadsExtraNorm  # noqa: E402
from transfer.detection.sem_seg import DilatedFCNHead, add_sem_seg_config  # noqa: E402

__all__ = ["DilatedFCNHead", "Res5ROIHeadsExtraNorm", "add_sem_seg_config"]
