"""Weighted kNN monitor: top-1 of a frozen backbone's pooled features, cheap enough to run at epoch ends.

The classifier of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", Sec. 3.4) as used by MoCo-style monitors: every image is encoded to the L2-normalised global-pooled
features of the backbone (2048-d for ResNet-50, before any projection head), each val feature takes its ``k``
nearest train features by cosine similarity ``s_i``, and class ``c`` scores ``Σ_{i in top-k, y_i = c} exp(s_i / t)``.
Images are read at evaluation size: resize to ``round(image_size * 256 / 224)`` (73 for 64, 256 for 224), then
a centre crop of ``image_size``.

    python -m pretrain.knn --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar       # toy ImageNet, 64 px
    python -m pretrain.knn --ckpt random                                             # random-init baseline
    python -m pretrain.knn --ckpt random --recalibrate-bn       # the same net, BN statistics of the train images
    python -m pretrain.knn --ckpt X --data /data/imagenet --image-size 224 --max-train 100000 --device cuda
    python -m pretrain.knn --ckpt X --holdout 0.2   # queries: a held-out fifth of train, never val (for selection)

``--holdout F`` answers from the train labels only: a seeded (``--split-seed``, default 0), class-stratified
fraction ``F`` of the train images are the queries and the rest the memory; val is not read. Choose a setting on it
(the ImageNet linear protocol has no test split, so the val numbers that the tables print must not pick settings);
its record's metric is ``holdout_top1``, never ``top1``, so the tables' kNN column does not show it.

The command writes a run record (kind ``knn``, metric ``top1``; inputs = the checkpoint, so the pretraining record is
linked) into ``$CTBENCH_OUTPUT/knn/<run>/`` (``--out``): ``make tables`` shows it in the pretraining table.

    from pretrain.knn import knn_top1
    acc = knn_top1(model.encoder_q, "datasets/imagenet/train", "datasets/imagenet/val", image_size=64)

Under torchrun (a process group is initialised) each process encodes its share of the images, the features are
gathered, and every process returns the same value: call it on every rank. The backbone is put in eval mode for
the pass and its previous mode is restored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ctbench import distributed as D
from ctbench.checkpoints import pooled_features
from ctbench.errors import UserError, cli_main
from ctbench.imagefolder import ImageFolder, collate_skip_bad, eval_transform, list_classes


@torch.no_grad()
def encode(backbone: nn.Module, dataset, *, device: str | torch.device = "cpu", batch_size: int = 128,
           workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L2-normalised pooled features of ``dataset`` (``(image, label)`` pairs, None for unreadable files).

    Returns ``(features N x C float32 on CPU, labels N, n_unreadable)``; unreadable images are left out. Under a
    process group each rank encodes indices ``rank::world`` and the results are gathered on every rank.
    """
    device = torch.device(device)
    world, rank = D.world_size(), D.rank()
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skip_bad, persistent_workers=False)
    feats, labels, n_bad = [], [], 0
    amp = device.type == "cuda"
    for batch, bad in loader:
        n_bad += bad
        if batch is None:
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True)
        if amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = pooled_features(backbone, images)  # B x C
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(targets)
    dim = feats[0].shape[1] if feats else pooled_features(backbone, torch.zeros(2, 3, 64, 64, device=device)).shape[1]
    feats_t = torch.cat(feats) if feats else torch.zeros(0, dim)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if world > 1:
        feats_t, labels_t, n_bad = _gather_ragged(feats_t, labels_t, n_bad, device)
    return feats_t, labels_t, n_bad


