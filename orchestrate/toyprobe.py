"""Baselines of the toy ImageNet: how well a random-init ResNet-50 and a colour histogram separate its classes.

    python -m orchestrate.toyprobe --root datasets                       # random-init floor + colour-only baseline
    python -m orchestrate.toyprobe --root datasets --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar
    python -m orchestrate.toyprobe --root datasets --seeds 0 1 2         # spread over random inits
    python -m orchestrate.toyprobe --root datasets --cnn-epochs 30       # + a supervised small-CNN reference

A quick, self-contained measurement (the suite's linear probe is ``transfer/linear.py``): images at the toy
evaluation view (resize 37 + center crop 32, ImageNet normalisation), frozen ResNet-50 features (2048-d after global
average pooling, eval-mode BN), standardised with the train statistics, then a multinomial logistic regression
(L-BFGS, L2 weight decay chosen on a held-out fifth of train from 1e-4 .. 1e-1, refit on all of train), top-1 on val.
The colour baseline does the same on a 4x4x4 RGB histogram of the same 32 px crop: near chance (10 %) when colour
carries no class information. ``--cnn-epochs`` adds a reference that the classes are learnable from pixels: a
4-layer CNN trained with labels (random 32 px crops of the 37 px image, flips, brightness/contrast jitter, grayscale).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from ctbench import paths
from ctbench.errors import UserError, cli_main
from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder

EVAL_RESIZE, EVAL_CROP = 37, 32  # pretrain.knn's view at the toy resolution (32 px, 256/224 ratio)
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def crops(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split at the evaluation view: uint8 N x 3 x 32 x 32, labels N."""
    ds = ImageFolder(root / split, transform=T.Compose([T.Resize(EVAL_RESIZE), T.CenterCrop(EVAL_CROP),
                                                        T.PILToTensor()]))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def resnet_features(model: torch.nn.Module, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Frozen ResNet-50 features: x uint8 N x 3 x 32 x 32 -> N x 2048."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.fc = torch.nn.Identity()
    model.eval()
    out = [model((x[i:i + batch].float() / 255 - mean) / std) for i in range(0, len(x), batch)]
    return torch.cat(out).double()  # N x 2048


def colour_histogram(x: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Joint RGB histogram, normalised: x uint8 N x 3 x H x W -> N x bins^3."""
    q = (x.long() * bins // 256).flatten(2)  # N x 3 x HW
    idx = q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2]  # N x HW
    h = torch.zeros(len(x), bins**3, dtype=torch.float64)
    h.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return h / idx.shape[1]


def fit_logreg(x: torch.Tensor, y: torch.Tensor, wd: float, classes: int, iters: int = 200) -> torch.nn.Linear:
    lin = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + wd / 2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, seed: int = 0) -> dict:
    """Top-1 (%) on val of a logistic regression on standardised features, weight decay picked on a train split."""
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    classes = int(ytr.max()) + 1
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    hold, fit = perm[: len(perm) // 5], perm[len(perm) // 5:]
    scores = {}
    for wd in WEIGHT_DECAYS:
        lin = fit_logreg(xtr[fit], ytr[fit], wd, classes)
        scores[wd] = (lin(xtr[hold]).argmax(1) == ytr[hold]).double().mean().item()
    wd = max(scores, key=scores.get)
    lin = fit_logreg(xtr, ytr, wd, classes)
    return {"top1": 100 * (lin(xva).argmax(1) == yva).double().mean().item(),
            "train_top1": 100 * (lin(xtr).argmax(1) == ytr).double().mean().item(), "wd": wd}


def small_cnn(classes: int) -> torch.nn.Module:
    def block(cin: int, cout: int, k: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(cin, cout, k, 2, k // 2, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    return torch.nn.Sequential(*block(3, 32, 5), *block(32, 64, 3), *block(64, 128, 3), *block(128, 256, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, classes))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batched label-preserving augmentation: x uint8 N x 3 x R x R -> float N x 3 x C x C in [0, 1]
    (R, C = EVAL_RESIZE, EVAL_CROP)."""
    n = len(x)
    i, j = torch.randint(0, EVAL_RESIZE - EVAL_CROP + 1, (2,), generator=g).tolist()
    y = x[:, :, i:i + EVAL_CROP, j:j + EVAL_CROP].float() / 255  # N x 3 x C x C
    flip = torch.rand(n, generator=g) < 0.5
    y[flip] = y[flip].flip(3)
    b = 1 + 0.4 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    c = 1 + 0.4 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean) * b
    gray = torch.rand(n, generator=g) < 0.2
    y[gray] = y[gray].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return y.clamp(0, 1)


def supervised_cnn(root: Path, epochs: int, seed: int = 0) -> dict:
    """Top-1 (%) on val of :func:`small_cnn` trained with labels on train (Adam, cosine, batch 64)."""
    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = ImageFolder(root / split, transform=T.Compose([T.Resize((EVAL_RESIZE, EVAL_RESIZE)), T.PILToTensor()]))
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys)

    (xtr, ytr), (xva, yva) = load("train"), load("val")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = small_cnn(int(ytr.max()) + 1)
    steps = epochs * (len(xtr) // 64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for k in range(len(xtr) // 64):
            idx = perm[k * 64:(k + 1) * 64]
            loss = torch.nn.functional.cross_entropy(model(augment(xtr[idx], g)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        o = (EVAL_RESIZE - EVAL_CROP) // 2
        pred = model(xva[:, :, o:o + EVAL_CROP, o:o + EVAL_CROP].float() / 255).argmax(1)  # center crop
    return {"top1": 100 * (pred == yva).double().mean().item(), "train_top1": float("nan"), "wd": 1e-4}


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrate.toyprobe", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="dataset root holding imagenet/ (default $DETECTRON2_DATASETS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="random-init seeds (default 0)")
    p.add_argument("--ckpt", action="append", default=[], help="also probe this checkpoint (repeatable)")
    p.add_argument("--cnn-epochs", type=int, default=0,
                   help="also train a small CNN with labels for this many epochs (a learnability reference)")
    args = p.parse_args(argv)
    root = Path(args.root) if args.root else paths.datasets_root()
    root = root / "imagenet" if (root / "imagenet").is_dir() else root
    if not (root / "train").is_dir():
        raise UserError(f"no train/ under {root}; generate the toy data first: python -m ctbench.toydata")
    import torchvision

    t0 = time.time()
    xtr, ytr = crops(root, "train")
    xva, yva = crops(root, "val")
    print(f"{root}: {len(xtr)} train, {len(xva)} val, {int(ytr.max()) + 1} classes, "
          f"eval view {EVAL_RESIZE}->{EVAL_CROP} px ({time.time() - t0:.1f} s to load)")
    rows = []
    r = probe(colour_histogram(xtr), ytr, colour_histogram(xva), yva)
    rows.append(("colour histogram 4x4x4", r))
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = torchvision.models.resnet50()
        r = probe(resnet_features(model, xtr), ytr, resnet_features(model, xva), yva)
        rows.append((f"random-init ResNet-50 (seed {seed})", r))
    for ckpt in args.ckpt:
        from ctbench.checkpoints import load_backbone, resnet50_from

        model = resnet50_from(load_backbone(ckpt))
        r = probe(resnet_features(model, xtr), ytr, resnet_features(model, xva), yva)
        rows.append((f"checkpoint {ckpt}", r))
    if args.cnn_epochs:
        t1 = time.time()
        rows.append((f"supervised 4-layer CNN ({args.cnn_epochs} ep)", supervised_cnn(root, args.cnn_epochs)))
        print(f"supervised CNN: {time.time() - t1:.0f} s")
    for name, r in rows:
        print(f"{name:<48} val top-1 {r['top1']:5.1f} %   (train {r['train_top1']:5.1f} %, wd {r['wd']:g})")
    if len(args.seeds) > 1:
        v = np.array([r["top1"] for n, r in rows if n.startswith("random-init")])
        print(f"random-init over {len(v)} seeds: {v.mean():.1f} +- {v.std(ddof=1):.1f} %")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
