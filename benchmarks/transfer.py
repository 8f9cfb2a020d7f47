"""Transfer-stage timings: checkpoint converter, detectron2 s/iter per task, linear probe cached vs standard.

- converter: ``python -m transfer.convert`` vs MoCo's converter (``benchmarks.reference_convert``), both as the
  command a user runs (interpreter start and imports included), on the same ResNet-50 checkpoint;
- detectron2: training iterations of each task's model (the model-zoo architecture with MoCo's detection deltas:
  RGB input, ImageNet pixel mean/std, ``STRIDE_IN_1X1: False``, ``FREEZE_AT: 0``, BN in place of SyncBN on one
  process) on synthetic batches of 2 images, starting from the converted weights;
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

from benchmarks.measure import time_calls

D2_TASKS = {  # task -> (model-zoo config, classes); MoCo's detection configs start from these architectures
    "voc_det": ("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", 20),
    "coco_det": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 80),
    "coco_mask": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", 80),
    "coco_det_c4": ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", 80),
    "coco_mask_c4": ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", 80),
    "coco_kp": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", 1),
}
MODEL_ZOO_V100_S_PER_ITER = {"coco_det": 0.210, "coco_mask": 0.261}  # 8 V100, 16 images/iter (FACTS.md)


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


def bench_detectron2(weights: Path | None, device: torch.device, size: int, steps: int, warmup: int,
                     log: Callable[[str], None], roi_per_image: int = 512) -> list[dict]:
    if not _have("detectron2"):
        return [{"name": f"detectron2 {t}", "kind": "detectron2", "measured_text": "not measured",
                 "note": "detectron2 is not importable"} for t in D2_TASKS]
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore", output=None).setLevel("ERROR")
    setup_logger(name="detectron2", output=None).setLevel("ERROR")
    rows = []
    for task, (zoo, classes) in D2_TASKS.items():
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(zoo))
        cfg.MODEL.DEVICE = device.type
        cfg.MODEL.WEIGHTS = str(weights) if weights else ""
        cfg.INPUT.FORMAT = "RGB"
        cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
        cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        cfg.MODEL.RESNETS.NORM = "BN"  # SyncBN on one process
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = classes
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = roi_per_image
        model = build_model(cfg)
        if weights:
            DetectionCheckpointer(model).load(str(weights))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
        inputs = _d2_inputs(task, classes, size, 2, device)

        def step(model=model, opt=opt, inputs=inputs) -> None:
            losses = model(inputs)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        with EventStorage(0):  # detectron2's models log into the trainer's event storage
            t = time_calls(step, device, 2, steps, warmup)
        row = {"name": f"detectron2 {task} ({zoo.split('/')[-1].replace('.yaml', '')})", "kind": "detectron2",
               "task": task, "s_per_iter": t.s_per_step, "peak_mb": t.peak_mb,
               "measured_text": f"{t.s_per_step:.3f} s/iter (2 images of {size} px, {roi_per_image} RoIs/image)",
               "note": "no reference run side by side (the launcher is detectron2 itself)"}
        if task in MODEL_ZOO_V100_S_PER_ITER:
            row["note"] += f"; model zoo: {MODEL_ZOO_V100_S_PER_ITER[task]} s/iter for 16 images on 8 V100"
        rows.append(row)
        log(f"detectron2 {task}: {t.s_per_step:.3f} s/iter")
        del model, opt
    return rows


def bench_linear(log: Callable[[str], None]) -> list[dict]:
    if not _have("transfer.linear"):
        return [{"name": "linear probe per epoch, cached vs standard", "kind": "linear_speedup",
                 "measured_text": "not measured", "note": "transfer.linear is not in this checkout"}]
    return [{"name": "linear probe per epoch, cached vs standard", "kind": "linear_speedup",
             "measured_text": "not measured", "note": "transfer.linear exists; its timing hook is not wired yet"}]


def section_transfer(s, log: Callable[[str], None]) -> list[dict]:
    device = s.torch_device
    with tempfile.TemporaryDirectory(prefix="ctbench-bench-") as tmp:
        rows, pkl = bench_convert(Path(tmp), log)
        gpu = device.type == "cuda"
        size = 64 if s.quick else (800 if gpu else 128)
        steps, warmup = (max(s.steps // 2, 2), 2) if gpu else (1, 1)
        roi = 512 if gpu else 128  # toy: fewer sampled RoIs per image (C4 runs res5 on every RoI)
        rows += bench_detectron2(pkl if pkl.is_file() else None, device, size, steps, warmup, log, roi)
        rows += bench_linear(log)
    return rows
