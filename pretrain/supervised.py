"""Supervised ResNet-50 from scratch on the ImageNet labels: the ceiling row beside the pretraining methods.

    python -m pretrain.supervised                                  # toy ImageNet, toy ceiling (about 5 min, 2 cores)
    python -m pretrain.supervised --epochs 30 --seed 1 --out outputs/pretrain/supervised_s1
    python -m pretrain.supervised --data /data/imagenet/train --image-size 224 --epochs 90 --batch-size 256

The papers print an ImageNet-supervised ResNet-50 beside their methods; on the toy data there is no released
supervised model, so this trains one with the same init and a budget in time no larger than one toy pretraining
run's (the defaults on the toy data — elsewhere they are the recipe's below, γ 1 and no warm-up: 48 epochs of batch
64 = 720 steps, 1.5 x the 480 steps of ``pretrain/presets/toy.yaml`` (720 is the budget at which every method passes
the floor by 10 points), in about three quarters of one toy moco_v2 run's time: one view per image and no key
encoder, 131-138 against 61-63 img/s on 2 CPU cores): a torchvision ResNet-50 with
each bottleneck's last BN γ at 0.2 (``--residual-gamma``, as the toy pretraining preset; 1 = torchvision's init, 0 =
``--zero-init-residual``), cross-entropy on the class labels, SGD with momentum and cosine decay per step after 15
linear warm-up steps, RandomResizedCrop + horizontal flip at the pretraining resolution. Recipe: torchvision's
``references/classification/train.py`` for ResNet-50 (SGD, momentum 0.9, weight decay 1e-4, lr 0.1 for batch 256 on
8 GPUs x 32, 90 epochs, ``RandomResizedCrop(224)`` with scale (0.08, 1) + ``RandomHorizontalFlip``); every setting
this run changes is listed in the record's ``protocol.deviations`` ("toy scale" first).

Outputs in ``--out`` (default ``$CTBENCH_OUTPUT/pretrain/supervised``): ``checkpoint.pth.tar`` (``{"state_dict":
torchvision resnet50 names, "arch", "epoch"}``: every evaluation, ``pretrain.knn`` and ``transfer.convert`` read
it; the ``fc`` layer is dropped there), ``metrics.jsonl`` (one line per logged step, per epoch end with the
training top-1, per kNN evaluation: ``{"step", "epoch", "knn_top1"}`` as the pretraining engine writes), and
``record.json`` (kind ``pretrain``, ``config.method = "supervised"``; metrics as a pretraining run's:
``loss_final``, ``loss_first_fifth``, ``loss_last_fifth``, ``steps``, ``img_per_s``, ``train_time_s``,
``knn_top1``, and ``knn_history`` = ``[[step, top1], ...]`` with step 0 = the initialisation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ctbench import atomic
from ctbench.errors import UserError, cli_main
from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, collate_skip_bad, list_classes
from pretrain.knn import knn_top1
from pretrain.model import effective_residual_gamma, resnet50
from pretrain.protocol import init_deviation

RECIPE = ("supervised ResNet-50: pytorch/vision references/classification/train.py (SGD lr 0.1 for batch 256, "
          "momentum 0.9, weight decay 1e-4, 90 epochs, RandomResizedCrop 224 scale (0.08, 1) + flip)")
RECIPE_VALUES = {"epochs": 90, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "image_size": 224,
                 "crop_scale": (0.08, 1.0), "schedule": "step x0.1 every 30 epochs"}
METRICS = "metrics.jsonl"
# Defaults of the arguments left unset: the toy ceiling (pretrain/presets/toy.yaml's γ and batch; 720 steps) on the
# toy data, torchvision's recipe (RECIPE_VALUES, γ 1, no warm-up) elsewhere.
TOY_DEFAULTS = {"epochs": 48, "batch_size": 64, "lr": 0.4, "warmup_steps": 15, "residual_gamma": 0.2}
FULL_DEFAULTS = {"epochs": 90, "batch_size": 256, "lr": 0.1, "warmup_steps": 0, "residual_gamma": 1.0}


def resolve_defaults(args: argparse.Namespace, toy: bool) -> argparse.Namespace:
    """Fill the arguments left unset with the toy or the full-scale defaults (in place; idempotent)."""
    for key, value in (TOY_DEFAULTS if toy else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.supervised",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Supervised ResNet-50 from scratch (the ceiling row of the toy tables).",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", type=Path, help="train folder, ImageNet layout (default: $DETECTRON2_DATASETS/"
                                             "imagenet/train)")
    p.add_argument("--val", type=Path, help="val folder of the kNN monitor (default: <data>/../val)")
    p.add_argument("--out", type=Path, help="run directory (default: $CTBENCH_OUTPUT/pretrain/supervised)")
    p.add_argument("--name", default="supervised", help="run name (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="default: 48 on the toy data (720 steps of 64: 1.5 x the toy "
                                                "pretraining's, in less time), else the recipe's 90")
    p.add_argument("--batch-size", type=int, help="default: 64 on the toy data (pretrain/presets/toy.yaml's), else 256")
    p.add_argument("--lr", type=float, help="for --lr-batch images (default: 0.4 on the toy data, i.e. 0.1 for its "
                                            "batch of 64; else the recipe's 0.1)")
    p.add_argument("--lr-batch", type=int, default=256, help="batch --lr is given for, scaled linearly (default 256)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="default: %(default)s")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 15 on the toy data, one toy "
                                                    "epoch; else 0, the recipe's)")
    p.add_argument("--image-size", type=int, help="train crop and kNN view (default: 32 on the toy data, else 224)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default: 0.2 1, MoCo's crop; recipe 0.08 1)")
    p.add_argument("--knn-every", type=int, default=1, help="epochs between kNN monitor evaluations (0: only at "
                                                            "the end; default %(default)s)")
    p.add_argument("--residual-gamma", type=float, metavar="G",
                   help="gamma = G in each bottleneck's last BN at init (default: 0.2 on the toy data, the toy "
                        "pretraining preset's; else 1 = torchvision's init, the recipe's)")
    p.add_argument("--zero-init-residual", action="store_true", help="gamma = 0 (= --residual-gamma 0)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def _residual_gamma(args: argparse.Namespace) -> float:
    """γ of every bottleneck's last BN at init: 0 with --zero-init-residual, else --residual-gamma."""
    return effective_residual_gamma(args.zero_init_residual, None if args.zero_init_residual else args.residual_gamma)


