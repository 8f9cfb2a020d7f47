"""The pretraining loop: build -> resume -> for each step: forward, check finite, backward, step, schedule, log,
checkpoint -> run record. One explicit loop (:func:`_train`, as MoCo's main_moco.py ``train``); the run's
resume, stop signals, logging and checkpoint writing are the skeleton every training stage shares
(:mod:`ctbench.training`); per-method logic is a model method or the loss's own (``loss.set_epoch``).

Outputs in the run directory (``$CTBENCH_OUTPUT/pretrain/<name>/`` by default):

- ``checkpoint.pth.tar``: the MoCo-compatible checkpoint (see :func:`checkpoint_dict`), rewritten atomically every
  ``train.ckpt_every`` steps and at every epoch end; a run restarted in the same directory resumes from it
  bit-exactly (model, optimizer, scaler, queue, data order and augmentation seeds, loss history);
- ``checkpoint_%04d.pth.tar`` (0-based epoch, as MoCo's main_moco.py): the checkpoint of every
  ``train.keep_every``-th epoch end, kept (a hard link when the file system allows it);
- ``metrics.jsonl`` (one JSON line per log step, per epoch end and per kNN evaluation) and TensorBoard scalars
  under ``tb/``; ``log.txt``: what the run prints, with times (appended to on resume);
- ``config.yaml``: the resolved config; ``record.json``: the run record (with its ``protocol``: the method's
  recipe and this run's deviations from it, :mod:`pretrain.protocol`), written when the run completes;
- ``.last_step``: the last step rank 0 finished (one number, rewritten in place each step), read on resume to
  count the steps done after the checkpoint, which the resumed run does again.

Stopping and resuming: SIGINT (Ctrl-C), SIGTERM (``kill``, a scheduler's preemption) and SIGUSR1 (SLURM's
``--signal``) stop the run at the next step boundary, the same step on every rank, after writing the checkpoint of
that step (:class:`ctbench.training.TrainingRun`); the line says where it is. A run started in a directory says
"resuming at step N" (and how many steps it redoes) or "starting fresh: ...". Under ``torchrun --max-restarts N``
a killed rank's generation is replaced by a new one that resumes the same way; the record's ``metrics`` count the
resumes, the steps redone and torchrun's restarts (``TORCHELASTIC_RESTART_COUNT``), also in ``log.txt``.

Epoch ends: the epoch's summary line, the kNN monitor (``monitor.knn_every``: top-1 of the query backbone's
pooled features, :mod:`pretrain.knn`, each rank encoding its share), the checkpoint, the kept copy.

A process whose whole batch is unreadable does not stop alone: every step, all processes OR a host-side flag in
one small collective (a gloo side group under nccl, nothing on one process) and all skip that step together; an
epoch in which every step was skipped stops the run with one line.

Data (:func:`build_pipeline`): every image is decoded once for its 1 + M views; ``data.aug_device=cpu`` runs the
whole PIL augmentation in the workers, ``gpu`` (the default on CUDA) cuts uint8 crops there and finishes the
augmentation batched on the device; both go through :class:`pretrain.gpu_aug.DeviceLoader` (pinned memory and a
side-stream prefetch on CUDA, ``data.prefetch``). ``train.compile`` compiles both encoders in place
(:func:`compile_encoders`). ``train.keep_optimizer=false`` writes the final checkpoint of a complete run without
the optimizer state. The record's ``pipeline`` entry says which of these the run used.

Host syncs: only at log steps (loss values, the non-finite flag) and at checkpoints. ``train.nonfinite=skip`` adds
one per step (the decision to skip needs the value on the host).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ctbench import atomic, training
from ctbench import distributed as D
from ctbench.config import to_dict
from ctbench.errors import UserError
from ctbench.imagefolder import ImageFolder, sample_seed
from ctbench.records import RECORD_NAME, RunRecord, load_record
from ctbench.training import CHECKPOINT, LAST_STEP, LOG, METRICS, Diverged, RunLog, TrainingRun, keep_checkpoint
from pretrain.config import PretrainConfig, config_differences, milestone_epochs
from pretrain.data import EpochBatchSampler, MultiViewDataset, build_augmentation, collate_views
from pretrain.gpu_aug import AugSpec, CropDataset, DeviceLoader, collate_crops
from pretrain.knn import knn_top1
from pretrain.losses import LossOutput, build_loss
from pretrain.model import ContrastiveModel
from pretrain.protocol import protocol

__all__ = ["CHECKPOINT", "LAST_STEP", "LOG", "METRICS", "Diverged", "Progress", "TrainResult", "build_model",
           "build_pipeline", "checkpoint_dict", "learning_rate", "step_generator", "train"]

QUEUE_FILL_EPOCH = 2**31 - 1  # seed domain of the queue-filling images (never a training epoch)


@dataclass
class Progress(training.Progress):
    """A pretraining run's counters besides step / epoch / time, and its per-step loss history."""

    losses: list[float] = field(default_factory=list)
    skipped_images: int = 0  # unreadable images of the finished epochs (all processes)
    epoch_skipped: int = 0  # ... of the current epoch: this process's since the last save (rank 0: + all before it)
    skipped_steps: int = 0
    knn_top1: float | None = None  # the last kNN monitor value (percent) and the epochs done when it was taken
    knn_epoch: int = 0
    epoch_unread_steps: int = 0  # steps of this epoch skipped because a process's whole batch was unreadable
    pending: list[list[float] | None] = field(default_factory=list)  # per-step [loss, terms...] not yet logged
    term_names: list[str] = field(default_factory=list)

    RANK0_SUMS = ("epoch_skipped",)

    def state(self) -> dict:
        return {**super().state(), "losses": torch.tensor(self.losses)}


