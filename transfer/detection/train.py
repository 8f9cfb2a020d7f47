"""One transfer run inside each detectron2 worker: its trials (seeds), training, evaluation and run records.

Records (written by rank 0; see ``transfer/README.md``):

- one trial (the default): ``<out>/record.json`` with ``trial: 0``, ``trials: 1``, ``seed``;
- ``--trials T``: ``<out>/trial<i>/record.json`` per trial (``trial: i``, ``seed``) and the summary
  ``<out>/record.json`` with ``trial: null``, ``trials: T``, the mean of every metric under its own name, the
  sample standard deviation as ``<metric>_std`` and the per-trial values in ``per_trial``.

Every record carries ``protocol`` (``recipe``: the original config the task follows, with its source;
``deviations``: how this run departs from it, in the order they apply: toy scale, command-line overrides, processes
vs MoCo's 8 GPUs, CPU, BN swaps, linear scaling, an evaluation subset, eval only; see ``transfer/README.md``) and
``schedule`` (``24k``, ``1x``, ``2x``: the task's, as written).

A CUDA out-of-memory error in training ends the run with one line naming ``--linear-scaling`` (or what else would
fit) instead of a traceback; detectron2's train loop logs it as one line too.

Metrics are detectron2's evaluation results flattened as ``<type>/<metric>`` (``bbox/AP``, ``bbox/AP50``,
``segm/AP``, ``keypoints/AP``, per-class ``bbox/AP-person`` ...; segmentation ``sem_seg/mIoU``, ``sem_seg/fwIoU``,
``sem_seg/mACC``, ``sem_seg/pACC``, ``sem_seg/IoU-<class>``, ``sem_seg/ACC-<class>``), plus ``iters``, ``train_s``,
``s_per_iter``, ``eval_s`` and ``eval_images``. A metric that cannot be computed (COCO: no detections, no instance
of a class; segmentation: a class absent from the evaluated ground truth) is ``null``.

The dataset fingerprint is computed once per run directory (cached in ``<out>``), not once per trial.

A rerun in the same directory (``--out``, or the default ``<task>/<run>``) never deletes results silently: with the
same config, weights and protocol it keeps the trials that are there and runs only the missing ones (``--trials 5``
after ``--trials 2`` adds three; a plain rerun after ``--trials 2`` keeps both and their summary), the summary
covering every trial present; with anything else it is a one-line error (``--fresh`` replaces the old results,
``--name`` / ``--out`` start a new run). See :func:`previous_trials`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ctbench import atomic
from ctbench.config import flatten as flat_config
from ctbench.errors import UserError
from ctbench.records import RECORD_NAME, RunRecord, load_record
from transfer.detection import data
from transfer.detection.evaluation import build_evaluator
from transfer.detection.sem_seg import SemSegDatasetMapper, is_sem_seg
from transfer.detection.weights import Weights

log = logging.getLogger("transfer.detection")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer (``tools/train_net.py``) with our evaluators, an optional test-image subset,
    DDP on CPU (gloo), a one-line model summary in the log, no final checkpoint when ``save_model`` is off, and
    :class:`SemSegDatasetMapper` (train and test) for a ``SemanticSegmentor``."""

    eval_images: ClassVar[int] = 0  # 0 = the whole test set
    coco_impl: ClassVar[str] = "faster"
    save_model: ClassVar[bool] = True
    last_results: ClassVar[dict] = {}
    last_eval_s: ClassVar[float] = 0.0

    def __init__(self, cfg: CfgNode):  # DefaultTrainer.__init__, except DDP without device_ids on CPU
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        found = super().build_hooks()
        if not self.save_model:
            found = [h for h in found if not isinstance(h, hooks.PeriodicCheckpointer)]
        return found

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        head = cfg.MODEL.SEM_SEG_HEAD.NAME if is_sem_seg(cfg) else cfg.MODEL.ROI_HEADS.NAME
        log.info(f"model: {cfg.MODEL.META_ARCHITECTURE} ({type(model.backbone).__name__} backbone, "
                 f"{head}), {n / 1e6:.1f} M parameters, on {cfg.MODEL.DEVICE}")
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        if is_sem_seg(cfg):
            return build_detection_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True))
        return super().build_train_loader(cfg)

    @classmethod
    def test_dicts(cls, dataset_name: str) -> list[dict]:
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        return dicts[: cls.eval_images] if cls.eval_images else dicts

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        sem_seg = is_sem_seg(cfg)
        if not cls.eval_images and not sem_seg:
            return super().build_test_loader(cfg, dataset_name)
        mapper = SemSegDatasetMapper(cfg, False) if sem_seg else DatasetMapper(cfg, False)
        return build_detection_test_loader(cls.test_dicts(dataset_name), mapper=mapper,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        ids = [d["image_id"] for d in cls.test_dicts(dataset_name)] if cls.eval_images else None
        out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, out, coco_impl=cls.coco_impl, img_ids=ids)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        t0 = time.perf_counter()
        results = super().test(cfg, model, evaluators)
        cls.last_eval_s = time.perf_counter() - t0
        cls.last_results = dict(results)
        return results