def _gather_ragged(feats: torch.Tensor, labels: torch.Tensor, n_bad: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """all_gather of per-rank tensors of different lengths (padded to the longest), on ``device`` (nccl)."""
    counts = D.gather(torch.tensor([feats.shape[0], n_bad], device=device)).view(-1, 2).cpu()  # W x 2
    m = int(counts[:, 0].max())
    pad_f = torch.zeros(m, feats.shape[1])
    pad_f[: feats.shape[0]] = feats
    pad_l = torch.full((m,), -1, dtype=torch.long)
    pad_l[: labels.shape[0]] = labels
    all_f = D.gather(pad_f.to(device)).cpu()  # (W m) x C
    all_l = D.gather(pad_l.to(device)).cpu()  # W m
    keep = all_l >= 0
    return all_f[keep], all_l[keep], int(counts[:, 1].sum())


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor, *,
                num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores for L2-normalised features: ``Q x num_classes``.

    ``train_features``: N x C, ``train_labels``: N, ``query_features``: Q x C (all L2-normalised). Neighbours are
    the ``k`` largest cosine similarities; each votes ``exp(s / t)`` for its class.
    """
    k = min(k, train_features.shape[0])
    out = []
    for q in query_features.split(chunk):
        sim = q @ train_features.T  # chunk x N
        top_sim, top_idx = sim.topk(k, dim=1)  # chunk x k
        weights = (top_sim / t).exp()  # chunk x k
        votes = F.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # chunk x k x classes
        out.append((votes * weights.unsqueeze(-1)).sum(1))  # chunk x classes
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, *, num_classes: int, k: int = 20, t: float = 0.07) -> float:
    """Top-1 (percent) of :func:`knn_predict` against ``query_labels``."""
    if query_features.shape[0] == 0:
        raise UserError("kNN monitor: no readable val image")
    scores = knn_predict(train_features, train_labels, query_features, num_classes=num_classes, k=k, t=t)
    return 100.0 * (scores.argmax(1) == query_labels).float().mean().item()


def check_holdout(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise UserError(f"--holdout must be a fraction in (0, 1), got {fraction}")


def holdout_split(targets: list[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices ``(memory, queries)`` of a seeded, class-stratified split: ``round(fraction * n_c)`` images of each
    class ``c`` (at least one, and at least one left in the memory when the class has two or more) are queries."""
    check_holdout(fraction)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(targets[i], []).append(i)
    queries: list[int] = []
    for idx in by_class.values():
        n = max(1, round(fraction * len(idx)))
        queries += idx[: min(n, len(idx) - 1)] if len(idx) > 1 else idx
    held = set(queries)
    return [i for i in range(len(targets)) if i not in held], sorted(queries)


def knn_top1(backbone: nn.Module, train_dir: str | Path, val_dir: str | Path | None, *, image_size: int,
             k: int = 20, t: float = 0.07, max_train: int | None = None, device: str | torch.device = "cpu",
             batch_size: int = 128, workers: int = 0, seed: int = 0, holdout: float | None = None,
             split_seed: int = 0) -> float:
    """Weighted kNN top-1 (percent) on ``val_dir`` with ``train_dir`` as the memory (ImageNet layout both).

    ``max_train`` keeps a seeded random subset of that many train images (the monitor's cost is one forward pass
    over train + val). ``holdout`` instead queries a seeded, class-stratified fraction of the train images against
    the rest (:func:`holdout_split` drawn with ``split_seed``; ``val_dir`` is not read; ``max_train`` then
    subsamples the memory). The backbone is evaluated in eval mode (BN running statistics) and restored afterwards.
    """
    classes = list_classes(train_dir)
    transform = eval_transform(image_size)
    train = ImageFolder(train_dir, transform=transform, classes=classes)
    if holdout is not None:
        memory, queries = holdout_split(train.targets, holdout, split_seed)
        train, val = Subset(train, memory), Subset(train, queries)
    elif val_dir is None:
        raise UserError("knn_top1: a val_dir, or a holdout fraction of the train images, is needed")
    else:
        val = ImageFolder(val_dir, transform=transform, classes=classes)
    train_set = train
    if max_train is not None and 0 < max_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:max_train]
        train_set = Subset(train, sorted(keep.tolist()))
    was_training = backbone.training
    backbone.eval()
    try:
        tf, tl, _ = encode(backbone, train_set, device=device, batch_size=batch_size, workers=workers)
        vf, vl, _ = encode(backbone, val, device=device, batch_size=batch_size, workers=workers)
    finally:
        backbone.train(was_training)
    if tf.shape[0] == 0:
        raise UserError(f"kNN monitor: no readable train image under {train_dir}")
    return knn_accuracy(tf, tl, vf, vl, num_classes=len(classes), k=k, t=t)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.knn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Weighted kNN top-1 of a backbone's L2-normalised pooled features (InstDisc's monitor).",
        epilog="examples:\n  python -m pretrain.knn --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar\n"
               "  python -m pretrain.knn --ckpt random\n"
               "  python -m pretrain.knn --ckpt X --data /data/imagenet --image-size 224 --max-train 100000")
    p.add_argument("--ckpt", help="checkpoint (ours, MoCo/JCL release, torchvision state_dict) or 'random'; "
                                  "default: the newest pretraining output")
    p.add_argument("--data", type=Path, help="ImageNet-layout root with train/ and val/ "
                                             "(default: $DETECTRON2_DATASETS/imagenet, the toy ImageNet)")
    p.add_argument("--image-size", type=int, help="centre-crop size (default: 64 on the toy data, else 224)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--t", type=float, default=0.07, help="temperature of the exp(s/t) votes (default 0.07)")
    p.add_argument("--max-train", type=int, help="seeded random subset of the train images used as memory")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--holdout", type=float, metavar="F",
                   help="query a seeded, class-stratified fraction F of the train images against the rest instead of "
                        "val (val is not read): a split to choose settings on; the record's metric is holdout_top1")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of --holdout's split (default 0: every backbone is compared on the same queries)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init backbone and of --max-train")
    p.add_argument("--out", type=Path, help="run directory of the record (default: $CTBENCH_OUTPUT/knn/<run>)")
    p.add_argument("--name", help="run name (default: the pretraining run's, or 'random'; '_bn_data' appended "
                                  "with --recalibrate-bn)")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="first recompute every BN layer's running statistics from the train images (one pass in "
                        "train mode, no gradient, plain average): a random network's BN then normalises as a trained "
                        "one's does, instead of its initial mean 0 / variance 1")
    return p


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, train_dir: str | Path, *, image_size: int, device: str | torch.device = "cpu",
                   batch_size: int = 128, workers: int = 0) -> int:
    """Replace every BatchNorm's running mean/variance by their average over one pass of ``train_dir`` (eval
    transform, batches in a seeded random order, train mode, no gradient); returns the number of images seen. The
    backbone's mode is restored."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    was_training = backbone.training
    backbone.train()
    loader = DataLoader(ImageFolder(train_dir, transform=eval_transform(image_size), classes=list_classes(train_dir)),
                        batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator().manual_seed(0))  # mixed classes per batch, the same every run
    seen = 0
    try:
        for batch, _ in loader:
            if batch is None:  # every image of the batch unreadable
                continue
            x = batch[0].to(device)
            if x.shape[0] > 1:  # BN needs two samples for a variance
                backbone(x)
                seen += x.shape[0]
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        backbone.train(was_training)
    if seen == 0:
        raise UserError(f"--recalibrate-bn: no readable train image under {train_dir}")
    return seen


RECIPE = ("weighted kNN monitor (Wu et al. 2018, InstDisc Sec. 3.4): cosine similarity of L2-normalised pooled "
          "features, exp(s/t) votes of the k nearest train images, centre crop")


def knn_record_name(ckpt: Path | None) -> str:
    """The pretraining run a checkpoint belongs to (its record beside it), else the file's name; ``random``."""
    if ckpt is None:
        return "random"
    from ctbench.records import find_input, load_input

    rec = load_input(ckpt)
    pre = rec if rec.get("kind") == "pretrain" else find_input(rec, "pretrain")
    return str(pre["name"]) if pre is not None and pre.get("name") else ckpt.name.split(".")[0]


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ctbench.checkpoints import load_backbone, resnet50_from
    from ctbench.paths import detect_scale, imagenet_root, newest_checkpoint, outputs_root
    from ctbench.records import RunRecord

    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root()
    if args.k < 1 or args.t <= 0:
        raise UserError(f"--k must be >= 1 and --t > 0, got k={args.k} t={args.t}")
    toy = detect_scale(data) == "toy"
    image_size = args.image_size or (64 if toy else 224)
    ckpt = None if args.ckpt == "random" else Path(args.ckpt) if args.ckpt else newest_checkpoint()
    held_out = args.holdout is not None  # queries from train, not val
    if held_out:
        check_holdout(args.holdout)  # before any model is built
    name = args.name or (knn_record_name(ckpt) + ("_bn_data" if args.recalibrate_bn else "")
                         + (f"_holdout{args.holdout:g}" if held_out else ""))
    out = args.out if args.out is not None else outputs_root() / "knn" / name
    env = D.setup(args.device)
    try:
        if ckpt is None:
            torch.manual_seed(args.seed)
            model = resnet50_from(None)
        else:
            model = resnet50_from(load_backbone(ckpt))
        model.to(env.device)
        config = {"k": args.k, "t": args.t, "image_size": image_size, "max_train": args.max_train,
                  "data": str(data), "recalibrate_bn": args.recalibrate_bn, "holdout": args.holdout,
                  "split_seed": args.split_seed if held_out else None}
        with RunRecord("knn", name, out, config=config, dataset=data, seed=args.seed,
                       inputs=[ckpt] if ckpt is not None else [], write=env.is_main) as rec:
            if args.recalibrate_bn:
                rec.data["bn_recalibrated_on"] = recalibrate_bn(model, data / "train", image_size=image_size,
                                                                device=env.device, batch_size=args.batch_size,
                                                                workers=args.workers)
            acc = knn_top1(model, data / "train", data / "val", image_size=image_size, k=args.k, t=args.t,
                           max_train=args.max_train, device=env.device, batch_size=args.batch_size,
                           workers=args.workers, seed=args.seed, holdout=args.holdout,
                           split_seed=args.split_seed)
            rec.metrics["holdout_top1" if held_out else "top1"] = acc
            rec.data["protocol"] = {"recipe": RECIPE, "deviations": (["toy scale", f"{image_size} px"] if toy else [])
                                    + ([f"memory: {args.max_train} train images"] if args.max_train else [])
                                    + (["BN statistics recomputed from the train images"] if args.recalibrate_bn
                                       else [])
                                    + ([f"queries: a held-out {args.holdout:g} of train (split seed "
                                        f"{args.split_seed}), not val"]
                                       if held_out else [])}
        if env.is_main:
            what = f"held-out {args.holdout:g} of train" if held_out else "val"
            print(f"kNN top-1 {acc:.2f} % on {what} (k={args.k}, t={args.t}, {image_size} px) -> {out}")
    finally:
        D.teardown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