def learning_rate(cfg: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linearly scaled base lr (``lr x batch / lr_batch``), warm-up, then cosine per step or x0.1 at milestones
    (fractions of ``train.epochs`` or epochs; at a whole epoch the step is MoCo's per-epoch ``epoch >= milestone``).

    ``optim.warmup_epochs``: linear from 0, the schedule starts after it. ``optim.warmup_steps``: cvpods'
    ``WarmupCosineLR`` / ``WarmupMultiStepLR`` (SiMo): the schedule times a factor going linearly from 0.001 at
    step 0 to 1 at ``warmup_steps`` (:func:`ctbench.training.schedule_lr`)."""
    o, epochs = cfg.optim, cfg.train.epochs
    base = o.lr * cfg.train.batch_size / o.lr_batch
    return training.schedule_lr(base, step / steps_per_epoch, epochs, schedule=o.schedule, step=step,
                                milestones=milestone_epochs(o.milestones, epochs), warmup_epochs=o.warmup_epochs,
                                warmup_steps=o.warmup_steps)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step (shuffle-BN permutation, in-batch negatives): equal on every rank, and the
    same after a restart."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7919, step]).generate_state(1)[0]))


def checkpoint_dict(cfg: PretrainConfig, model: ContrastiveModel, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler, progress: Progress, data_state: dict) -> dict:
    """MoCo-compatible: ``state_dict`` (``encoder_q.*``, ``encoder_k.*``, ``queue``, ``queue_ptr``), ``epoch``
    (completed epochs), ``arch``, ``optimizer``; plus ``step``, ``scaler``, ``rng`` (with the data order), the
    resolved ``config``, ``ctbench`` (version, method), ``progress`` (counters, loss history, the losses of the
    steps since the last log line) and ``interruptions`` (:func:`ctbench.training.checkpoint_dict`).
    ``optimizer=None`` (a complete run under ``train.keep_optimizer=false``): no ``optimizer`` entry,
    ``optimizer_dropped`` says why."""
    extra = {"arch": "resnet50", "scaler": scaler.state_dict()}
    if optimizer is None:
        extra["optimizer_dropped"] = ("train.keep_optimizer=false: dropped when the run completed at step "
                                      f"{progress.step}")
    return training.checkpoint_dict(model, optimizer, progress, config=to_dict(cfg), about={"method": cfg.method},
                                    data=data_state, **extra)


def _precision(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def _find_data(cfg: PretrainConfig) -> ImageFolder:
    if not cfg.data.path:
        raise UserError("no training data: pass --data DIR (ImageNet layout DIR/<class>/<image>)")
    root = Path(cfg.data.path)
    if not root.is_dir():
        raise UserError(f"training data not found: {root} (run `make data` for the toy ImageNet, or pass --data)")
    return ImageFolder(root)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class TrainResult:
    metrics: dict  # the run record's metrics
    model: ContrastiveModel  # this process's model after the last step (identical on every rank)


def train(cfg: PretrainConfig, out_dir: str | os.PathLike, name: str, fresh: bool = False) -> TrainResult:
    """Run (or resume) one pretraining in ``out_dir``.

    A run whose checkpoint already covers the schedule and whose record exists only reloads them."""
    out_dir = Path(out_dir)
    env = D.setup(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        with training.peer_failures_are_one_line(env, cfg.train.dist_timeout_s):
            return _train(cfg, out_dir, name, fresh, env)
    except UserError as e:  # the one line the user sees, kept in log.txt too
        if env.is_main:
            training.append_log(out_dir, f"error: {e}")
        raise
    finally:
        D.teardown(env)


def resolve_bn(cfg: PretrainConfig, world: int) -> tuple[str, int]:
    """The BN mode of a run on ``world`` processes: ``(shuffle_bn in ddp/split/off, sub-batches per BN)``."""
    mode = cfg.model.shuffle_bn
    if mode == "auto":
        mode = "off" if cfg.model.sync_bn else ("ddp" if world > 1 else "split")
    return mode, (cfg.model.bn_splits if mode == "split" else 1)


def build_model(cfg: PretrainConfig, world: int) -> ContrastiveModel:
    """The model of a run of ``cfg`` on ``world`` processes, its BN flavour resolved by :func:`resolve_bn`."""
    shuffle_bn, splits = resolve_bn(cfg, world)
    return ContrastiveModel(cfg.model.head, cfg.model.dim, cfg.model.hidden_dim, cfg.model.momentum,
                            cfg.model.queue_size, cfg.model.batch_negatives, shuffle_bn, splits,
                            cfg.model.zero_init_residual, sync_bn=cfg.model.sync_bn,
                            residual_gamma=cfg.model.residual_gamma)


def resolve_aug_device(cfg: PretrainConfig, device: torch.device) -> str:
    """``data.aug_device`` of a run on ``device``: ``auto`` is ``gpu`` on CUDA, ``cpu`` elsewhere."""
    if cfg.data.aug_device == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return cfg.data.aug_device


@dataclass
class Pipeline:
    """The training data of a run: the dataset (1 + M views of one decode per image), its collate function and,
    for ``aug_device=gpu``, the augmentation that :class:`pretrain.gpu_aug.DeviceLoader` finishes on the device."""

    dataset: MultiViewDataset | CropDataset
    collate: Callable
    spec: AugSpec | None
    aug_device: str

    def loader(self, batch_sampler, cfg: PretrainConfig, device: torch.device, out_dtype: torch.dtype
               ) -> DeviceLoader:
        """Batches ``(images B x (1+M) x 3 x S x S on device, targets, n_bad)``; pinned and prefetched on a side
        stream on CUDA (``data.prefetch``)."""
        workers = cfg.data.workers
        loader = DataLoader(self.dataset, batch_sampler=batch_sampler, collate_fn=self.collate, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None, worker_init_fn=D.worker_ignores_stop_signals,
                            generator=torch.Generator().manual_seed(cfg.train.seed))  # leaves the global RNG alone
        return DeviceLoader(loader, device, self.spec, prefetch=cfg.data.prefetch, out_dtype=out_dtype)


def build_pipeline(cfg: PretrainConfig, folder: ImageFolder, device: torch.device) -> Pipeline:
    """The dataset of ``cfg`` on ``device``: ``aug_device=cpu``: :class:`pretrain.data.MultiViewDataset` (the PIL
    pipeline in the workers); ``gpu``: :class:`pretrain.gpu_aug.CropDataset` (uint8 crops + their parameters,
    the rest on the device). Both decode each image once for all 1 + M views and draw the same parameters."""
    aug = resolve_aug_device(cfg, device)
    views = 1 + cfg.data.num_keys
    if aug == "gpu":
        spec = AugSpec.preset(cfg.data.augmentation, cfg.data.image_size, cfg.data.crop_scale, cfg.data.blur_sigma)
        return Pipeline(CropDataset(folder, spec, views), collate_crops, spec, aug)
    augment = build_augmentation(cfg.data.augmentation, cfg.data.image_size, cfg.data.crop_scale, cfg.data.blur_sigma)
    return Pipeline(MultiViewDataset(folder, augment, views), collate_views, None, aug)


def compile_encoders(model: ContrastiveModel) -> None:
    """``train.compile``: ``torch.compile`` both encoders in place (``nn.Module.compile``), so the state-dict keys,
    the checkpoint and the momentum update are unchanged (``torch.compile(module)`` would wrap it and prefix every
    key with ``_orig_mod.``)."""
    model.encoder_q.compile()
    model.encoder_k.compile()


class LossWindow:
    """The per-step ``[loss, terms...]`` of the steps since the last log line, kept on the device (``None``: a
    skipped step) so that only a log step syncs with the host; saved in the checkpoint (``progress.pending``)."""

    def __init__(self, progress: Progress, device: torch.device):
        self.names = list(progress.term_names)
        self.steps = [None if v is None else torch.tensor(v, device=device) for v in progress.pending]

    def add(self, out: LossOutput | None) -> None:
        if out is None:
            self.steps.append(None)
            return
        self.names = self.names or sorted(out.terms)
        self.steps.append(torch.stack([out.loss.detach().float(), *(out.terms[t].float() for t in self.names)]))

    def flush(self, progress: Progress) -> tuple[float, dict[str, float]]:
        """The mean loss and terms of the steps that ran (the host sync of a log step); every step's loss goes to
        ``progress.losses`` (NaN for a step skipped for unreadable data)."""
        ran = [v is not None for v in self.steps]
        width = 1 + len(self.names)
        values = torch.stack([v.cpu() if v is not None else torch.full((width,), float("nan")) for v in self.steps])
        self.steps.clear()
        progress.losses.extend(values[:, 0].tolist())
        values = values[ran] if any(ran) else values
        return float(values[:, 0].mean()), {t: float(values[:, i + 1].mean()) for i, t in enumerate(self.names)}

    def save(self, progress: Progress) -> None:
        progress.pending = [None if v is None else v.tolist() for v in self.steps]
        progress.term_names = list(self.names)


def _skipped_in_epoch(progress: Progress, env: D.DistEnv) -> int:
    """The current epoch's unreadable images, all processes (a collective under DDP)."""
    if env.world_size == 1:
        return progress.epoch_skipped
    return int(D.gather(torch.tensor([progress.epoch_skipped], device=env.device)).sum().item())


def _train(cfg: PretrainConfig, out_dir: Path, name: str, fresh: bool, env: D.DistEnv) -> TrainResult:
    device, world, batch = env.device, env.world_size, cfg.train.batch_size
    if batch % world:
        raise UserError(f"train.batch_size ({batch}) must be divisible by the number of processes ({world})")
    local_batch = batch // world
    shuffle_bn, splits = resolve_bn(cfg, world)
    if splits > 1 and (local_batch % splits or local_batch // splits < 2):
        raise UserError(f"model.bn_splits = {splits} must split the batch of {local_batch} images per process into "
                        "equal sub-batches of at least 2; change model.bn_splits or train.batch_size")
    amp_dtype = _precision(cfg, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda"

    # ---- build --------------------------------------------------------------------------------------------------
    folder = _find_data(cfg)
    knn_val = _knn_val_dir(cfg)
    pipeline = build_pipeline(cfg, folder, device)
    dataset = pipeline.dataset
    sampler = EpochBatchSampler(len(dataset), local_batch, world, env.rank, cfg.train.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise UserError(f"{folder.root} has {len(dataset)} images, fewer than one global batch ({batch}); "
                        "lower train.batch_size")
    loader = pipeline.loader(sampler, cfg, device, amp_dtype or torch.float32)

    training.seed_everything(cfg.train.seed)  # identical initialisation on every rank
    model = build_model(cfg, world)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if cfg.train.compile:
        compile_encoders(model)
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.hparams())
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    total_steps = cfg.train.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps

    # ---- resume -------------------------------------------------------------------------------------------------
    def state(interrupted: bool) -> dict | None:  # the checkpoint (every rank; the dict on rank 0)
        D.broadcast_buffers(model)
        total = _skipped_in_epoch(progress, env)  # rank 0 saves the count of every process; the others restart at 0
        progress.epoch_skipped = total if env.is_main else 0
        window.save(progress)  # the steps since the last log line
        if not env.is_main:
            return None
        data_state = {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "seed": cfg.train.seed,
                      "world_size": world, "batch_size": local_batch}
        drop = not cfg.train.keep_optimizer and progress.step >= total_steps  # complete: nothing to resume
        return checkpoint_dict(cfg, model, None if drop else optimizer, scaler, progress, data_state)

    run = TrainingRun(out_dir, env, Progress(), steps_per_epoch=steps_per_epoch, stop_at=stop_at, state=state,
                      new_run="--name", nonfinite=cfg.train.nonfinite,
                      hint="Lower optim.lr, or set train.nonfinite=skip to skip such steps")
    if run.resume(fresh, lambda ckpt: _check(ckpt, cfg, run), lambda ckpt: _restore(ckpt, model, optimizer, scaler,
                                                                                  stop_at, run.ckpt_path)):
        model.to(device)
        if run.progress.step >= stop_at and (out_dir / RECORD_NAME).is_file():
            if env.is_main:
                print(f"{out_dir}: already trained to step {run.progress.step}; nothing to do", flush=True)
                training.append_log(out_dir, f"already trained to step {run.progress.step}; nothing to do")
            return TrainResult(load_record(out_dir)["metrics"], model)
    progress = run.progress
    if progress.step == 0 and cfg.model.queue_init == "keys" and cfg.model.queue_size > 0:
        _fill_queue(model, pipeline, cfg, env, local_batch, amp_dtype)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale_temps(out_dir)
        atomic.write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    encoder_q = (DDP(model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
                 if world > 1 else model.encoder_q)
    log = RunLog(out_dir, env.is_main, run, desc="pretrain", log_file=True)
    run.say = log.say
    log.say(f"pretrain {cfg.method} ({cfg.scale} scale): {len(dataset)} images, {world} process(es) on "
            f"{device.type}, global batch {batch}, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs"
            + (f", stopping at step {stop_at}" if stop_at < total_steps else "")
            + (f", resuming at step {progress.step}" if progress.step else "")
            + f"; augmentation after the crop on the {'device' if pipeline.aug_device == 'gpu' else 'workers'} "
            f"(data.aug_device={pipeline.aug_device}) -> {out_dir}")
    log.say(run.start_line())
    window = LossWindow(progress, device)

    # the dataset fingerprint (a stat per file) is computed by the writing rank only, once per run (cached in out_dir)
    record = RunRecord("pretrain", name, out_dir, config=to_dict(cfg), dataset=folder.root, seed=cfg.train.seed,
                       write=env.is_main)
    record.data["protocol"] = protocol(cfg, world_size=world, shuffle_bn=shuffle_bn, bn_splits=splits,
                                       precision=precision, stop_at=stop_at, total_steps=total_steps)
    # how the run was computed, not what it computes (not protocol: same parameter draws, same model)
    record.data["pipeline"] = {"aug_device": pipeline.aug_device, "prefetch": loader.prefetch,
                               "compile": cfg.train.compile, "channels_last": channels_last,
                               "decodes_per_image": 1, "views_per_image": 1 + cfg.data.num_keys}

    # ---- loop ---------------------------------------------------------------------------------------------------
    try:
        with record, run:
            if cfg.monitor.knn_every and progress.step == 0:  # the initialisation: the learning curve's first point
                _knn_monitor(cfg, model, folder, knn_val, progress, log, env)
                run.restart_clock()
            while progress.step < stop_at:
                epoch = progress.epoch
                sampler.set_epoch(epoch, progress.step_in_epoch)
                loss_fn.set_epoch(epoch, cfg.train.epochs)  # the loss's own schedule (JCL: λ ramped per epoch)
                model.train()
                for images, _, n_bad in loader:
                    # one collective: every rank skips this step or none does; every rank stops here or none does
                    (unreadable,) = run.check_stop(images is None)
                    progress.epoch_skipped += n_bad
                    if unreadable:
                        progress.skipped_steps += 1
                        progress.epoch_unread_steps += 1
                        window.add(None)
                        log.say(f"step {progress.step + 1}: skipped by every process (a whole batch was unreadable)")
                    else:
                        training.set_lr(optimizer, learning_rate(cfg, progress.step, steps_per_epoch))
                        # images: N x (1+M) x 3 x H x W on the device (DeviceLoader: copied, and augmented if gpu)
                        gen = step_generator(cfg.train.seed, progress.step)
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            model.momentum_update()
                            q = model.encode_queries(images[:, 0], encoder_q)  # N x D
                            keys = model.encode_keys(images[:, 1:], gen)  # N x M x D
                            negatives = model.negatives(keys, gen)  # K x D, or N x K x D without a queue
                            out = loss_fn(q, keys, negatives)
                        if run.backward_step(out.loss, optimizer, scaler):
                            model.enqueue(keys)
                        else:  # train.nonfinite=skip
                            progress.skipped_steps += 1
                        window.add(out)
                    run.step_done()
                    log.advance()

                    epoch_done = progress.step_in_epoch == steps_per_epoch
                    if progress.step % cfg.train.log_every == 0 or epoch_done or progress.step == stop_at:
                        run.check_finite()
                        loss, terms = window.flush(progress)  # the host sync of a log step
                        seconds, steps = run.tick()
                        ips = steps * batch / max(seconds, 1e-9)
                        lr = learning_rate(cfg, progress.step - 1, steps_per_epoch)
                        eta = (stop_at - progress.step) * batch / max(ips, 1e-9)
                        log.row({"step": progress.step, "epoch": epoch, "loss": loss, "lr": lr, "img_per_s": ips,
                                 **terms, **loss_fn.scheduled()},
                                f"epoch {epoch + 1}/{cfg.train.epochs} step {progress.step}/{stop_at} loss {loss:.4f} "
                                f"lr {lr:.4g} {ips:.1f} img/s eta {_fmt_eta(eta)}")
                    if epoch_done:  # the epoch's summary, the kNN monitor, then its checkpoint (a kill loses neither)
                        _end_epoch(cfg, progress, run, log, env, folder, steps_per_epoch)
                        if cfg.monitor.knn_every and progress.epoch % cfg.monitor.knn_every == 0:
                            _knn_monitor(cfg, model, folder, knn_val, progress, log, env)
                            run.restart_clock()  # the monitor's time is not training time
                    if epoch_done or (cfg.train.ckpt_every and progress.step % cfg.train.ckpt_every == 0):
                        run.save()
                        keep = cfg.train.keep_every
                        if epoch_done and keep and progress.epoch % keep == 0 and env.is_main:
                            keep_checkpoint(run.ckpt_path, progress.epoch - 1)
                    if progress.step >= stop_at:
                        break
            if run.saved_at != progress.step:  # stopped mid-epoch by train.max_steps
                run.save()
            metrics = _summary(progress, cfg, stop_at, total_steps,
                               progress.skipped_images + _skipped_in_epoch(progress, env), env.restart)
            record.metrics.update(metrics)
            record.outputs.update({"checkpoint": CHECKPOINT, "metrics": METRICS, "tensorboard": "tb",
                                   "config": "config.yaml", "log": LOG})
    finally:
        log.close()
    D.barrier()
    log.say(f"done: loss {metrics['loss_first_fifth']:.4f} (first fifth of the steps) -> "
            f"{metrics['loss_last_fifth']:.4f} (last fifth), {metrics['img_per_s']:.1f} img/s, "
            f"{metrics['skipped_images']} unreadable image(s) -> {run.ckpt_path}")
    return TrainResult(metrics, model)


def _check(ckpt: dict, cfg: PretrainConfig, run: TrainingRun) -> None:
    if "progress" not in ckpt or "config" not in ckpt:
        raise UserError(f"{run.ckpt_path} is not a ctbench pretraining checkpoint; use another --out, or --fresh")
    training.refuse_other_config(run.ckpt_path, config_differences(ckpt["config"], cfg), run.new_run)


def _restore(ckpt: dict, model: ContrastiveModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             stop_at: int, path: Path) -> None:
    model.load_state_dict(ckpt["state_dict"])
    if "optimizer" in ckpt or int(ckpt["step"]) < stop_at:  # a complete run may lack it (keep_optimizer)
        if "optimizer" not in ckpt:
            raise UserError(f"{path} has no optimizer state ({ckpt.get('optimizer_dropped', 'dropped')}), so its "
                            f"run cannot be trained on to step {stop_at}: pass --fresh (start over in this "
                            "directory) or --name (a new run)")
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])


def _end_epoch(cfg: PretrainConfig, progress: Progress, run: TrainingRun, log: RunLog, env: D.DistEnv,
               folder: ImageFolder, steps_per_epoch: int) -> None:
    """The epoch's unreadable-image count (all processes) and summary row; the epoch counter moves on."""
    epoch = progress.epoch
    if progress.epoch_unread_steps == steps_per_epoch:
        raise UserError(f"every step of epoch {epoch} had a batch with no readable image; check the files under "
                        f"{folder.root}")
    progress.epoch_unread_steps = 0
    epoch_bad = _skipped_in_epoch(progress, env)
    progress.skipped_images += epoch_bad
    progress.epoch_skipped = 0
    recent = [v for v in progress.losses[-steps_per_epoch:] if math.isfinite(v)]
    mean_loss = float(np.mean(recent)) if recent else float("nan")
    log.row({"step": progress.step, "epoch": epoch, "epoch_end": epoch + 1, "loss_epoch": mean_loss,
             "skipped_images": epoch_bad},
            f"epoch {epoch + 1}/{cfg.train.epochs} done: mean loss {mean_loss:.4f}, {epoch_bad} unreadable image(s) "
            "skipped", force_print=True)
    run.end_epoch()


def _knn_val_dir(cfg: PretrainConfig) -> Path | None:
    """The kNN monitor's val folder (``monitor.knn_val``, default ``<data>/../val``), checked before training."""
    if not cfg.monitor.knn_every:
        return None
    val = Path(cfg.monitor.knn_val) if cfg.monitor.knn_val else Path(cfg.data.path).parent / "val"
    if not val.is_dir():
        raise UserError(f"monitor.knn_every = {cfg.monitor.knn_every} but the kNN val folder {val} does not exist; "
                        "set monitor.knn_val=DIR (ImageNet layout) or monitor.knn_every=0")
    return val


def _knn_monitor(cfg: PretrainConfig, model: ContrastiveModel, folder: ImageFolder, val: Path, progress: Progress,
                 log: RunLog, env: D.DistEnv) -> None:
    """kNN top-1 of the query backbone at an epoch end, or at step 0 before training (every rank encodes its share;
    same value on all). The step-0 value is a row of metrics.jsonl (epoch -1), not the record's ``knn_top1``."""
    D.broadcast_buffers(model)  # every rank evaluates rank 0's BN statistics, the ones the checkpoint keeps
    t0 = time.time()
    acc = knn_top1(model.encoder_q, folder.root, val, image_size=cfg.data.image_size, k=cfg.monitor.knn_k,
                   t=cfg.monitor.knn_t, max_train=cfg.monitor.knn_max_train or None, device=env.device,
                   workers=cfg.data.workers, seed=cfg.train.seed)
    if progress.step:
        progress.knn_top1, progress.knn_epoch = acc, progress.epoch
    when = f"epoch {progress.epoch}/{cfg.train.epochs}" if progress.step else "step 0 (initialisation)"
    log.row({"step": progress.step, "epoch": progress.epoch - 1, "knn_top1": acc},
            f"{when} kNN top-1 {acc:.2f} % (k {cfg.monitor.knn_k}, t {cfg.monitor.knn_t:g}, {time.time() - t0:.0f} s)",
            force_print=True)


@torch.no_grad()
def _fill_queue(model: ContrastiveModel, pipeline: Pipeline, cfg: PretrainConfig, env: D.DistEnv,
                local_batch: int, amp_dtype: torch.dtype | None) -> None:
    """``model.queue_init=keys``: fill the queue with the keys of K random training images before step 0.

    MoCo starts from random unit vectors, which are easy negatives while the queue fills (the first K / batch
    steps): the loss starts low, rises as real keys arrive, and in a short (toy) schedule never comes back. Keys of
    real images remove that artefact. The images and their augmentations are seeded, so a run is reproducible."""
    k = cfg.model.queue_size
    dataset = pipeline.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.train.seed))
    positions = [p % len(dataset) for p in range(k)]
    mine = positions[env.rank::env.world_size]  # each rank encodes its share; enqueue gathers them in rank order
    batches = [[(int(order[p]), sample_seed(cfg.train.seed, QUEUE_FILL_EPOCH, p)) for p in mine[i:i + local_batch]]
               for i in range(0, len(mine), local_batch)]
    loader = pipeline.loader(batches, cfg, env.device, amp_dtype or torch.float32)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model.train()
    for images, _, _ in loader:
        if D.any_true_host(images is None):  # every rank stops together
            raise UserError(f"every image of a batch was unreadable while filling the queue; check {cfg.data.path}")
        with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model.enqueue(model.encode_keys(images[:, 1:2], gen))


def _summary(progress: Progress, cfg: PretrainConfig, stop_at: int, total_steps: int, skipped_images: int,
             restart: int = 0) -> dict:
    losses = [v for v in progress.losses if math.isfinite(v)]  # skipped non-finite steps are counted apart
    fifth = max(len(losses) // 5, 1)
    first = float(np.mean(losses[:fifth])) if losses else float("nan")
    last = float(np.mean(losses[-fifth:])) if losses else float("nan")
    images = progress.step * cfg.train.batch_size
    return {
        "loss_final": float(np.mean(losses[-cfg.train.log_every:])) if losses else float("nan"),
        "loss_first_fifth": first, "loss_last_fifth": last, "loss_fell": bool(last < first),
        "steps": progress.step, "epochs": progress.step / (total_steps / cfg.train.epochs),
        "complete": progress.step >= total_steps, "images_seen": images,
        "img_per_s": images / max(progress.train_time_s, 1e-9), "train_time_s": progress.train_time_s,
        "skipped_images": skipped_images, "skipped_steps": progress.skipped_steps,
        **({"knn_top1": progress.knn_top1, "knn_epoch": progress.knn_epoch} if progress.knn_top1 is not None else {}),
        **training.interruption_metrics(progress.resumes, restart),
    }