@dataclass
class RunSpec:
    """Everything a worker needs; built and checked by the launcher before ``launch``."""

    task: str
    cfg: CfgNode  # adapted to the world size; MODEL.WEIGHTS set
    weights: Weights
    out: Path
    data_root: Path
    toy: bool
    trials: int = 1
    seed: int = 0
    eval_only: bool = False
    resume: bool = False
    eval_images: int = 0
    coco_impl: str = "faster"
    save_model: bool = True
    notes: list[str] = field(default_factory=list)
    recipe: str = ""  # the record's protocol.recipe
    schedule: str = ""  # the task's schedule as written: 24k, 1x, 2x
    deviations: list[str] = field(default_factory=list)  # the record's protocol.deviations
    oom_message: str = "CUDA out of memory"  # what a CUDA out-of-memory error in training becomes (one line)
    done: dict = field(default_factory=dict)  # trial index -> its record, from an earlier run in ``out`` (kept)


def flatten(results: Mapping, prefix: str = "") -> dict[str, float | None]:
    """``{"bbox": {"AP": 1.0}}`` -> ``{"bbox/AP": 1.0}``; NaN -> None (JSON has no NaN)."""
    out: dict[str, float | None] = {}
    for k, v in results.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = None if math.isnan(float(v)) else float(v)
    return out


def summarize(per_trial: list[dict[str, float | None]]) -> tuple[dict, dict]:
    """Mean (under the metric's name) and sample std (``<name>_std``) of each metric over the trials."""
    metrics: dict[str, float | None] = {}
    values: dict[str, list] = {}
    for key in per_trial[0]:
        vals = [m.get(key) for m in per_trial]
        values[key] = vals
        nums = [v for v in vals if v is not None]
        metrics[key] = statistics.fmean(nums) if nums else None
        metrics[f"{key}_std"] = statistics.stdev(nums) if len(nums) > 1 else None
    return metrics, values


# Metrics of a trial record that are timings and counts, not results (left out of a summary's mean).
RUN_METRICS = ("iters", "train_s", "eval_s", "s_per_iter", "eval_images")
# Config entries that differ between the trials of one run.
_PER_TRIAL_KEYS = ("SEED", "OUTPUT_DIR")


def _run_config(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if k not in _PER_TRIAL_KEYS}


