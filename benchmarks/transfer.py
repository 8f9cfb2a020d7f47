"""Transfer-stage timings: checkpoint converter, detectron2 s/iter per task, linear probe cached vs standard.

- converter: ``python -m transfer.convert`` vs MoCo's converter (``benchmarks.reference_convert``), both as the
  command a user runs (interpreter start and imports included), on the same ResNet-50 checkpoint;
- detectron2: training iterations (model only, synthetic images with boxes/masks/keypoints, converted weights) of
  each task's model as ``transfer.detection`` configures it (``transfer/configs/<task>.yaml``, + ``toy.yaml`` on
  CPU, one process), beside the reference architecture: detectron2's model-zoo config with MoCo's detection deltas
  (RGB, ImageNet mean/std, ``STRIDE_IN_1X1: False``, ``FREEZE_AT: 0``, BN for SyncBN) and the same sampling sizes;
- linear probe: ``transfer.linear`` per-epoch time in ``cached`` mode vs ``standard`` mode, when that module is in
  the checkout.

A stage whose module is not in the checkout gets a row that says so instead of a number.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.inputs import synthetic_imagefolder
from benchmarks.measure import time_calls

D2_TASKS = {  # task -> (model-zoo config, classes); MoCo's detection configs start from these architectures
    "voc_det": ("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", 20),
    "coco_det": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 80),
    "coco_mask": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", 80),
    "coco_det_c4": ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", 80),
    "coco_mask_c4": ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", 80),
    "coco_kp": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", 1),
}
# detectron2 MODEL_ZOO.md, "train time (s/iter)" of the R50-FPN 1x baselines: 8 V100, 16 images/iter
MODEL_ZOO_V100_S_PER_ITER = {"coco_det": 0.210, "coco_mask": 0.261}


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _checkpoints(tmp: Path) -> tuple[Path, Path]:
    """A ResNet-50 pretraining checkpoint in our format and the same tensors as MoCo's (``module.`` prefix)."""
    from pretrain.config import resolve_config
    from pretrain.engine import Progress, checkpoint_dict
    from pretrain.model import ContrastiveModel

    cfg = resolve_config("moco_v2", "full", overrides=["model.queue_size=256", "train.batch_size=256"])
    torch.manual_seed(0)
    model = ContrastiveModel(queue_size=256)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9)
    ours = checkpoint_dict(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False), Progress(), {})
    torch.save(ours, tmp / "ours.pth.tar")
    moco = {"epoch": 200, "arch": "resnet50", "optimizer": opt.state_dict(),
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(moco, tmp / "moco.pth.tar")
    return tmp / "ours.pth.tar", tmp / "moco.pth.tar"


def _run_cli(args: list[str], repeats: int = 2) -> tuple[float, str]:
    best, err = float("inf"), ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            return float("nan"), (proc.stderr.strip().splitlines() or ["failed"])[-1]
        best = min(best, time.perf_counter() - t0)
    return best, err


def bench_convert(tmp: Path, log: Callable[[str], None]) -> tuple[list[dict], Path]:
    ours_ckpt, moco_ckpt = _checkpoints(tmp)
    ref_s, ref_err = _run_cli(["-m", "benchmarks.reference_convert", str(moco_ckpt), str(tmp / "ref.pkl")])
    row = {"name": "converter (checkpoint -> detectron2 .pkl)", "kind": "convert", "reference_s": ref_s,
           "reference_text": f"{ref_s:.2f} s (MoCo's script)"}
    pkl = tmp / "ref.pkl"
    if _have("transfer.convert"):
        s, err = _run_cli(["-m", "transfer.convert", str(ours_ckpt), str(tmp / "ours.pkl")])
        row.update(measured_s=s, measured_text=f"{s:.2f} s", ratio_vs_reference=ref_s / s if s == s else None,
                   note=err or "whole command, interpreter start included, best of 2")
        if s == s:
            pkl = tmp / "ours.pkl"
    else:
        row.update(measured_text="not measured", note="transfer.convert is not in this checkout")
    if ref_err:
        row["note"] = f"reference failed: {ref_err}"
    log(f"convert: {row['measured_text']} vs reference {row['reference_text']}")
    return [row], pkl


def _d2_inputs(task: str, classes: int, size: int, batch: int, device: torch.device) -> list[dict]:
    from detectron2.structures import BitMasks, Boxes, Instances, Keypoints

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        img = (torch.rand(3, size, size, generator=g) * 255).to(device)
        n = 3
        xy = torch.rand(n, 2, generator=g) * size * 0.5
        wh = torch.rand(n, 2, generator=g) * size * 0.4 + size * 0.1
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)  # n x 4 (x0, y0, x1, y1)
        inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.randint(classes, (n,), generator=g))
        if "mask" in task:
            masks = torch.zeros(n, size, size, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        if task == "coco_kp":
            kp = torch.rand(n, 17, 2, generator=g) * wh[:, None] + xy[:, None]  # inside the boxes
            inst.gt_keypoints = Keypoints(torch.cat([kp, torch.full((n, 17, 1), 2.0)], dim=2))
        out.append({"image": img, "instances": inst.to(device), "height": size, "width": size})
    return out


def _reference_d2_cfg(task: str, like):
    """The reference architecture: detectron2's model-zoo config with MoCo's detection deltas, and the same
    sampling sizes (RPN/RoI batch, proposals) and images per iteration as ``like`` (ours)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    zoo, classes = D2_TASKS[task]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo))
    cfg.MODEL.DEVICE = like.MODEL.DEVICE
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "BN"  # SyncBN on one process
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = classes
    for key in ("BATCH_SIZE_PER_IMAGE", "PRE_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TRAIN"):
        cfg.MODEL.RPN[key] = like.MODEL.RPN[key]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = like.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    cfg.SOLVER.IMS_PER_BATCH = like.SOLVER.IMS_PER_BATCH
    return cfg


def _ours_d2_cfg(task: str, toy: bool, device: torch.device):
    from transfer.detection import config as C  # importing transfer.detection registers its ROI head

    cfg = C.load_config(C.config_file(task), toy=toy, opts=["MODEL.DEVICE", device.type])
    C.adapt(cfg, 1, set())
    return cfg


def _time_d2(cfg, task: str, weights: Path | None, size: int, steps: int, warmup: int):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    device = torch.device(cfg.MODEL.DEVICE)
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(str(weights))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9, weight_decay=1e-4)
    inputs = _d2_inputs(task, cfg.MODEL.ROI_HEADS.NUM_CLASSES, size, cfg.SOLVER.IMS_PER_BATCH, device)

    def step() -> None:
        loss = sum(model(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    with EventStorage(0):  # detectron2's models log into the trainer's event storage
        return time_calls(step, device, cfg.SOLVER.IMS_PER_BATCH, steps, warmup)


def bench_detectron2(weights: Path | None, device: torch.device, size: int, steps: int, warmup: int, toy: bool,
                     log: Callable[[str], None]) -> list[dict]:
    """s/iter of each task's model as our launcher configures it (``transfer/configs``), beside the reference
    architecture (:func:`_reference_d2_cfg`) with the same sampling sizes, on synthetic images of ``size`` px."""
    if not _have("detectron2") or not _have("transfer.detection"):
        missing = "detectron2 is not importable" if not _have("detectron2") else "transfer.detection is missing"
        return [{"name": f"detectron2 {t}", "kind": "detectron2", "measured_text": "not measured", "note": missing}
                for t in D2_TASKS]
    from detectron2.utils.logger import setup_logger

    for name in ("fvcore", "detectron2", "transfer.detection"):
        setup_logger(name=name, output=None).setLevel("ERROR")
    rows = []
    for task in D2_TASKS:
        ours_cfg = _ours_d2_cfg(task, toy, device)
        ref = _time_d2(_reference_d2_cfg(task, ours_cfg), task, weights, size, steps, warmup)
        ours = _time_d2(ours_cfg, task, weights, size, steps, warmup)
        ims, roi = ours_cfg.SOLVER.IMS_PER_BATCH, ours_cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
        row = {"name": f"detectron2 {task} s/iter", "kind": "detectron2", "task": task,
               "s_per_iter": ours.s_per_step, "reference_s_per_iter": ref.s_per_step, "peak_mb": ours.peak_mb,
               "ratio_vs_reference": ref.s_per_step / ours.s_per_step,
               "measured_text": f"{ours.s_per_step:.3f} s/iter",
               "reference_text": f"{ref.s_per_step:.3f} s/iter ({D2_TASKS[task][0].split('/')[-1]})",
               "note": f"{ims} images of {size} px per iter, {roi} RoIs/image; transfer/configs/{task}.yaml"
                       + (" + toy.yaml" if toy else "")}
        if task in MODEL_ZOO_V100_S_PER_ITER:
            row["note"] += f"; model zoo: {MODEL_ZOO_V100_S_PER_ITER[task]} s/iter for 16 images on 8 V100"
        rows.append(row)
        log(f"detectron2 {task}: {ours.s_per_step:.3f} s/iter (reference config {ref.s_per_step:.3f})")
    return rows


def bench_linear(ckpt: Path, tmp: Path, s, log: Callable[[str], None]) -> list[dict]:
    """``python -m transfer.linear`` in ``standard`` and ``cached`` mode on the same synthetic ImageNet; the per-epoch
    times come from the two run records (``s_per_epoch``; the cached mode's one-off feature pass is ``extract_s``)."""
    name = "linear probe per epoch, cached vs standard"
    if not _have("transfer.linear"):
        return [{"name": name, "kind": "linear_speedup", "measured_text": "not measured",
                 "note": "transfer.linear is not in this checkout"}]
    from ctbench.records import load_record

    gpu = s.device == "cuda"
    n_train, n_val = (16, 8) if s.quick else ((4096, 512) if gpu else (512, 64))
    data = synthetic_imagefolder(n_train, tuple(s.source_size), n_val=n_val).parent
    epochs = 1 if s.quick else 3
    batch = min(256, n_train // 2)
    common = ["--ckpt", str(ckpt), "--data", str(data), "--scale", "full", "--fresh", f"train.epochs={epochs}",
              "optim.milestones=[]", f"train.batch_size={batch}", f"train.eval_batch_size={batch}",
              f"data.image_size={s.image_size}", f"data.workers={s.workers}", f"train.device={s.device}"]
    out = {}
    for mode in ("standard", "cached"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "transfer.linear", *common, "--mode", mode,
                               "--out", str(tmp / f"linear-{mode}")], capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return [{"name": name, "kind": "linear_speedup", "measured_text": "failed", "note": f"{mode}: {err}"}]
        out[mode] = load_record(tmp / f"linear-{mode}")["metrics"]
        out[mode]["command_s"] = time.perf_counter() - t0
    std, cached = out["standard"], out["cached"]
    speedup = std["s_per_epoch"] / cached["s_per_epoch"]
    row = {"name": name, "kind": "linear_speedup", "speedup": speedup, "ratio_vs_reference": speedup,
           "s_per_epoch": cached["s_per_epoch"], "reference_s_per_epoch": std["s_per_epoch"],
           "extract_s": cached["extract_s"], "standard_total_s": std["total_s"], "cached_total_s": cached["total_s"],
           "measured_text": f"{cached['s_per_epoch']:.3f} s/epoch cached (+ {cached['extract_s']:.1f} s features once)",
           "reference_text": f"{std['s_per_epoch']:.3f} s/epoch standard",
           "note": f"{n_train} train images at {s.image_size} px, batch {batch}, {epochs} epochs; whole runs "
                   f"{std['total_s']:.1f} s standard vs {cached['total_s']:.1f} s cached"}
    log(f"linear: {row['measured_text']} vs {row['reference_text']} (x{speedup:.1f} per epoch)")
    return [row]


def section_transfer(s, log: Callable[[str], None]) -> list[dict]:
    device = s.torch_device
    with tempfile.TemporaryDirectory(prefix="ctbench-bench-") as tmp:
        rows, pkl = bench_convert(Path(tmp), log)
        gpu = device.type == "cuda"
        size = 64 if s.quick else (800 if gpu else 128)
        steps, warmup = (max(s.steps // 2, 2), 2) if gpu else (1, 0)  # CPU: C4 heads take ~10 s per iteration
        rows += bench_detectron2(pkl if pkl.is_file() else None, device, size, steps, warmup, not gpu, log)
        rows += bench_linear(Path(tmp) / "ours.pth.tar", Path(tmp), s, log)
    return rows