def _protocol(args: argparse.Namespace, toy: bool, steps: int) -> dict:
    resolve_defaults(args, toy)
    r = RECIPE_VALUES
    dev = ["toy scale"] if toy else []
    init = init_deviation(_residual_gamma(args), 1.0)  # recipe: torchvision's 1
    dev += ["1 process (recipe: 8 GPUs)"] + ([init] if init else [])
    if args.epochs != r["epochs"]:
        dev.append(f"{r['epochs']} -> {args.epochs} epochs ({steps} steps)")
    if args.batch_size != r["batch_size"] or args.lr * args.batch_size / args.lr_batch != r["lr"]:
        dev.append(f"batch {r['batch_size']} -> {args.batch_size}, lr {r['lr']:g} -> "
                   f"{args.lr * args.batch_size / args.lr_batch:g}")
    dev.append(f"schedule {r['schedule']} -> cosine per step" + (f", {args.warmup_steps} warm-up steps"
                                                                  if args.warmup_steps else ""))
    if args.image_size != r["image_size"]:
        dev.append(f"{args.image_size} px (recipe: {r['image_size']})")
    if tuple(args.crop_scale) != r["crop_scale"]:
        dev.append(f"crop scale {tuple(r['crop_scale'])} -> {tuple(args.crop_scale)}")
    if args.weight_decay != r["weight_decay"]:
        dev.append(f"weight decay {r['weight_decay']:g} -> {args.weight_decay:g}")
    return {"recipe": RECIPE, "deviations": dev}


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ctbench.paths import detect_scale, imagenet_root, outputs_root
    from ctbench.records import RunRecord

    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root() / "train"
    val = args.val if args.val is not None else data.parent / "val"
    if not data.is_dir():
        raise UserError(f"no train folder at {data} (make data, or --data DIR in the ImageNet layout)")
    if args.residual_gamma is not None and not args.residual_gamma >= 0:
        raise UserError(f"--residual-gamma must be >= 0, got {args.residual_gamma}")
    toy = detect_scale(data) == "toy"
    resolve_defaults(args, toy)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.warmup_steps < 0:
        raise UserError(f"--epochs and --batch-size must be >= 1, --lr > 0 and --warmup-steps >= 0, got "
                        f"{args.epochs}, {args.batch_size}, {args.lr}, {args.warmup_steps}")
    args.image_size = args.image_size or (32 if toy else 224)
    out = args.out if args.out is not None else outputs_root() / "pretrain" / args.name
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    classes = list_classes(data)
    train_tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=tuple(args.crop_scale)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = ImageFolder(data, transform=train_tf, classes=classes)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        collate_fn=collate_skip_bad, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"{len(ds)} images under {data} is less than one batch of {args.batch_size}")
    total = steps_per_epoch * args.epochs
    model = resnet50(residual_gamma=_residual_gamma(args), num_classes=len(classes))
    model = model.to(memory_format=torch.channels_last)
    lr = args.lr * args.batch_size / args.lr_batch
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return lr * (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(total - args.warmup_steps, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    config = {"method": "supervised", "data": str(data), "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "lr_batch": args.lr_batch, "weight_decay": args.weight_decay,
              "warmup_steps": args.warmup_steps, "image_size": args.image_size, "crop_scale": list(args.crop_scale),
              "zero_init_residual": args.zero_init_residual, "residual_gamma": _residual_gamma(args),
              "schedule": "cosine", "knn_every": args.knn_every}
    metrics_path = out / METRICS
    rows = open(metrics_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below

    def log(row: dict) -> None:
        rows.write(json.dumps(row) + "\n")
        rows.flush()

    def knn(step: int, epoch: int) -> float:
        t0 = time.time()
        acc = knn_top1(model, data, val, image_size=args.image_size)
        log({"step": step, "epoch": epoch, "knn_top1": acc})
        print(f"step {step}/{total} kNN top-1 {acc:.2f} % ({time.time() - t0:.0f} s)", flush=True)
        return acc

    print(f"supervised ResNet-50: {len(ds)} images, {len(classes)} classes, {args.epochs} epochs x "
          f"{steps_per_epoch} steps, batch {args.batch_size}, lr {lr:g}, {args.image_size} px -> {out}", flush=True)
    with RunRecord("pretrain", args.name, out, config=config, dataset=data, seed=args.seed) as rec:
        history = [[0, knn(0, 0)]]
        losses: list[float] = []
        step, train_time, correct, seen = 0, 0.0, 0, 0
        for epoch in range(args.epochs):
            model.train()
            correct = seen = 0
            t_epoch = time.time()
            for batch, _ in loader:
                if batch is None:
                    continue
                x, y = batch
                x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                if step % 5 == 0:
                    log({"step": step, "epoch": epoch, "loss": float(np.mean(losses[-5:])), "lr": lr_at(step - 1)})
            train_time += time.time() - t_epoch
            train_top1 = 100.0 * correct / max(seen, 1)
            log({"step": step, "epoch": epoch, "epoch_end": True, "train_top1": train_top1,
                 "loss": float(np.mean(losses[-steps_per_epoch:]))})
            print(f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses[-steps_per_epoch:]):.3f} train top-1 "
                  f"{train_top1:.1f} % ({time.time() - t_epoch:.0f} s)", flush=True)
            if epoch + 1 == args.epochs or (args.knn_every and (epoch + 1) % args.knn_every == 0):
                history.append([step, knn(step, epoch)])  # epoch: the index of the epoch that ended, as the engine
        rows.close()
        atomic.torch_save({"state_dict": model.state_dict(), "arch": "resnet50", "epoch": args.epochs},
                          out / "checkpoint.pth.tar")
        fifth = max(len(losses) // 5, 1)
        rec.metrics.update({
            "loss_final": float(np.mean(losses[-5:])), "loss_first_fifth": float(np.mean(losses[:fifth])),
            "loss_last_fifth": float(np.mean(losses[-fifth:])), "steps": step, "epochs": args.epochs,
            "complete": True, "images_seen": step * args.batch_size,
            "img_per_s": step * args.batch_size / max(train_time, 1e-9), "train_time_s": train_time,
            "train_top1_last_epoch": train_top1, "knn_top1": history[-1][1], "knn_epoch": args.epochs,
            "knn_history": history})
        rec.outputs["checkpoint"] = str(out / "checkpoint.pth.tar")
        rec.data["protocol"] = _protocol(args, toy, total)
    print(f"done: loss {losses[0]:.3f} -> {np.mean(losses[-fifth:]):.3f}, kNN top-1 {history[-1][1]:.2f} % "
          f"(init {history[0][1]:.2f} %) -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