def previous_trials(spec: RunSpec, fresh: bool = False) -> dict[int, dict]:
    """The trial records an earlier run left in ``spec.out`` (trial index -> record), checked to be trials of this
    very run: same config (up to the seed), weights, protocol and eval-only flag. Anything else is a one-line error
    telling the user to pass ``--fresh`` (which removes them: an empty result) or a new ``--name`` / ``--out``."""
    import shutil

    flat = spec.out / RECORD_NAME
    found: list[tuple[Path, dict]] = []
    for p in [flat, *sorted(spec.out.glob(f"trial*/{RECORD_NAME}"))]:
        if p.is_file():
            rec = load_record(p)
            if rec.get("trial") is not None:  # a summary (trial null) is rebuilt from the trials
                found.append((p, rec))
    if fresh:
        for p in [flat, spec.out / "metrics.json", spec.out / "model_final.pth", spec.out / "config.yaml"]:
            p.unlink(missing_ok=True)
        for d in spec.out.glob("trial*"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(spec.out / "inference", ignore_errors=True)
        return {}
    current = _run_config(yaml.safe_load(spec.cfg.dump()))
    protocol = {"recipe": spec.recipe, "deviations": list(spec.deviations)}
    done: dict[int, dict] = {}
    for p, rec in found:
        old = flat_config(_run_config(rec.get("config") or {}))
        now = flat_config(current)
        why = [f"{k} {old.get(k)} -> {now.get(k)}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
        old_weights = (rec.get("weights") or {}).get("path")
        if old_weights != spec.weights.path:
            why.append(f"weights {old_weights or 'random'} -> {spec.weights.path or 'random'}")
        if rec.get("protocol") != protocol:
            why.append("protocol")
        if bool(rec.get("eval_only")) != spec.eval_only:
            why.append("eval only")
        trial = int(rec.get("trial") or 0)
        if rec.get("seed") != spec.seed + trial:
            why.append(f"seed of trial {trial} {rec.get('seed')} -> {spec.seed + trial}")
        if why:
            raise UserError(f"{p} is the result of another run ({', '.join(why[:4])}{' ...' if len(why) > 4 else ''}"
                            f" differ); pass --fresh to replace it, or --name / --out for a new run")
        done[trial] = rec
    return done


def _trial_dir(spec: RunSpec, trial: int, multi: bool) -> Path:
    return spec.out / f"trial{trial}" if multi else spec.out


def _move_flat_trial(spec: RunSpec, rec: dict) -> dict:
    """A single-trial run (its record and outputs in ``out/``) becomes ``out/trial0/`` when trials are added."""
    dest = spec.out / "trial0"
    dest.mkdir(parents=True, exist_ok=True)
    outputs = dict(rec.get("outputs") or {})
    for key, rel in list(outputs.items()):
        if key == "log" or not isinstance(rel, str):
            continue
        src = spec.out / rel
        if src.exists():
            src.rename(dest / rel)
    inference = spec.out / "inference"
    if inference.is_dir():
        inference.rename(dest / "inference")
    outputs["log"] = os.path.relpath(spec.out / "log.txt", dest)
    rec = {k: v for k, v in rec.items() if k != "_path"}
    rec["outputs"] = outputs
    atomic.write_json(dest / RECORD_NAME, rec)
    (spec.out / RECORD_NAME).unlink(missing_ok=True)
    return rec


def run(spec: RunSpec) -> None:
    """Entry point of every worker (``detectron2.engine.launch`` calls it once per process)."""
    # torch.fx warns once per process that is_fx_tracing covers torch.export too (detectron2's layers ask it)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    data.register(list(spec.cfg.DATASETS.TRAIN) + list(spec.cfg.DATASETS.TEST), spec.data_root)
    main = comm.is_main_process()
    rank = comm.get_rank()
    present = sorted(set(spec.done) | set(range(spec.trials)))
    multi = len(present) > 1
    spec.trials = len(present)  # the run's trials: the kept ones and the new
    if main:
        spec.out.mkdir(parents=True, exist_ok=True)
        if multi and 0 in spec.done and (spec.out / RECORD_NAME).is_file() \
                and load_record(spec.out / RECORD_NAME).get("trial") == 0:
            spec.done[0] = _move_flat_trial(spec, spec.done[0])
    comm.synchronize()
    with _logging(spec.out, rank):
        for note in spec.notes:
            log.info(note)
        Trainer.eval_images, Trainer.coco_impl, Trainer.save_model = spec.eval_images, spec.coco_impl, spec.save_model
        todo = [t for t in present if t not in spec.done]
        if spec.done:
            log.info(f"kept {len(spec.done)} trial(s) of an earlier run with this config in {spec.out} (trial "
                     f"{', '.join(map(str, sorted(spec.done)))}); running {len(todo)} more")
        per_trial = {t: {k: v for k, v in (rec.get("metrics") or {}).items() if k not in RUN_METRICS}
                     for t, rec in spec.done.items()}
        for trial in todo:
            seed = spec.seed + trial
            trial_dir = _trial_dir(spec, trial, multi)
            if multi:
                log.info(f"trial {trial + 1}/{len(present)} (seed {seed}) -> {trial_dir}")
            per_trial[trial] = run_trial(spec, trial, seed, trial_dir)
        if main and multi and (todo or not (spec.out / RECORD_NAME).is_file()):
            _summary(spec, [per_trial[t] for t in present], present)


def _summary(spec: RunSpec, per_trial: list[dict], trials: list[int]) -> None:
    metrics, values = summarize(per_trial)
    with _record(spec, spec.out, seed=None) as rec:
        rec.metrics.update(metrics)
        rec.data.update(trial=None, trials=len(trials), seeds=[spec.seed + t for t in trials], per_trial=values)
        rec.outputs.update(trials=[f"trial{t}/{RECORD_NAME}" for t in trials], log="log.txt")
    _report(spec, metrics, spec.out, f"mean of {len(trials)} trials")


@contextlib.contextmanager
def _logging(out: Path, rank: int):
    """detectron2's loggers to ``out/log.txt`` (+ stdout on rank 0) for this run only: the handlers added here are
    removed at the end, so runs in one process (tests, the demo) do not write into each other's logs."""
    names = ("fvcore", "detectron2", "transfer")
    before = {n: set(logging.getLogger(n).handlers) for n in names}
    setup_logger.cache_clear()
    for n in names:
        setup_logger(str(out), distributed_rank=rank, name=n)
    try:
        yield
    finally:
        for n in names:
            lg = logging.getLogger(n)
            for h in set(lg.handlers) - before[n]:
                lg.removeHandler(h)
                h.close()
        setup_logger.cache_clear()


def run_trial(spec: RunSpec, trial: int, seed: int, trial_dir: Path) -> dict[str, float | None]:
    cfg = spec.cfg.clone()
    cfg.defrost()
    cfg.SEED = seed
    cfg.OUTPUT_DIR = str(trial_dir)
    cfg.freeze()
    seed_all_rng(seed + comm.get_rank())
    main = comm.is_main_process()
    if main:
        atomic.write_text(trial_dir / "config.yaml", cfg.dump())
    ctx = _record(spec, trial_dir, seed=seed) if main else contextlib.nullcontext()
    with ctx as rec:
        t0 = time.perf_counter()
        Trainer.last_results, Trainer.last_eval_s = {}, 0.0
        if spec.eval_only:
            model = Trainer.build_model(cfg)
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
            Trainer.test(cfg, model)
            iters = 0
        else:
            with cuda_oom_as_user_error(spec.oom_message):
                trainer = Trainer(cfg)
                last = trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else None
                trainer.resume_or_load(resume=spec.resume)
                if spec.resume and last:
                    log.info(f"resuming at iteration {trainer.start_iter} of {trainer.max_iter} from {last}")
                elif spec.resume:
                    log.info(f"starting fresh: no checkpoint in {trial_dir} to resume from (detectron2 writes one "
                             f"every SOLVER.CHECKPOINT_PERIOD = {cfg.SOLVER.CHECKPOINT_PERIOD} iterations"
                             f"{'' if spec.save_model else ' with --save-model'})")
                elif last:
                    log.info(f"starting fresh at iteration 0: {last} is left from an unfinished run (--resume "
                             "continues from it)")
                trainer.train()
            iters = trainer.max_iter - trainer.start_iter
        total = time.perf_counter() - t0
        metrics = flatten(Trainer.last_results)
        if main:
            train_s = total - Trainer.last_eval_s
            rec.metrics.update(metrics)
            rec.metrics.update(iters=iters, train_s=round(train_s, 3), eval_s=round(Trainer.last_eval_s, 3),
                               s_per_iter=round(train_s / iters, 4) if iters else None,
                               eval_images=_eval_images(cfg))
            rec.data.update(trial=trial, trials=spec.trials)
            if not spec.eval_only and trainer.start_iter:
                rec.data["resumed_at_iter"] = trainer.start_iter
            rec.outputs.update(config="config.yaml", log=os.path.relpath(spec.out / "log.txt", trial_dir))
            if not spec.eval_only:
                rec.outputs["metrics"] = "metrics.json"
            if not spec.eval_only and spec.save_model:
                rec.outputs["model"] = "model_final.pth"
    if main:
        _report(spec, metrics, trial_dir, f"trial {trial}" if spec.trials > 1 else "")
    return metrics


@contextlib.contextmanager
def _record(spec: RunSpec, out: Path, seed: int | None):
    cfg = yaml.safe_load(spec.cfg.dump())
    test = list(spec.cfg.DATASETS.TEST)
    with RunRecord("transfer", spec.weights.name, out, config=cfg, dataset=data.dataset_dir(test[0], spec.data_root),
                   seed=seed, inputs=spec.weights.inputs(), task=spec.task, fingerprint_cache=spec.out) as rec:
        rec.data.update(
            trial=0, trials=spec.trials, eval_only=spec.eval_only, toy=spec.toy,
            weights={"spec": spec.weights.spec, "path": spec.weights.path, "kind": spec.weights.kind},
            datasets={"root": str(spec.data_root), "train": list(spec.cfg.DATASETS.TRAIN), "test": test},
            notes=list(spec.notes), schedule=spec.schedule,
            protocol={"recipe": spec.recipe, "deviations": list(spec.deviations)})
        yield rec


class _OneLineOom(logging.Filter):
    """detectron2's train loop logs any exception with its traceback ("Exception during training:"); for a CUDA
    out-of-memory error keep the message's first line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], torch.cuda.OutOfMemoryError):
            record.msg = f"{record.getMessage()} {str(record.exc_info[1]).splitlines()[0]}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def cuda_oom_as_user_error(message: str):
    """``torch.cuda.OutOfMemoryError`` inside -> :class:`UserError` ``message`` (one line, no traceback)."""
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    one_line = _OneLineOom()
    train_loop.addFilter(one_line)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(message) from None
    finally:
        train_loop.removeFilter(one_line)


def _eval_images(cfg: CfgNode) -> int:
    return sum(len(Trainer.test_dicts(name)) for name in cfg.DATASETS.TEST)


HEADLINE_METRICS = ("AP", "AP50", "AP75", "mIoU", "fwIoU", "mACC", "pACC")  # what the end-of-run log line shows


def _report(spec: RunSpec, metrics: dict, where: Path, what: str) -> None:
    keys = [k for k in metrics if k.count("/") == 1 and k.split("/")[1] in HEADLINE_METRICS]
    shown = ", ".join(f"{k} {metrics[k]:.2f}" if metrics[k] is not None else f"{k} n/a" for k in keys)
    log.info(f"{spec.task} {spec.weights.name} {what}: {shown or 'no metric (see the log)'}; "
             f"record: {where / RECORD_NAME}")
