"""The original MoCo v2 training loop (``benchmarks.reference_moco``) on the toy ImageNet, with a kNN monitor.

    python -m benchmarks.reference_toy --out outputs/reference_toy                 # the recipe's knobs, toy budget
    python -m benchmarks.reference_toy --queue 512 --momentum 0.99 --tau 0.1 --bn-splits 4 --lr 0.06

Issue 16 asks whether the toy data is learnable by the method the papers build on, not only by the suite's toy
preset: this trains ``ReferenceMoCo`` (moco/builder.py with the v2 head, torchvision's init, a queue of random unit
vectors) with main_moco.py's loop (SGD momentum 0.9, weight decay 1e-4, the cosine schedule per *epoch* of
``adjust_learning_rate`` with ``--cos``, no warm-up), MoCo v2's PIL augmentation through ``torchvision``'s
ImageFolder at the toy resolution, for the toy budget (32 px, batch 64, 32 epochs = 480 steps on the 1,000 toy
images: ``pretrain/presets/toy.yaml``'s), and measures the query backbone with the suite's kNN (``pretrain.knn``:
k 20, t 0.07, the val folder) at step 0, every ``--knn-every`` epochs and at the end.

Defaults are main_moco.py's (facebookresearch/moco@132aea9: ``--moco-k 65536 --moco-m 0.999 --lr 0.03``, MoCo v2's
``--moco-t 0.2``) and one BN group (one process); ``--bn-splits N`` is the SplitBatchNorm of MoCo's own one-GPU
notebook (colab/moco_cifar10_demo.ipynb: ``--bn-splits 8``, K 4096, m 0.99, t 0.1, lr 0.06 for batch 512), which
a one-process MoCo needs so the batch statistics cannot tell the positive key from the queue's.

Outputs in ``--out``: ``checkpoint.pth.tar`` in main_moco.py's format (``state_dict`` with ``module.encoder_q.*``,
what ``pretrain.knn`` / ``transfer.convert`` read), ``metrics.jsonl`` (per epoch ``{"epoch", "step", "loss",
"acc1", "lr"}``, per kNN evaluation ``{"step", "epoch", "knn_top1"}``) and ``summary.json`` (the arguments, the
first and last epoch's loss, the kNN history, img/s).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.reference_moco import ReferenceMoCo, accuracy, reference_loader, reference_optimizer
from ctbench import atomic
from ctbench.errors import UserError, cli_main
from pretrain.knn import knn_top1
from pretrain.model import set_residual_gamma as model_gamma


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_toy",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="The original MoCo v2 loop on the toy ImageNet, with a kNN monitor.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", type=Path, help="train folder, ImageNet layout (default: $DETECTRON2_DATASETS/"
                                             "imagenet/train)")
    p.add_argument("--val", type=Path, help="kNN val folder (default: <data>/../val)")
    p.add_argument("--out", type=Path, help="run directory (default: $CTBENCH_OUTPUT/reference_toy)")
    p.add_argument("--image-size", type=int, default=32, help="default: %(default)s (the toy preset's)")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s (the toy preset's)")
    p.add_argument("--epochs", type=int, default=32, help="default: %(default)s (480 steps, the toy preset's)")
    p.add_argument("--queue", type=int, default=65536, help="K (default: %(default)s, main_moco.py's)")
    p.add_argument("--momentum", type=float, default=0.999, help="m (default: %(default)s, main_moco.py's)")
    p.add_argument("--tau", type=float, default=0.2, help="T (default: %(default)s, MoCo v2's)")
    p.add_argument("--lr", type=float, default=0.03, help="default: %(default)s (main_moco.py's, not scaled)")
    p.add_argument("--bn-splits", type=int, default=1, help="SplitBatchNorm sub-batches (default: %(default)s)")
    p.add_argument("--residual-gamma", type=float, default=None,
                   help="γ of every bottleneck's last BN at step 0, in both encoders (default: torchvision's 1, the "
                        "original's; the toy preset's 0.2 is a deviation from the recipe, recorded in summary.json)")
    p.add_argument("--knn-every", type=int, default=4, help="epochs between kNN evaluations (default %(default)s)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def set_residual_gamma(model: ReferenceMoCo, gamma: float) -> None:
    """Set γ of every bottleneck's last BN (``bn3``) to ``gamma`` in the query encoder, and the key encoder to a
    copy of the query encoder (as ``ReferenceMoCo.__init__`` leaves it)."""
    if gamma < 0:
        raise UserError(f"--residual-gamma must be >= 0, got {gamma}")
    model_gamma(model.encoder_q, gamma)
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ctbench.paths import imagenet_root, outputs_root

    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root() / "train"
    val = args.val if args.val is not None else data.parent / "val"
    for folder in (data, val):
        if not folder.is_dir():
            raise UserError(f"no folder at {folder} (make data, or --data / --val in the ImageNet layout)")
    if args.queue % args.batch_size or args.batch_size % max(args.bn_splits, 1):
        raise UserError(f"--queue ({args.queue}) must be a multiple of --batch-size ({args.batch_size}), and "
                        f"--batch-size of --bn-splits ({args.bn_splits})")
    out = args.out if args.out is not None else outputs_root() / "reference_toy"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sigma = (0.1 * args.image_size / 224, 2.0 * args.image_size / 224)  # MoCo v2's σ scaled to the crop
    loader = reference_loader(str(data), image_size=args.image_size, batch_size=args.batch_size,
                              workers=args.workers, blur_sigma=sigma)
    if len(loader) == 0:
        raise UserError(f"{data}: fewer images than one batch of {args.batch_size}")
    model = ReferenceMoCo(K=args.queue, m=args.momentum, T=args.tau, bn_splits=args.bn_splits)
    if args.residual_gamma is not None:
        set_residual_gamma(model, args.residual_gamma)
    model = model.to(device)
    optimizer = reference_optimizer(model, args.lr)
    criterion = nn.CrossEntropyLoss().to(device)
    rows = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed below
    history: list[list[float]] = []

    def knn(step: int, epoch: int) -> None:
        top1 = knn_top1(model.encoder_q, data, val, image_size=args.image_size, device=device)
        history.append([step, top1])
        rows.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": top1}) + "\n")
        rows.flush()
        print(f"kNN top-1 at step {step}: {top1:.1f} %", flush=True)

    step, losses, seen, t_train = 0, [], 0, 0.0
    try:
        knn(0, 0)
        for epoch in range(args.epochs):
            lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))  # main_moco.py --cos, per epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            t0, ep_loss, ep_acc = time.time(), [], []
            for images, _ in loader:
                im_q, im_k = images[0].to(device, non_blocking=True), images[1].to(device, non_blocking=True)
                output, target = model(im_q=im_q, im_k=im_k)
                loss = criterion(output, target)
                ep_acc.append(float(accuracy(output, target)[0]))
                ep_loss.append(loss.item())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                seen += im_q.shape[0]
            t_train += time.time() - t0
            losses.append(sum(ep_loss) / len(ep_loss))
            rows.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": losses[-1],
                                   "acc1": sum(ep_acc) / len(ep_acc), "lr": lr}) + "\n")
            print(f"epoch {epoch + 1}/{args.epochs} loss {losses[-1]:.3f} acc1 {sum(ep_acc) / len(ep_acc):.1f} "
                  f"lr {lr:.4f} ({seen / t_train:.1f} img/s)", flush=True)
            if epoch + 1 == args.epochs or (args.knn_every and (epoch + 1) % args.knn_every == 0):
                knn(step, epoch + 1)
    finally:
        rows.close()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k.startswith("encoder_q.")}
    atomic.torch_save({"epoch": args.epochs, "arch": "resnet50", "state_dict": state}, out / "checkpoint.pth.tar")
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "data": str(data), "steps": step, "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1],
               "knn_history": history, "knn_top1": history[-1][1], "img_per_s": seen / t_train,
               "train_time_s": t_train, "device": str(device)}
    atomic.write_json(out / "summary.json", summary)
    print(f"done: loss {losses[0]:.3f} (epoch 1) -> {losses[-1]:.3f} (epoch {args.epochs}), kNN "
          f"{history[0][1]:.1f} -> {history[-1][1]:.1f} % -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
