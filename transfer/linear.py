"""Linear probe of a frozen ResNet-50: ImageNet top-1 / top-5 of a linear classifier on its pooled features.

Protocol (MoCo, facebookresearch/moco@132aea9 ``main_lincls.py``; preset ``transfer/presets/linear.yaml``): backbone
frozen in eval mode (BN statistics too), ``fc`` = Linear(2048, classes) with weights N(0, 0.01) and bias 0, SGD lr 30,
momentum 0.9, weight decay 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80; train RandomResizedCrop 224 +
flip, val resize 256 + centre crop 224; validated after every epoch, reporting ``best_acc1`` (the best top-1 over the
epochs, with ``best_epoch``) besides the last epoch's ``top1`` / ``top5``. The backbone is compared with the loaded
checkpoint after every epoch and the run fails if a single value changed (MoCo's ``sanity_check``).

``--recipe selfsup`` (preset ``transfer/presets/linear_selfsup.yaml``): SiMo's linear evaluation in V2AI/SelfSup
(cvpods), the one behind its published 68.1: the same probe for 90 epochs (x0.1 at 60 and 80), validated every 10
epochs, the last top-1 reported.

Two modes, both recorded in the run record (``config.mode``):

- ``standard`` (the default at full scale): exactly the above; every step runs the frozen backbone on freshly
  augmented images.
- ``cached`` (the fast mode; the default at toy scale): the backbone runs once: pooled features of every train image
  (the val transform's centre crop, or ``cache.views = K`` augmented views per image, one drawn per image and epoch)
  and of every val image are stored, then the same head is trained with the same schedule, batches and lr on the
  stored features (minutes instead of hours). With ``data.augment=false`` and ``cache.views=0`` both modes do the
  same arithmetic (tested). Not MoCo's protocol: its record says so (``protocol.deviations``).

Feature normalisation (``head.norm``): ``none`` (default) is MoCo's protocol above. ``bn`` puts a BatchNorm without
affine parameters between the frozen features and ``fc``, as MAE's linear probe (He et al. 2021, arXiv:2111.06377,
appendix A.2): training normalises with the statistics of the global batch (all processes together) and updates
running mean / variance, evaluation uses the running statistics; they are part of the head's checkpoint. It takes a
much smaller lr than 30 (MAE: 0.1 at batch 256, with LARS); it is not MoCo's setting.

Toy scale (chosen when the data carries the toy marker): cached features, 64 px crops (val resize 73 + centre crop
64), a shorter schedule with the same shape, and ``head.norm=bn`` (see the preset's ``toy:`` section: MoCo's lr 30 on
the raw features of a random or briefly trained ResNet-50 diverges to a one-class head at this scale).

Precision: bf16 autocast for the backbone's forward on GPU (``train.precision=auto``); ``train.precision=fp32`` is
the papers' precision. The record's ``protocol`` entry names the recipe and lists how the run departs from it
(scale, precision, processes vs the recipe's 8 GPUs, probe mode, head, schedule, batch and lr).

    python -m transfer.linear                                     # newest pretraining output, toy data, cached
    python -m transfer.linear --ckpt outputs/pretrain/jcl/checkpoint.pth.tar --mode standard
    python -m transfer.linear --ckpt random                       # the random-init baseline row
    python -m transfer.linear --ckpt resnet50-0676ba61.pth        # torchvision weights: the 'supervised' row
    python -m transfer.linear --ckpt moco_v2_800ep_pretrain.pth.tar --data /data/imagenet      # standard
    python -m transfer.linear --ckpt X --data /data/imagenet --mode cached cache.views=10     # the fast mode
    python -m transfer.linear --ckpt simo.pth.tar --data /data/imagenet --recipe selfsup      # SelfSup's 90 epochs
    torchrun --standalone --nproc_per_node 8 -m transfer.linear --ckpt X --data /data/imagenet

Outputs in ``$CTBENCH_OUTPUT/linear/<run>[-selfsup]/`` (cached) or ``linear/<run>[-selfsup]-standard/`` (``--out``
to choose): ``record.json`` (metrics ``top1``, ``top5``, ``best_acc1``, ``best_epoch``, times; ``protocol``;
inputs = the checkpoint, so the pretraining record is linked), ``checkpoint.pth.tar`` (the head; rerunning the
command resumes; ``train.keep_every=N`` also keeps ``checkpoint_%04d.pth.tar`` every N epochs), ``metrics.jsonl``,
``log.txt``, ``config.yaml`` and, in cached mode, ``features.pt`` (the feature cache, reused on resume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ctbench import atomic
from ctbench import distributed as D
from ctbench.checkpoints import pooled_features, read_checkpoint
from ctbench.config import to_dict
from ctbench.errors import cli_main
from ctbench.imagefolder import ImageFolder, collate_skip_bad, eval_transform
from ctbench.paths import detect_scale, imagenet_root, outputs_root
from ctbench.records import RunRecord
from transfer.classify import engine
from transfer.classify.backbone import BackboneSource, build_resnet50, check_unchanged, resolve_ckpt
from transfer.classify.config import (
    LINEAR_PRESETS,
    LinearConfig,
    add_ckpt_argument,
    add_run_arguments,
    cli_parser,
    resolve,
)
from transfer.classify.data import EpochSampler, SeededImages, data_dirs, on_rank0, train_transform, val_loader
from transfer.classify.protocol import linear_protocol

FEATURES = "features.pt"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FrozenBackbone:
    """The ResNet-50 trunk in eval mode without gradients, the loaded weights kept to check it stays frozen."""

    def __init__(self, cfg: LinearConfig, source: BackboneSource, num_classes: int, device: torch.device):
        model = build_resnet50(source, num_classes, cfg.train.seed)
        self.head_init = model.fc  # N(0, 0.01) / 0, drawn from the seed: the classifier starts from it
        model.fc = nn.Identity()
        self.reference = source.backbone.state_dict if source.backbone is not None else \
            {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.model = model.requires_grad_(False).eval().to(device)
        self.device = device
        self.amp = engine.amp_dtype(cfg, device)
        self.channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W (CPU) -> pooled features N x 2048 (float32, on the device)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return pooled_features(self.model, images).float()  # N x 2048

    def check(self) -> None:
        self.model.eval()
        check_unchanged(self.model, self.reference)


class GlobalBatchNorm(nn.Module):
    """BatchNorm without affine parameters over the *global* batch, for features that carry no gradient:
    ``N x C -> N x C``. Training: mean and (biased) variance of the batch of every process together (one float64
    all-reduce of the sums, sums of squares and count; SyncBatchNorm would do the same but runs on GPU only), running
    mean / unbiased variance updated with ``momentum`` as in ``nn.BatchNorm1d``; eval: the running statistics.
    ``eps`` = 1e-6 as MAE's linear probe."""

    def __init__(self, channels: int, eps: float = 1e-6, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm normalises frozen features: its input must not require a gradient")
        if not self.training:
            return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        x64 = x.double()
        stats = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_tensor([x.shape[0]])])  # 2C + 1
        if D.world_size() > 1:
            dist.all_reduce(stats)  # every process, an empty batch included, so the collectives stay matched
        c = x.shape[1]
        n = float(stats[-1])
        if n == 0:
            return x
        mean = stats[:c] / n  # C
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # C, biased: what the batch is normalised with
        m = self.momentum
        self.running_mean.copy_((1 - m) * self.running_mean.double() + m * mean)
        self.running_var.copy_((1 - m) * self.running_var.double() + m * var * (n / max(n - 1, 1.0)))
        self.num_batches_tracked += 1
        return ((x64 - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)  # N x C


class NormLinear(nn.Module):
    """``head.norm=bn``: :class:`GlobalBatchNorm` on the frozen features, then the linear classifier ``fc``.
    State: ``norm.running_mean``, ``norm.running_var``, ``norm.num_batches_tracked``, ``fc.weight``, ``fc.bias``."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.norm = GlobalBatchNorm(fc.in_features)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))  # B x classes


def _head(cfg: LinearConfig, frozen: FrozenBackbone, env: D.DistEnv) -> tuple[nn.Module, nn.Module]:
    """The trained head, unwrapped and DDP-wrapped: ``fc`` itself (``head.norm=none``: MoCo's state, ``weight`` and
    ``bias``) or :class:`NormLinear` (``head.norm=bn``)."""
    head = frozen.head_init if cfg.head.norm == "none" else NormLinear(frozen.head_init)
    head = head.to(env.device)
    # broadcast_buffers=False: every process computes the same global-batch statistics, nothing to copy from rank 0
    wrapped = DDP(head, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  broadcast_buffers=False) if env.distributed else head
    return head, wrapped


def _optimizer(cfg, head: nn.Module) -> torch.optim.SGD:
    params = list(head.parameters())
    assert len(params) == 2  # fc.weight, fc.bias: nothing else is trained (MoCo main_lincls asserts the same)
    return torch.optim.SGD(params, cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


class StandardProbe(engine.Task):
    """MoCo main_lincls: every step runs the frozen backbone on augmented images."""

    def __init__(self, cfg: LinearConfig, source: BackboneSource, env: D.DistEnv):
        train_dir, val_dir, classes = data_dirs(cfg)
        self.cfg, self.env = cfg, env
        self.frozen = FrozenBackbone(cfg, source, len(classes), env.device)
        self.module, self.ddp = _head(cfg, self.frozen, env)
        self.optimizer = _optimizer(cfg, self.module)
        self.lr_mults = [1.0]
        folder = ImageFolder(train_dir, classes=classes)
        self.train_images = len(folder)
        self.sampler = EpochSampler(len(folder), cfg.train.batch_size, env.world_size, env.rank, cfg.train.seed)
        transform = train_transform(cfg.data.image_size, cfg.data.crop_scale, cfg.data.augment)
        pin = env.device.type == "cuda"
        self.loader = DataLoader(SeededImages(folder, transform), batch_sampler=self.sampler,
                                 num_workers=cfg.data.workers, collate_fn=collate_skip_bad, pin_memory=pin,
                                 persistent_workers=cfg.data.workers > 0)
        self.val_loader = val_loader(cfg, val_dir, classes, pin)

    def batches(self):
        for batch, n_bad in self.loader:
            if batch is None:
                yield torch.zeros(0, 2048, device=self.env.device), torch.zeros(0, dtype=torch.long,
                                                                                device=self.env.device), n_bad
                continue
            images, targets = batch
            yield self.frozen.features(images), targets.to(self.env.device), n_bad

    def logits(self, inputs):
        return self.ddp(inputs)

    def train_mode(self) -> None:
        super().train_mode()  # the head's own BN (head.norm=bn) uses batch statistics while training
        self.frozen.model.eval()  # BN statistics stay frozen: main_lincls calls model.eval() for training too

    def after_epoch(self) -> None:
        self.frozen.check()

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.module.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@5, images
        for batch, _ in self.val_loader:
            if batch is None:
                continue
            images, targets = batch
            logits = self.module(self.frozen.features(images))  # B x classes
            counts += torch.cat([engine.topk_correct(logits, targets.to(logits.device)),
                                 torch.tensor([float(targets.shape[0])], dtype=torch.float64)])
        return engine.accuracy(engine.all_reduce_sum(counts, self.env.device))


# ---- cached mode ---------------------------------------------------------------------------------------------------

class _Positions(Dataset):
    """``(position, dataset[item])`` for a list of items (so unreadable images keep their place)."""

    def __init__(self, dataset, items: list):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        return j, self.dataset[self.items[j]]


def _collate_positions(batch: list):
    good = [(j, s) for j, s in batch if s is not None]
    if not good:
        return None, None, None
    pos = torch.tensor([j for j, _ in good])
    images = torch.stack([s[0] for _, s in good])  # B x 3 x H x W
    targets = torch.tensor([s[1] for _, s in good])
    return pos, images, targets


def extract(frozen: FrozenBackbone, dataset, items: list, *, batch_size: int, workers: int, dtype: torch.dtype,
            desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of ``dataset[item]`` for every item, in item order, on every process: ``(N x 2048 in dtype,
    valid N bool)``; an unreadable image gives a zero row and ``valid = False``. Process ``r`` encodes items
    ``r, r + W, ...``; the rows are gathered in chunks."""
    world, rank = D.world_size(), D.rank()
    mine = list(range(rank, len(items), world))
    loader = DataLoader(_Positions(dataset, [items[j] for j in mine]), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate_positions,
                        pin_memory=frozen.device.type == "cuda")
    local = torch.zeros(len(mine), 2048, dtype=dtype)
    local_valid = torch.zeros(len(mine), dtype=torch.bool)
    t0 = time.time()
    for done, (pos, images, _) in enumerate(loader, 1):
        if pos is not None:
            local[pos] = frozen.features(images).to("cpu", dtype)
            local_valid[pos] = True
        if D.rank() == 0 and time.time() - t0 > 10:
            print(f"{desc}: {done}/{len(loader)} batches", flush=True)
            t0 = time.time()
    if world == 1:
        return local, local_valid
    feats = torch.zeros(len(items), 2048, dtype=dtype)
    valid = torch.zeros(len(items), dtype=torch.bool)
    per = -(-len(items) // world)  # rows per process after padding
    chunk = max(1, (256 << 20) // (2048 * feats.element_size() * world))  # ~256 MiB per all_gather
    dev = frozen.device
    for lo in range(0, per, chunk):
        hi = min(lo + chunk, per)
        part = torch.zeros(hi - lo, 2049, dtype=torch.float32)
        n = max(0, min(hi, len(mine)) - lo)
        part[:n, :2048] = local[lo:lo + n].float()
        part[:n, 2048] = local_valid[lo:lo + n].float()
        got = D.gather(part.to(dev)).cpu().view(world, hi - lo, 2049)  # W x rows x (2048 + 1)
        for r in range(world):
            rows = torch.arange(lo, hi) * world + r  # item positions of process r's rows lo..hi
            keep = rows < len(items)
            feats[rows[keep]] = got[r, keep, :2048].to(dtype)
            valid[rows[keep]] = got[r, keep, 2048] > 0.5
    return feats, valid


def view_seed(seed: int, view: int, index: int) -> int:
    """Seed of augmented view ``view`` of train image ``index`` in the feature cache."""
    return int(np.random.SeedSequence([seed, 1_000_003, view, index]).generate_state(1)[0])


class CachedProbe(engine.Task):
    """The same head, schedule and batches as :class:`StandardProbe`, on features computed once. The cache is reused
    when its key matches: backbone, transform, views, dtype, seed and ``data_fingerprint`` (the ImageNet root's,
    computed once by rank 0; the train and val folders are listed by no other rank)."""

    def __init__(self, cfg: LinearConfig, source: BackboneSource, env: D.DistEnv, out_dir: Path, identity: dict,
                 fresh: bool, data_fingerprint: str | None):
        train_dir, val_dir, classes = data_dirs(cfg)
        self.cfg, self.env = cfg, env
        folder = ImageFolder(train_dir, classes=classes)
        self.train_images = len(folder)
        self.sampler = EpochSampler(len(folder), cfg.train.batch_size, env.world_size, env.rank, cfg.train.seed)
        self.lr_mults = [1.0]
        frozen = FrozenBackbone(cfg, source, len(classes), env.device)
        self.module, self.ddp = _head(cfg, frozen, env)
        self.optimizer = _optimizer(cfg, self.module)
        key = {"identity": identity, "image_size": cfg.data.image_size, "crop_scale": list(cfg.data.crop_scale),
               "augment": cfg.data.augment, "views": cfg.cache.views, "dtype": cfg.cache.dtype,
               "seed": cfg.train.seed, "data": data_fingerprint}
        path = out_dir / FEATURES
        cache = None
        if path.is_file() and not fresh:
            cache = read_checkpoint(path)
            if cache.get("key") != key:
                cache = None
        if not bool(D.all_true(torch.tensor(cache is not None, device=env.device)).item()):
            cache = self._extract(frozen, folder, val_dir, classes, key)
            if env.is_main:
                atomic.torch_save(cache, path)
            D.barrier()
        elif env.is_main:
            print(f"feature cache {path} reused (extracted in {cache['extract_s']:.1f} s)", flush=True)
        del frozen
        self.extract_s = float(cache["extract_s"])
        self.feats, self.valid = cache["train"], cache["train_valid"]  # V x N x 2048, V x N
        self.targets = torch.tensor(folder.targets)
        self.val_feats, self.val_valid, self.val_targets = cache["val"], cache["val_valid"], cache["val_targets"]

    def _extract(self, frozen: FrozenBackbone, folder: ImageFolder, val_dir: Path, classes: list[str],
                 key: dict) -> dict:
        cfg = self.cfg
        t0 = time.time()
        kw = {"batch_size": cfg.train.eval_batch_size, "workers": cfg.data.workers, "dtype": DTYPES[cfg.cache.dtype]}
        n = len(folder)
        if cfg.cache.views == 0:
            centre = ImageFolder(folder.root, transform=eval_transform(cfg.data.image_size), classes=classes)
            f, v = extract(frozen, centre, list(range(n)), desc="train features", **kw)
            feats, valid = f[None], v[None]  # 1 x N x 2048, 1 x N
        else:
            aug = SeededImages(folder, train_transform(cfg.data.image_size, cfg.data.crop_scale, cfg.data.augment))
            views = [extract(frozen, aug, [(i, view_seed(cfg.train.seed, k, i)) for i in range(n)],
                             desc=f"train features, view {k + 1}/{cfg.cache.views}", **kw)
                     for k in range(cfg.cache.views)]
            feats = torch.stack([f for f, _ in views])  # K x N x 2048
            valid = torch.stack([v for _, v in views])  # K x N
        val = ImageFolder(val_dir, transform=eval_transform(cfg.data.image_size), classes=classes)
        val_feats, val_valid = extract(frozen, val, list(range(len(val))), desc="val features", **kw)
        frozen.check()
        extract_s = time.time() - t0
        if D.rank() == 0:
            print(f"features of {n} x {feats.shape[0]} train and {len(val)} val images in {extract_s:.1f} s",
                  flush=True)
        return {"key": key, "train": feats, "train_valid": valid, "val": val_feats, "val_valid": val_valid,
                "val_targets": torch.tensor(val.targets), "extract_s": extract_s}

    def batches(self):
        dev = self.env.device
        views = self.feats.shape[0]
        for items in self.sampler:
            idx = torch.tensor([i for i, _ in items], dtype=torch.long)
            view = torch.tensor([s % views for _, s in items], dtype=torch.long)
            ok = self.valid[view, idx]
            x = self.feats[view[ok], idx[ok]].to(dev, torch.float32, non_blocking=True)  # B x 2048
            yield x, self.targets[idx[ok]].to(dev), int((~ok).sum())

    def logits(self, inputs):
        return self.ddp(inputs)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.module.eval()
        counts = torch.zeros(3, dtype=torch.float64)
        keep = torch.nonzero(self.val_valid).flatten()[self.env.rank::self.env.world_size]
        for part in keep.split(self.cfg.train.eval_batch_size):
            logits = self.module(self.val_feats[part].to(self.env.device, torch.float32))  # B x classes
            targets = self.val_targets[part].to(logits.device)
            counts += torch.cat([engine.topk_correct(logits, targets),
                                 torch.tensor([float(len(part))], dtype=torch.float64)])
        return engine.accuracy(engine.all_reduce_sum(counts, self.env.device))


# ---- command line --------------------------------------------------------------------------------------------------

def run(cfg: LinearConfig, source: BackboneSource, out_dir: Path, *, fresh: bool = False) -> dict:
    """Run (or resume) one linear probe in ``out_dir``; returns the record's metrics."""
    return engine.in_process_group(cfg.train.device, _run, cfg, source, out_dir, fresh)


def _run(cfg: LinearConfig, source: BackboneSource, out_dir: Path, fresh: bool, env: D.DistEnv) -> dict:
    t0 = time.time()
    data_dirs(cfg)  # a missing split is a one-line error before anything is written
    identity = source.identity
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with engine.text_log(out_dir, env.is_main):
        done = engine.already_finished(out_dir, cfg, identity, env, fresh)
        if done is not None:
            return done
        return _probe(cfg, source, out_dir, env, fresh, identity, t0)


def _probe(cfg: LinearConfig, source: BackboneSource, out_dir: Path, env: D.DistEnv, fresh: bool, identity: dict,
           t0: float) -> dict:
    if env.is_main:
        atomic.write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"linear probe ({cfg.mode}, {cfg.recipe} recipe) of {source.description} -> {out_dir}", flush=True)
        if source.backbone is not None and source.backbone.dropped:
            print(f"  not part of the backbone (ignored): {source.dropped_summary}", flush=True)
    # the record is rank 0's: only rank 0 lists (fingerprints) the dataset, cached in out_dir for a resumed run
    with RunRecord("linear", source.name, out_dir, config=to_dict(cfg), dataset=cfg.data.path,
                   seed=cfg.train.seed, inputs=source.inputs, write=env.is_main) as rec:
        if cfg.mode == "standard":
            task: engine.Task = StandardProbe(cfg, source, env)
        else:
            data_fp = on_rank0(lambda: rec.data["dataset"]["fingerprint"])
            task = CachedProbe(cfg, source, env, out_dir, identity, fresh, data_fp)
        metrics = engine.fit(cfg, task, out_dir, env, identity=identity, fresh=fresh, desc=f"linear/{cfg.mode}")
        task.after_epoch()  # MoCo's sanity_check, once more at the very end
        history = metrics.pop("history")
        metrics.update(mode=cfg.mode, train_images=task.train_images, total_s=time.time() - t0,
                       extract_s=getattr(task, "extract_s", 0.0))
        rec.metrics.update(metrics)
        rec.data["backbone"] = {"description": source.description, **identity, "baseline": source.baseline,
                                "dropped": source.backbone.dropped if source.backbone is not None else []}
        amp = engine.amp_dtype(cfg, env.device)
        rec.data["protocol"] = linear_protocol(
            cfg, world_size=env.world_size, precision="bf16" if amp is not None else "fp32",
            complete=bool(metrics["complete"]), steps=metrics["steps"],
            total=cfg.train.epochs * task.sampler.steps_per_epoch)
        rec.outputs.update({"checkpoint": engine.CHECKPOINT, "metrics": engine.METRICS, "tensorboard": "tb",
                            "config": "config.yaml", "log": engine.LOG,
                            **({"features": FEATURES} if cfg.mode == "cached" else {})})
        evaluated = sum("top1" in h for h in history)
        rec.data["notes"].append(f"{len(history)} epochs, {evaluated} evaluated; top1/top5 after the last epoch, "
                                 "best_acc1 the best top-1 of the evaluated epochs (best_epoch, 1-based)")
    if env.is_main and metrics.get("complete"):
        print(f"done: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} best top-1 {metrics['best_acc1']:.2f} "
              f"(epoch {metrics['best_epoch']}) ({cfg.mode}; train {metrics['train_time_s']:.1f} s = "
              f"{metrics['s_per_epoch']:.2f} s/epoch, features {metrics['extract_s']:.1f} s, total "
              f"{metrics['total_s']:.1f} s) -> {out_dir}", flush=True)
    return metrics


def parser() -> argparse.ArgumentParser:
    p = cli_parser(
        LinearConfig, "python -m transfer.linear",
        "Linear probe of a frozen ResNet-50 (MoCo main_lincls, or SelfSup's 90-epoch evaluation), standard or on "
        "cached features. Single process, or DDP under torchrun. Resumes from the checkpoint in the output directory.",
        ["python -m transfer.linear --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar",
         "python -m transfer.linear --ckpt random --mode standard",
         "python -m transfer.linear --ckpt X --data /data/imagenet --mode cached   # the fast mode",
         "python -m transfer.linear --ckpt X --data /data/imagenet --recipe selfsup",
         "torchrun --standalone --nproc_per_node 8 -m transfer.linear --ckpt X --data /data/imagenet"])
    add_ckpt_argument(p)
    p.add_argument("--mode", choices=("standard", "cached"),
                   help="standard: backbone on every step (MoCo exactly; the default at full scale); cached: "
                        "features once, the fast mode (the default at toy scale)")
    p.add_argument("--recipe", choices=tuple(LINEAR_PRESETS), default="moco",
                   help="moco: facebookresearch/moco main_lincls (100 epochs, best top-1; presets/linear.yaml); "
                        "selfsup: V2AI/SelfSup's SiMo linear evaluation (90 epochs, last top-1; "
                        "presets/linear_selfsup.yaml)")
    add_run_arguments(p, preset="linear.yaml (linear_selfsup.yaml with --recipe selfsup)",
                      out="linear/<run>[-selfsup][-standard]",
                      fresh="ignore a checkpoint and feature cache in --out", example="train.epochs=20")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root()
    scale = args.scale or detect_scale(data)
    fixed: dict = {"data": {"path": str(data)}}
    if args.mode is not None:
        fixed["mode"] = args.mode
    cfg = resolve(LinearConfig, LINEAR_PRESETS[args.recipe], scale, args.preset, args.overrides, fixed=fixed)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    source = resolve_ckpt(args.ckpt)
    if args.name:
        source.name = args.name
    suffix = ("-selfsup" if cfg.recipe == "selfsup" else "") + ("-standard" if cfg.mode == "standard" else "")
    out = args.out if args.out is not None else outputs_root() / "linear" / (source.name + suffix)
    run(cfg, source, out, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
