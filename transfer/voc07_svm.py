"""VOC07 image classification with linear SVMs on frozen ResNet-50 features (Goyal et al. 2019, "Scaling and
Benchmarking Self-Supervised Visual Representation Learning", arXiv:1905.01235), as FAIR's
fair_self_supervision_benchmark and mmselfsup's ``svm_voc07`` benchmark run it.

Protocol (each value from the original code; mmselfsup = open-mmlab/mmselfsup ``tools/benchmarks/classification/
svm_voc07/``, FAIR = facebookresearch/fair_self_supervision_benchmark ``extra_scripts/``):

- data: VOC2007 ``trainval`` (5,011 images) to train, ``test`` (4,952) to test; per class the labels of VOC's
  ``ImageSets/Main/<class>_<split>.txt`` (FAIR ``create_voc_data_files.py``): 1 present, -1 absent, 0 only
  difficult objects. Training: a difficult-only image is a negative (mmselfsup ``train_svm_kfold_parallel.py`` maps
  every non-positive to -1); testing: it is dropped from that class (``test_svm.py``: ``targets != -1``, the ignore
  label). Images in sorted file-name order (FAIR sorts them; the cross-validation folds depend on the order).
- features: the whole image resized to 256 on the short side, then to 224 x 224 (no crop; mmselfsup
  ``configs/benchmarks/classification/svm_voc07.py``: ``ResizeEdge 256`` + ``Resize 224``), ImageNet mean/std, the
  frozen backbone in eval mode; ``res5`` -> AvgPool2d(6, 1) -> 2 x 2 x 2048 = 8,192-d (``feat5``); optional
  layers with mmselfsup's ``MultiPooling`` parameters (``mmselfsup/models/utils/multi_pooling.py``): ``conv1``
  (after the stem's ReLU, before max-pool) AvgPool2d(10, 10, padding 4) -> 9,216, ``res2`` (16, 8) -> 9,216,
  ``res3`` (13, 5) -> 8,192, ``res4`` (8, 3) -> 9,216. Each vector is L2-normalised, ``f / (||f|| + 1e-5)``
  (``svm_helper.normalize_features``), in float64.
- classifier: per class and cost ``sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, intercept_scaling=1,
  penalty="l2", loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000)``; costs ``1, 10, 100`` (``eval_svm_full.sh``)
  and ``0.5^4 ... 0.5^19`` (``svm_helper.parse_cost_list``); each cost scored by 3-fold cross-validation of average
  precision on trainval (``cross_val_score(cv=3, scoring="average_precision")``), the best cost per class (first
  maximum) refit on the whole of trainval (``test_svm.get_chosen_costs``). ``random_state`` is fixed to the seed
  (the original leaves LinearSVC's coordinate-descent shuffling unseeded).
- metric: per class the all-point interpolated AP of the decision values on test (``svm_helper.calculate_ap``); mAP =
  mean over the 20 classes. Reference at full scale: mmselfsup MoCo v2 200 ep 84.04 (feat5).
- low-shot (``--low-shot``; FAIR ``create_voc_low_shot_samples.py``, mmselfsup ``train_svm_low_shot.py`` /
  ``test_svm_low_shot.py`` / ``aggregate_low_shot_svm_stats.py``): for k in 1, 2, 4, 8, 16, 32, 64, 96 and 5
  independent samples, per class k positives and 19 k negatives drawn from the absent images (difficult-only images
  are never drawn), the rest ignored; one SVM per cost on the sample (no cross-validation); per (sample, k, cost)
  the mean test AP over classes; per k the cost with the best mean over the 5 samples and, at that cost, the mean /
  min / max / std over samples. The cost is chosen on the test AP, as the original does: recorded as such.

    python -m transfer.voc07_svm --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar
    python -m transfer.voc07_svm --ckpt random                              # the random-init baseline row
    python -m transfer.voc07_svm --ckpt X --layers conv1,res2,res3,res4,res5 --low-shot
    torchrun --standalone --nproc_per_node 8 -m transfer.voc07_svm --ckpt X # features sharded over 8 processes
    make transfer TASK=voc07_svm WEIGHTS=X

Outputs in ``$CTBENCH_OUTPUT/transfer/voc07_svm/<run>/`` (``--out``): ``record.json`` (kind ``transfer``, task
``voc07_svm``; metrics ``cls/mAP`` (the res5 mAP, the table's number), ``cls/<layer>/mAP``, ``cls/<layer>/AP-<class>``,
the chosen costs, low-shot ``lowshot/<layer>/k<k>/{mean,min,max,std}``), ``features.pt`` (the feature cache, reused
when the backbone, layers and images are the same), ``log.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from ctbench import atomic
from ctbench import distributed as D
from ctbench.checkpoints import read_checkpoint
from ctbench.errors import UserError, cli_main
from ctbench.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from ctbench.paths import datasets_root, detect_scale, outputs_root
from ctbench.records import RunRecord, fingerprint
from transfer.classify.backbone import BackboneSource, build_resnet50, resolve_ckpt
from transfer.tasks import VOC07_SVM, VOC07_SVM_INFO

TASK = VOC07_SVM
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# Layer -> AvgPool2d(kernel, stride, padding) of mmselfsup's MultiPooling (pool_type "specified") for ResNet-50 at
# 224 px; the toy scale's at 112 px gives the same output grids (12, 6, 4, 3, 2), so the same feature lengths.
POOLS = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0), "res5": (6, 1, 0)}
TOY_POOLS = {"conv1": (5, 5, 2), "res2": (8, 4, 0), "res3": (5, 3, 0), "res4": (3, 2, 0), "res5": (3, 1, 0)}
COSTS = (1.0, 10.0, 100.0) + tuple(0.5 ** k for k in range(4, 20))
TOY_COSTS = tuple(0.5 ** k for k in range(4, 20))
LOW_SHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)
LOW_SHOT_SAMPLES = 5
FEATURES = "features.pt"
RECIPE = VOC07_SVM_INFO.recipe


# ---- data -------------------------------------------------------------------------------------------------------

@dataclass
class VocSplit:
    ids: list[str]  # image ids in sorted order
    labels: np.ndarray  # N x 20 int8: 1 present, -1 absent, 0 only difficult objects (VOC's per-class files)
    paths: list[Path]


def read_split(voc: Path, split: str) -> VocSplit:
    """The images of ``VOC2007/ImageSets/Main/<split>.txt`` and their labels from the per-class files."""
    main = voc / "ImageSets" / "Main"
    listing = main / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{listing} not found: --data-root must hold VOC2007/ with ImageSets/Main/ (run `make data` "
                        "for the toy VOC)")
    ids = sorted(ln.strip() for ln in listing.read_text().splitlines() if ln.strip())
    index = {i: n for n, i in enumerate(ids)}
    labels = np.full((len(ids), len(VOC_CLASSES)), -1, dtype=np.int8)
    for c, cls in enumerate(VOC_CLASSES):
        f = main / f"{cls}_{split}.txt"
        if not f.is_file():
            raise UserError(f"{f} not found: VOC's per-class image lists (ImageSets/Main/<class>_{split}.txt) are "
                            "needed for the classification labels")
        seen = 0
        for ln in f.read_text().splitlines():
            parts = ln.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1") or parts[0] not in index:
                raise UserError(f"{f}: bad line {ln!r} (expected '<image id in {split}.txt> <1|0|-1>')")
            labels[index[parts[0]], c] = int(parts[1])
            seen += 1
        if seen != len(ids):
            raise UserError(f"{f} lists {seen} images, {listing.name} {len(ids)}")
    paths = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images of {listing} are missing (e.g. {missing[0]})")
    return VocSplit(ids, labels, paths)


@dataclass(frozen=True)
class Setting:
    """Input size, pooling and costs: the protocol's (``full``) or the toy scale's (112 px, pools giving the same
    feature lengths, the 16 costs below 0.1: at 224 px and with costs 1-100 one toy backbone took 3 minutes on 2 cores,
    the high costs running to max_iter on 150 separable images)."""

    size: int
    pools: dict
    costs: tuple[float, ...]

    def transform(self) -> T.Compose:
        """mmselfsup svm_voc07.py: short side to 256 (x size / 224), then the whole image to size x size; ImageNet
        normalisation."""
        return T.Compose([T.Resize(round(self.size * 256 / 224)), T.Resize((self.size, self.size)), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


FULL = Setting(224, POOLS, COSTS)
TOY = Setting(112, TOY_POOLS, TOY_COSTS)


class _Images(Dataset):
    def __init__(self, paths: list[Path], positions: list[int], transform):
        self.paths, self.positions, self.transform = paths, positions, transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        with Image.open(self.paths[self.positions[j]]) as img:
            return self.positions[j], self.transform(img.convert("RGB"))


# ---- features -----------------------------------------------------------------------------------------------------

def feature_dims(layers: list[str], setting: Setting = FULL) -> dict[str, int]:
    """Length of each layer's pooled, flattened feature."""
    chans = {"conv1": (64, 2), "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    out = {}
    for layer in layers:
        c, stride = chans[layer]
        k, s, p = setting.pools[layer]
        side = (-(-setting.size // stride) + 2 * p - k) // s + 1
        out[layer] = c * side * side
    return out


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, layers: list[str], pools: dict = POOLS
                   ) -> dict[str, torch.Tensor]:
    """Pooled, flattened features of a torchvision ResNet-50 (eval mode) per layer: ``{layer: N x dim}``."""
    out = {}
    h = model.relu(model.bn1(model.conv1(x)))  # conv1: the stem before max-pool
    stages = {"conv1": h}
    h = model.maxpool(h)
    for name, block in (("res2", model.layer1), ("res3", model.layer2), ("res4", model.layer3), ("res5", model.layer4)):
        if all(layer in stages for layer in layers):
            break
        h = block(h)
        stages[name] = h
    for layer in layers:
        k, s, p = pools[layer]
        out[layer] = F.avg_pool2d(stages[layer].float(), k, s, p).flatten(1)  # count_include_pad as nn.AvgPool2d
    return out


def extract(model: nn.Module, split: VocSplit, layers: list[str], setting: Setting, device: torch.device,
            batch_size: int, workers: int, desc: str) -> dict[str, torch.Tensor]:
    """Features of every image of ``split`` on every process: process ``r`` of ``W`` encodes images r, r + W, ...,
    rows are all-gathered; ``{layer: N x dim}`` float32 in ``split`` order."""
    world, rank = D.world_size(), D.rank()
    mine = list(range(rank, len(split.ids), world))
    loader = DataLoader(_Images(split.paths, mine, setting.transform()), batch_size=batch_size, num_workers=workers,
                        shuffle=False, pin_memory=device.type == "cuda")
    dims = feature_dims(layers, setting)
    per = -(-len(split.ids) // world)  # rows per process after padding
    local = {layer: torch.zeros(per, d) for layer, d in dims.items()}
    bar = tqdm(loader, desc=desc, unit="batch", disable=rank != 0 or not sys.stderr.isatty(), leave=False)
    for pos, images in bar:
        feats = layer_features(model, images.to(device, non_blocking=True), layers, setting.pools)
        rows = torch.div(pos, world, rounding_mode="floor")  # this process's row of image `pos`
        for layer in layers:
            local[layer][rows] = feats[layer].cpu()
    if world == 1:
        return local
    out = {}
    for layer in layers:
        got = D.gather(local[layer].to(device)).cpu().view(world, per, -1)  # W x per x dim
        full = got.transpose(0, 1).reshape(world * per, -1)  # row j*W + r = image j*W + r
        out[layer] = full[:len(split.ids)].contiguous()
    return out


# ---- SVMs -----------------------------------------------------------------------------------------------------------

def normalize(features: np.ndarray) -> np.ndarray:
    """``f / (||f|| + 1e-5)`` per row, float64 (mmselfsup ``svm_helper.normalize_features``)."""
    f = np.asarray(features, dtype=np.float64)
    return f / (np.linalg.norm(f, axis=1) + 1e-5)[:, None]


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """All-point interpolated AP of ``scores`` for binary ``targets`` (> 0 = positive): precision made monotone
    (non-increasing in recall) and integrated over the recall steps, as ``svm_helper.calculate_ap`` on the curve
    of ``get_precision_recall`` (ties in score are taken in a stable descending order)."""
    pos = np.asarray(targets) > 0
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("no positive image: AP is undefined")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.cumsum(pos[order])
    fp = np.cumsum(~pos[order])
    recall = np.concatenate([[0.0], tp / n_pos, [1.0]])
    precision = np.concatenate([[0.0], tp / (tp + fp), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def make_svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                     tol=1e-4, dual=True, max_iter=2000, random_state=seed)


def _cv_ap(features: np.ndarray, y: np.ndarray, cost: float, seed: int) -> float:
    """Mean 3-fold cross-validated AP of one cost (``cross_val_score(cv=3, scoring="average_precision")``)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter 2000 is the protocol; small costs hit it
        return float(cross_val_score(make_svm(cost, seed), features, y, cv=3, scoring="average_precision").mean())


def _fit_scores(train: np.ndarray, y: np.ndarray, cost: float, seed: int, test: np.ndarray) -> np.ndarray:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_svm(cost, seed).fit(train, y).decision_function(test)


def _parallel(fn, jobs: list[tuple], n_jobs: int, desc: str) -> list:
    from joblib import Parallel, delayed

    bar = tqdm(total=len(jobs), desc=desc, unit="fit", disable=not sys.stderr.isatty(), leave=False)
    out = []
    for r in Parallel(n_jobs=n_jobs, return_as="generator")(delayed(fn)(*j) for j in jobs):
        out.append(r)
        bar.update(1)
    bar.close()
    return out


def svm_full(train_f: np.ndarray, train_labels: np.ndarray, test_f: np.ndarray, test_labels: np.ndarray,
             costs: tuple[float, ...] = COSTS, seed: int = 0, n_jobs: int = 1) -> dict:
    """The full protocol on normalised features: per class the cost of best 3-fold CV AP, refit, test AP.
    Labels N x C in {1, 0, -1} (present, difficult only, absent). Returns ``{"ap": [C], "cost": [C],
    "cv_ap": C x len(costs)}``."""
    n_cls = train_labels.shape[1]
    for c in range(n_cls):
        if not (train_labels[:, c] == 1).any() or not (test_labels[:, c] == 1).any():
            where = "trainval" if not (train_labels[:, c] == 1).any() else "test"
            raise UserError(f"class {VOC_CLASSES[c] if n_cls == len(VOC_CLASSES) else c} has no image in {where}: "
                            "its SVM or AP is undefined (too few images?)")
    ys = [np.where(train_labels[:, c] == 1, 1, -1) for c in range(n_cls)]  # difficult-only: negative in training
    cv = np.array(_parallel(_cv_ap, [(train_f, ys[c], cost, seed) for c in range(n_cls) for cost in costs],
                            n_jobs, "svm cross-validation")).reshape(n_cls, len(costs))
    chosen = [costs[int(np.argmax(cv[c]))] for c in range(n_cls)]
    scores = _parallel(_fit_scores, [(train_f, ys[c], chosen[c], seed, test_f) for c in range(n_cls)], n_jobs,
                       "svm refit")
    ap = []
    for c in range(n_cls):
        keep = test_labels[:, c] != 0  # difficult-only images are left out of the class's test set
        ap.append(average_precision(test_labels[keep, c] == 1, scores[c][keep]))
    return {"ap": ap, "cost": chosen, "cv_ap": cv.tolist()}


def low_shot_sample(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """FAIR ``create_voc_low_shot_samples.py``: per class k positives and (C - 1) k negatives drawn from the absent
    images, everything else ignored. Returns N x C in {1 positive, -1 negative, 0 ignored}."""
    out = np.zeros(labels.shape, dtype=np.int8)
    n_cls = labels.shape[1]
    for c in range(n_cls):
        pos, neg = np.nonzero(labels[:, c] == 1)[0], np.nonzero(labels[:, c] == -1)[0]
        if len(pos) < k or len(neg) < (n_cls - 1) * k:
            raise ValueError(f"class {c}: {len(pos)} positives / {len(neg)} negatives, fewer than k = {k} / "
                             f"{(n_cls - 1) * k}")
        out[rng.choice(pos, k, replace=False), c] = 1
        out[rng.choice(neg, (n_cls - 1) * k, replace=False), c] = -1
    return out


def svm_low_shot(train_f: np.ndarray, train_labels: np.ndarray, test_f: np.ndarray, test_labels: np.ndarray,
                 ks: tuple[int, ...] = LOW_SHOT_K, samples: int = LOW_SHOT_SAMPLES, costs: tuple[float, ...] = COSTS,
                 seed: int = 0, n_jobs: int = 1) -> dict:
    """Low-shot mAP per k (see the module docstring): ``{k: {"mean", "min", "max", "std", "cost"}}`` in percent; a k
    the training set cannot hold (too few positives or negatives in some class) is left out and listed under
    ``"skipped"``."""
    n_cls = train_labels.shape[1]
    out: dict = {"skipped": []}
    for k in ks:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 97, k]))
        try:
            draws = [low_shot_sample(train_labels, k, rng) for _ in range(samples)]
        except ValueError:
            out["skipped"].append(k)
            continue
        jobs = []
        for s, d in enumerate(draws):
            for c in range(n_cls):
                used = d[:, c] != 0
                for cost in costs:
                    jobs.append((s, c, cost, np.ascontiguousarray(train_f[used]), d[used, c]))
        scores = _parallel(_fit_scores, [(f, y, cost, seed, test_f) for _, _, cost, f, y in jobs], n_jobs,
                           f"low-shot k={k}")
        table = np.zeros((samples, len(costs)))  # mean AP over classes per (sample, cost)
        for (s, c, cost, _, _), sc in zip(jobs, scores):
            keep = test_labels[:, c] != 0
            table[s, costs.index(cost)] += average_precision(test_labels[keep, c] == 1, sc[keep]) / n_cls
        best = int(np.argmax(table.mean(0)))
        col = 100.0 * table[:, best]
        out[k] = {"mean": float(col.mean()), "min": float(col.min()), "max": float(col.max()),
                  "std": float(col.std()), "cost": costs[best]}
    return out


# ---- the run --------------------------------------------------------------------------------------------------------

def is_toy(voc: Path) -> bool:
    return detect_scale(voc) == "toy"


def _broadcast(obj):
    """``obj`` of rank 0 on every process (identity on one process)."""
    if D.world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(args: argparse.Namespace, source: BackboneSource, out: Path) -> dict:
    env = D.setup(args.device)
    try:
        return _run(args, source, out, env)
    finally:
        D.teardown(env)


def _run(args: argparse.Namespace, source: BackboneSource, out: Path, env: D.DistEnv) -> dict:
    t0 = time.time()
    voc = Path(args.data_root).expanduser() / "VOC2007" if args.data_root else datasets_root() / "VOC2007"
    train, test = read_split(voc, "trainval"), read_split(voc, "test")
    toy = is_toy(voc) if args.scale is None else args.scale == "toy"
    setting = TOY if toy else FULL
    layers = list(dict.fromkeys(args.layers.split(",")))
    bad = [x for x in layers if x not in POOLS]
    if bad:
        raise UserError(f"unknown layer {bad[0]!r} in --layers; choose from {', '.join(POOLS)}")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    log = _TextLog(out / "log.txt", env.is_main)
    log(f"VOC07 SVM of {source.description}: {len(train.ids)} trainval / {len(test.ids)} test images from {voc}, "
        f"layers {', '.join(layers)} -> {out}")
    data_fp = _broadcast(fingerprint(voc) if env.is_main else None)
    key = {"identity": source.identity, "layers": layers, "data": data_fp, "train": train.ids, "test": test.ids,
           "size": setting.size, "pools": {x: setting.pools[x] for x in layers}}
    cache_path = out / FEATURES
    cache = None
    if env.is_main and cache_path.is_file() and not args.fresh:
        c = read_checkpoint(cache_path)
        cache = c if c.get("key") == key else None
    reuse = _broadcast(cache is not None)
    if reuse:
        log(f"feature cache {cache_path} reused")
        feats = cache
    else:
        model = build_resnet50(source, 1000, args.seed)
        model.fc = nn.Identity()
        model = model.requires_grad_(False).eval().to(env.device)
        t1 = time.time()
        kw = {"setting": setting, "device": env.device, "batch_size": args.batch_size, "workers": args.workers}
        feats = {"key": key, "train": extract(model, train, layers, desc="trainval features", **kw),
                 "test": extract(model, test, layers, desc="test features", **kw)}
        feats["extract_s"] = time.time() - t1
        log(f"features of {len(train.ids) + len(test.ids)} images in {feats['extract_s']:.1f} s")
        if env.is_main:
            atomic.torch_save(feats, cache_path)
    D.barrier()
    if not env.is_main:
        return {}
    deviations = (["toy scale", "112 px input (pools giving the 224 px feature lengths)",
                   "costs 0.5^4..0.5^19 only"] if toy else []) \
        + ([f"layers {','.join(layers)}"] if layers != ["res5"] else [])
    if args.low_shot:
        deviations.append("low-shot: cost chosen on the test AP (as the original)")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "name", "fresh", "workers", "jobs", "device")} | {"layers": layers}
    with RunRecord("transfer", source.name, out, config=config, dataset=voc,
                   seed=args.seed, inputs=source.inputs, task=TASK) as rec:
        m = rec.metrics
        n_jobs = args.jobs
        for layer in layers:
            tf, sf = normalize(feats["train"][layer].numpy()), normalize(feats["test"][layer].numpy())
            t1 = time.time()
            res = svm_full(tf, train.labels, sf, test.labels, costs=setting.costs, seed=args.seed, n_jobs=n_jobs)
            mAP = 100.0 * float(np.mean(res["ap"]))
            m[f"cls/{layer}/mAP"] = mAP
            for cls, ap, cost in zip(VOC_CLASSES, res["ap"], res["cost"]):
                m[f"cls/{layer}/AP-{cls}"] = 100.0 * ap
                m[f"cls/{layer}/cost-{cls}"] = cost
            m[f"cls/{layer}/svm_s"] = time.time() - t1
            log(f"{layer}: mAP {mAP:.2f} (SVMs in {time.time() - t1:.1f} s)")
            if args.low_shot:
                ls = svm_low_shot(tf, train.labels, sf, test.labels, costs=setting.costs, seed=args.seed,
                                  n_jobs=n_jobs)
                for k, v in ls.items():
                    if k == "skipped":
                        continue
                    for stat in ("mean", "min", "max", "std"):
                        m[f"lowshot/{layer}/k{k}/{stat}"] = v[stat]
                    log(f"{layer} low-shot k={k}: {v['mean']:.2f} ± {v['std']:.2f} (cost {v['cost']:g})")
                if ls["skipped"]:
                    log(f"{layer} low-shot: k = {', '.join(map(str, ls['skipped']))} skipped (too few images per "
                        "class in trainval)")
                    rec.data["notes"].append(f"low-shot k skipped: {ls['skipped']}")
        head = "res5" if "res5" in layers else layers[-1]
        m["cls/mAP"] = m[f"cls/{head}/mAP"]
        m.update(train_images=len(train.ids), test_images=len(test.ids), extract_s=float(feats.get("extract_s", 0.0)),
                 total_s=time.time() - t0)
        rec.data["setting"] = {"size": setting.size, "pools": {x: setting.pools[x] for x in layers},
                               "costs": list(setting.costs)}
        rec.data["protocol"] = {"recipe": RECIPE, "deviations": deviations}
        rec.data["backbone"] = {"description": source.description, **source.identity}
        rec.outputs.update({"features": FEATURES, "log": "log.txt"})
    log(f"done: VOC07 SVM mAP {m['cls/mAP']:.2f} ({head}) in {time.time() - t0:.1f} s -> {out}")
    return dict(m)


class _TextLog:
    """Print a line (rank 0) and append it to ``log.txt``."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transfer.voc07_svm",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="VOC07 classification with linear SVMs on frozen ResNet-50 features "
                                            "(Goyal et al. 2019; FAIR / mmselfsup protocol).",
                                epilog="examples:\n  python -m transfer.voc07_svm --ckpt random\n"
                                       "  python -m transfer.voc07_svm --ckpt X --layers res4,res5 --low-shot\n")
    p.add_argument("--ckpt", "--weights", dest="ckpt",
                   help="checkpoint (ours, MoCo/JCL release, torchvision state_dict) or 'random'; default: the newest "
                        "pretraining output")
    p.add_argument("--data-root", help="datasets root holding VOC2007/ (default: $DETECTRON2_DATASETS)")
    p.add_argument("--layers", default="res5", help=f"comma-separated, of {', '.join(POOLS)} (default: res5)")
    p.add_argument("--scale", choices=("toy", "full"),
                   help="toy: 112 px, the costs below 0.1 (default: toy when VOC2007 carries the toy marker)")
    p.add_argument("--low-shot", action="store_true", help="also the low-shot protocol (k = 1 ... 96, 5 samples)")
    p.add_argument("--out", type=Path, help="run directory (default: $CTBENCH_OUTPUT/transfer/voc07_svm/<run>)")
    p.add_argument("--name", help="run name (default: the pretraining run, random, supervised)")
    p.add_argument("--seed", type=int, default=0, help="seed of random init, LinearSVC and low-shot draws")
    p.add_argument("--batch-size", type=int, default=32, help="feature-extraction batch per process (mmselfsup: 32)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--jobs", type=int, default=-1, help="parallel SVM fits (joblib; -1 = every core)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--fresh", action="store_true", help="ignore a feature cache in --out")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    source = resolve_ckpt(args.ckpt)
    if args.name:
        source.name = args.name
    out = args.out if args.out is not None else outputs_root() / "transfer" / TASK / source.name
    run(args, source, out)
    return 0


if __name__ == "__main__":
    sys.argv[0] = "python -m transfer.voc07_svm"
    sys.exit(main())
