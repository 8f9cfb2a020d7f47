"""Semi-supervised ImageNet: fine-tune the whole ResNet-50 on 1 % or 10 % of the labels, top-1 / top-5 on val.

Labelled subset, in this order:

1. ``--subset FILE``: a list in SimCLR's format (one train file name per line, the class from its wnid prefix);
2. SimCLR's own list beside the data: ``<ImageNet root>/1percent.txt`` (``10percent.txt``), else
   ``<ImageNet root>/imagenet_subsets/1percent.txt`` (google-research/simclr ``imagenet_subsets/``, 12,811 and
   128,116 images);
3. none found: a seeded, exactly class-balanced list in the same format is generated (``subset.seed``; 13,000 /
   128,000 images on ImageNet) and the run says so.

A given list is recognised as SimCLR's by its content (the sha256 of its sorted names), whatever its name; the
record's ``subset.source`` is ``simclr``, ``given`` (another list) or ``generated``, and the protocol's deviations
say ``subset: given <name> (sha256 ...)`` / ``subset: generated (seed S)`` (nothing for SimCLR's list: it is the
recipe's). A list whose size is not the asked percentage of the train images (within a factor sqrt(10): 1 % accepts
0.32-3.2 %, 10 % accepts 3.2-32 %), or SimCLR's list of the other percentage, is a one-line error. The list used is
saved in the run directory as ``subset.txt`` and its sha256 goes into the run record.

Recipe (presets ``transfer/presets/semisup_{1,10}pct.yaml``, from OpenSelfSup's semi-supervised benchmark,
``configs/benchmarks/semi_classification/imagenet_{1,10}percent/`` and ``docs/MODEL_ZOO.md``): whole network
trained, BN in train mode (SyncBN under DDP on GPU), ``fc`` N(0, 0.01) / 0, SGD momentum 0.9, weight decay 5e-4 at
1 % and 1e-4 at 10 %, batch 256, 20 epochs, lr x0.2 at epochs 12 and 16, backbone lr 0.01 and classifier lr x100
(``r50_lr0_01_head100``, OpenSelfSup's best setting for MoCo, MoCo v2, SimCLR and NPID at both 1 % and 10 %; it
searched backbone lr in {0.001, 0.01, 0.1} x head multiplier {1, 10, 100} per method: override ``optim.lr`` /
``optim.head_lr_mult`` to do the same); RandomResizedCrop 224 + flip; val resize 256 + centre crop 224, on the full
val set after the last epoch. The baselines get the setting MODEL_ZOO.md reports as best for them, automatically:
``--ckpt random`` lr 0.01 head x1 (``r50_lr0_01_head1``), torchvision's supervised weights lr 0.001 head x100 at 1 %
and x10 at 10 % (``r50_lr0_001_head100`` / ``head10``); ``key=value`` overrides still win. bf16 autocast on GPU
(``train.precision=fp32`` is the recipe's precision).

Toy scale (chosen when the data carries the toy marker): 64 px crops, 1 % = 1 image per class and 10 % = 10, a
short schedule of the same shape (see the presets' ``toy:`` sections).

    python -m transfer.semisup --pct 1                                 # newest pretraining output, toy data
    python -m transfer.semisup --pct 10 --ckpt random                   # the random-init baseline row
    python -m transfer.semisup --pct 1 --ckpt X --data /data/imagenet   # /data/imagenet[/imagenet_subsets]/1percent.txt
    python -m transfer.semisup --pct 1 --ckpt X --data /data/imagenet --subset my_1pct_list.txt
    torchrun --standalone --nproc_per_node 4 -m transfer.semisup --pct 10 --ckpt X --data /data/imagenet

Outputs in ``$CTBENCH_OUTPUT/semisup/pct<P>/<run>/`` (``--out`` to choose): ``record.json`` (metrics ``top1``,
``top5``, ``pct``; the subset's origin, file and hash; ``protocol``; inputs = the checkpoint), ``subset.txt``,
``checkpoint.pth.tar`` (the network; rerunning the command resumes; ``train.keep_every=N`` also keeps
``checkpoint_%04d.pth.tar`` every N epochs), ``metrics.jsonl``, ``log.txt``, ``config.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ctbench import atomic
from ctbench import distributed as D
from ctbench.config import to_dict
from ctbench.errors import cli_main
from ctbench.imagefolder import ImageFolder, collate_skip_bad
from ctbench.paths import detect_scale, imagenet_root, outputs_root
from ctbench.records import RunRecord
from transfer.classify import engine
from transfer.classify.backbone import BackboneSource, build_resnet50, resolve_ckpt
from transfer.classify.config import SemisupConfig, add_ckpt_argument, add_run_arguments, cli_parser, resolve
from transfer.classify.data import (
    SIMCLR_LISTS,
    SUBSET_DIRS,
    EpochSampler,
    SeededImages,
    balanced_subset,
    check_share,
    count_images,
    data_dirs,
    find_simclr_list,
    names_sha256,
    on_rank0,
    read_subset,
    simclr_pct,
    subset_sha256,
    train_transform,
    val_loader,
    write_subset,
)
from transfer.classify.protocol import semisup_protocol

SUBSET = "subset.txt"


class FineTune(engine.Task):
    """The whole network trained on the labelled subset; the classifier's lr multiplied by head_lr_mult."""

    def __init__(self, cfg: SemisupConfig, source: BackboneSource, env: D.DistEnv, files: list[str]):
        train_dir, val_dir, classes = data_dirs(cfg)
        self.cfg, self.env = cfg, env
        model = build_resnet50(source, len(classes), cfg.train.seed)
        self.sync_bn = env.distributed and env.device.type == "cuda" and cfg.sync_bn
        if self.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.channels_last = cfg.train.channels_last if cfg.train.channels_last is not None \
            else env.device.type == "cuda"
        model.to(env.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.module = model
        self.ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
            if env.distributed else model
        head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
        self.optimizer = torch.optim.SGD([{"params": body}, {"params": head}], cfg.optim.lr,
                                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.lr_mults = [1.0, cfg.optim.head_lr_mult]
        self.amp = engine.amp_dtype(cfg, env.device)
        folder = ImageFolder(train_dir, classes=classes, files=files)
        self.train_images = len(folder)
        self.sampler = EpochSampler(len(folder), cfg.train.batch_size, env.world_size, env.rank, cfg.train.seed)
        pin = env.device.type == "cuda"
        transform = train_transform(cfg.data.image_size, cfg.data.crop_scale, cfg.data.augment)
        self.loader = DataLoader(SeededImages(folder, transform), batch_sampler=self.sampler,
                                 num_workers=cfg.data.workers, collate_fn=collate_skip_bad, pin_memory=pin,
                                 persistent_workers=cfg.data.workers > 0)
        self.val_loader = val_loader(cfg, val_dir, classes, pin)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.env.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def batches(self):
        size = self.cfg.data.image_size
        for batch, n_bad in self.loader:
            if batch is None:  # every image of this share unreadable: an empty step keeps DDP in lockstep
                yield (self._images(torch.zeros(0, 3, size, size)),
                       torch.zeros(0, dtype=torch.long, device=self.env.device), n_bad)
                continue
            images, targets = batch
            yield self._images(images), targets.to(self.env.device), n_bad

    def logits(self, inputs):
        with torch.autocast(self.env.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.ddp(inputs)  # B x classes

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.module.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@5, images
        for batch, _ in self.val_loader:
            if batch is None:
                continue
            images, targets = batch
            with torch.autocast(self.env.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = self.module(self._images(images)).float()  # B x classes
            counts += torch.cat([engine.topk_correct(logits, targets.to(logits.device)),
                                 torch.tensor([float(targets.shape[0])], dtype=torch.float64)])
        self.module.train()
        return engine.accuracy(engine.all_reduce_sum(counts, self.env.device))


def select_subset(cfg: SemisupConfig) -> tuple[list[str], dict]:
    """The labelled file names and where they come from (see the module docstring for the order); writes nothing.
    Lists the train folder: rank 0 runs it (:func:`prepare_subset`)."""
    root = Path(cfg.data.path)
    train_dir = root / "train"
    given = Path(cfg.subset.file) if cfg.subset.file else find_simclr_list(root, cfg.pct)
    if given is not None:
        files = read_subset(given, train_dir, cfg.pct)  # SimCLR's list of the other percentage: an error
        simclr = simclr_pct(files)
        train_images = count_images(train_dir)
        check_share(given, len(files), train_images, cfg.pct)
        origin = {"source": "simclr" if simclr == cfg.pct else "given", "name": given.name,
                  "given": str(given.resolve()), "given_sha256": subset_sha256(given),
                  "found_beside_data": not cfg.subset.file, "train_images": train_images,
                  "share_pct": 100.0 * len(files) / train_images}
        how = ("SimCLR's list" if simclr == cfg.pct else "a list that is not SimCLR's (content differs)") + \
            f" {given}" + ("" if cfg.subset.file else " (found beside the data)")
    else:
        files = balanced_subset(train_dir, cfg.pct, cfg.subset.seed)
        looked = [str(root / d / SIMCLR_LISTS[cfg.pct].name) for d in SUBSET_DIRS]
        origin = {"source": "generated", "seed": cfg.subset.seed, "looked_for": looked,
                  "rule": "exactly class-balanced: max(1, round(pct/100 x images / classes)) per class"}
        how = f"a generated class-balanced list (seed {cfg.subset.seed})"
        if cfg.scale == "full":
            how += (f": no SimCLR list at {' or '.join(looked)} (put google-research/simclr imagenet_subsets/"
                    f"{SIMCLR_LISTS[cfg.pct].name} there, or pass --subset, for the published protocol)")
    return files, {**origin, "how": how}


def prepare_subset(cfg: SemisupConfig, out_dir: Path) -> tuple[list[str], dict]:
    """:func:`select_subset` on rank 0 (no other rank lists the train folder), the list saved as
    ``out_dir/subset.txt`` (the run directory is made only once the list is known to be right); the names and what
    the record says of them, on every rank."""

    def pick() -> tuple[list[str], dict]:
        files, origin = select_subset(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / SUBSET
        write_subset(path, files)
        per_class = Counter(f.split("/")[-1].split("_", 1)[0] for f in files)
        return files, {**origin, "file": SUBSET, "sha256": subset_sha256(path), "names_sha256": names_sha256(files),
                       "images": len(files), "classes": len(per_class), "per_class_min": min(per_class.values()),
                       "per_class_max": max(per_class.values())}

    return on_rank0(pick)


def run(cfg: SemisupConfig, source: BackboneSource, out_dir: Path, *, fresh: bool = False) -> dict:
    """Run (or resume) one fine-tuning in ``out_dir``; returns the record's metrics."""
    return engine.in_process_group(cfg.train.device, _run, cfg, source, out_dir, fresh)


def _run(cfg: SemisupConfig, source: BackboneSource, out_dir: Path, fresh: bool, env: D.DistEnv) -> dict:
    t0 = time.time()
    data_dirs(cfg)  # a missing split is a one-line error before anything is written
    files, subset = prepare_subset(cfg, out_dir)  # a wrong list too
    with engine.text_log(out_dir, env.is_main):
        identity = source.identity
        identity["subset"] = subset["sha256"]
        done = engine.already_finished(out_dir, cfg, identity, env, fresh)
        if done is not None:
            return done
        return _finetune(cfg, source, out_dir, env, fresh, files, subset, identity, t0)


def _finetune(cfg: SemisupConfig, source: BackboneSource, out_dir: Path, env: D.DistEnv, fresh: bool,
              files: list[str], subset: dict, identity: dict, t0: float) -> dict:
    if env.is_main:
        atomic.write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"semi-supervised {cfg.pct} % ({subset['images']} labelled images: {subset['how']}) from "
              f"{source.description}" + (f" ({source.baseline} baseline)" if source.baseline else "")
              + f" -> {out_dir}", flush=True)
        if source.backbone is not None and source.backbone.dropped:
            print(f"  not part of the backbone (ignored): {source.dropped_summary}", flush=True)
    # the record is rank 0's: only rank 0 lists (fingerprints) the dataset, cached in out_dir for a resumed run
    with RunRecord("semisup", source.name, out_dir, config=to_dict(cfg), dataset=cfg.data.path,
                   seed=cfg.train.seed, inputs=source.inputs, write=env.is_main) as rec:
        task = FineTune(cfg, source, env, files)
        metrics = engine.fit(cfg, task, out_dir, env, identity=identity, fresh=fresh, desc=f"semisup/{cfg.pct}pct")
        history = metrics.pop("history")
        metrics.update(pct=cfg.pct, labelled_images=task.train_images, total_s=time.time() - t0)
        rec.metrics.update(metrics)
        rec.data["subset"] = subset
        rec.data["backbone"] = {"description": source.description, **identity, "baseline": source.baseline,
                                "dropped": source.backbone.dropped if source.backbone is not None else []}
        rec.data["protocol"] = semisup_protocol(
            cfg, world_size=env.world_size, precision="bf16" if task.amp is not None else "fp32",
            sync_bn=task.sync_bn, subset=subset, baseline=source.baseline, complete=bool(metrics["complete"]),
            steps=metrics["steps"], total=cfg.train.epochs * task.sampler.steps_per_epoch)
        rec.outputs.update({"checkpoint": engine.CHECKPOINT, "metrics": engine.METRICS, "tensorboard": "tb",
                            "config": "config.yaml", "log": engine.LOG, "subset": SUBSET})
        rec.data["notes"].append(f"{len(history)} epochs; top-1/top-5 after the last epoch on the full val set")
    if env.is_main and metrics.get("complete"):
        print(f"done: {cfg.pct} % top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} (train "
              f"{metrics['train_time_s']:.1f} s, total {metrics['total_s']:.1f} s) -> {out_dir}", flush=True)
    return metrics


def parser() -> argparse.ArgumentParser:
    p = cli_parser(
        SemisupConfig, "python -m transfer.semisup",
        "Semi-supervised ImageNet: fine-tune a ResNet-50 on 1 % or 10 % of the labels (OpenSelfSup's recipe, "
        "SimCLR's lists). Single process, or DDP under torchrun. Resumes from the checkpoint in the output directory.",
        ["python -m transfer.semisup --pct 1 --ckpt outputs/pretrain/moco_v2/checkpoint.pth.tar",
         "python -m transfer.semisup --pct 10 --ckpt random",
         "python -m transfer.semisup --pct 1 --data /data/imagenet --subset 1percent.txt optim.lr=0.001"])
    p.add_argument("--pct", type=int, choices=(1, 10), required=True, help="percent of the labels: 1 or 10")
    add_ckpt_argument(p)
    p.add_argument("--subset", type=Path,
                   help="SimCLR-format list (one <wnid>_<n>.JPEG per line); default: SimCLR's 1percent.txt / "
                        "10percent.txt in the ImageNet root or its imagenet_subsets/, else a seeded class-balanced "
                        "list generated and saved with the run")
    add_run_arguments(p, preset="semisup_<P>pct.yaml", out="semisup/pct<P>/<run>",
                      fresh="ignore a checkpoint in --out and start over", example="optim.lr=0.001")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root()
    scale = args.scale or detect_scale(data)
    fixed: dict = {"pct": args.pct, "data": {"path": str(data)}}
    if args.subset is not None:
        fixed["subset"] = {"file": str(args.subset)}
    # the checkpoint first: a baseline (random, torchvision's supervised weights) gets its own lr and head multiplier
    source = resolve_ckpt(args.ckpt) if args.ckpt or not args.print_config else None
    cfg = resolve(SemisupConfig, f"semisup_{args.pct}pct", scale, args.preset, args.overrides, fixed=fixed,
                  baseline=source.baseline if source is not None else None)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.name:
        source.name = args.name
    out = args.out if args.out is not None else outputs_root() / "semisup" / f"pct{args.pct}" / source.name
    run(cfg, source, out, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
