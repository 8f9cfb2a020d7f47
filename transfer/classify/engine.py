"""The training loop of the classification evaluations: build -> resume -> for each epoch: lr, steps, check,
evaluate, checkpoint -> metrics. One explicit loop; what differs between the linear probe and fine-tuning lives in
a :class:`Task` whose methods the loop calls by name.

Per step: ``loss = Σ CE(logits, y) x W / B_global`` on each of the ``W`` processes, so that DDP's gradient average
equals the mean over the global batch exactly, whatever ``W`` and however the images fall on the processes; the lr
is ``optim.lr x batch / optim.lr_batch`` times ``optim.gamma`` per milestone passed (MoCo main_lincls'
``adjust_learning_rate``; fine-tuning multiplies the classifier's lr by ``optim.head_lr_mult``).

Files in the run directory (rank 0 writes, atomically):

- ``checkpoint.pth.tar``: the trained module, optimizer, counters, RNG and data-order state, resolved config; written
  every ``train.ckpt_epochs`` epochs and after the last (and every ``train.ckpt_every`` steps); a run started again
  in the same directory resumes from it and produces the same numbers as an uninterrupted run;
- ``checkpoint_%04d.pth.tar`` (0-based epoch, as MoCo's main_moco.py): the checkpoint of every
  ``train.keep_every``-th epoch end, kept (a hard link when the file system allows it; 0 = none, the default);
- ``metrics.jsonl``: a line per epoch (loss, lr, time, val top-1/top-5 when evaluated), the same in ``tb/``;
- ``log.txt``: what the run prints (rank 0), each line with its time, appended to on resume (:func:`text_log`);
- ``.last_step``: the last step rank 0 finished, rewritten in place each step (to count the steps a resume redoes);
- ``record.json``: the run record (written by the caller's :class:`results.records.RunRecord`).

Stopping and resuming (as pretraining, :mod:`pretrain.engine`): SIGINT / SIGTERM / SIGUSR1 stop the run at the next
step boundary, the same on every process, after the checkpoint of that step; a run says "resuming at step N" (and
the steps it redoes) or "starting fresh: ..."; the metrics count the resumes, the steps redone and torchrun's
restarts. A peer process that died (a killed rank under ``torchrun --max-restarts``) is one line, not a traceback.

Reporting (MoCo main_lincls): the val set is evaluated every ``train.eval_every`` epochs and after the last; the
metrics hold the last evaluation's ``top1`` / ``top5`` and ``best_acc1``, the best top-1 of all evaluations, with
``best_epoch`` (1-based, the first epoch that reached it: main_lincls keeps a new best only when it is higher).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import ctbench
from ctbench import atomic
from ctbench import distributed as D
from ctbench.checkpoints import read_checkpoint
from ctbench.config import to_dict
from ctbench.errors import UserError
from ctbench.records import RECORD_NAME, jsonl_row, load_record
from pretrain.engine import StepMark, interruption_metrics, read_last_step, rng_state, set_rng_state, start_line
from transfer.classify.config import config_differences
from transfer.classify.data import EpochSampler

CHECKPOINT = "checkpoint.pth.tar"
KEPT = "checkpoint_{:04d}.pth.tar"
METRICS = "metrics.jsonl"
LOG = "log.txt"


class Task:
    """What the loop trains. Subclasses set the attributes in ``__init__`` and implement the methods."""

    module: nn.Module  # what is trained and checkpointed (unwrapped)
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    lr_mults: list[float]  # per optimizer param group

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This process's share of the sampler's current epoch: ``(inputs, targets, n_unreadable)`` per step."""
        raise NotImplementedError

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Forward with gradient through the (DDP-wrapped) trained module: ``B x classes``."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Top-1 / top-5 (percent) on the full val set, identical on every process."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Set train/eval modes for the training steps (after an evaluation too): the trained module in train mode."""
        self.module.train()

    def after_epoch(self) -> None:
        """Checks at an epoch end (the linear probe: the backbone stayed frozen)."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0
    # Partial sums of the current epoch: this process's since the last save; at a save they are replaced by the
    # all-process sums on rank 0 (zero elsewhere), so an epoch-end all-reduce gives the totals after a resume too.
    loss_sum: float = 0.0  # CE summed over the images
    loss_count: int = 0  # images
    bad: int = 0  # unreadable images skipped
    unreadable: int = 0  # unreadable train images skipped in finished epochs (all processes)
    train_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    resumes: list[dict] = field(default_factory=list)  # one per resume: at_step, redone, restart (not compared)


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default (``train.precision``), none on CPU."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def learning_rate(cfg, epoch: int) -> float:
    """Base lr of ``epoch`` (before a param group's multiplier)."""
    base = cfg.optim.lr * cfg.train.batch_size / cfg.optim.lr_batch
    return base * cfg.optim.gamma ** sum(epoch >= m for m in cfg.optim.milestones)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k: ``len(ks)`` (float64)."""
    if logits.shape[0] == 0:
        return torch.zeros(len(ks), dtype=torch.float64)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # B x kmax
    hit = top == targets.view(-1, 1)  # B x kmax
    return torch.stack([hit[:, :k].any(1).sum() for k in ks]).double().cpu()


def all_reduce_sum(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a small CPU tensor over processes (identity on one process)."""
    if D.world_size() == 1:
        return x
    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


def accuracy(counts: torch.Tensor) -> dict:
    """``counts`` = (correct@1, correct@5, n) -> ``{"top1", "top5", "val_images"}`` (percent)."""
    n = float(counts[2])
    if n == 0:
        raise UserError("no readable val image: the val folder is empty or every file is unreadable")
    return {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n, "val_images": int(n)}


def checkpoint_dict(cfg, task: Task, progress: Progress, extra: dict, rng: dict | None = None) -> dict:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in task.module.state_dict().items()},
        "optimizer": task.optimizer.state_dict(),
        "epoch": progress.epoch, "step": progress.step,
        "progress": {k: getattr(progress, k) for k in ("step_in_epoch", "loss_sum", "loss_count", "bad", "unreadable",
                                                       "train_time_s", "history")},
        "rng": {**(rng or rng_state()), "data": {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
                                        "seed": cfg.train.seed}},
        "config": to_dict(cfg), "protocol": cfg.protocol,
        "ctbench": {"version": ctbench.__version__, "protocol": cfg.protocol},
        "interruptions": {"resumes": progress.resumes}, **extra,
    }


def _check_same_run(path: Path, ckpt: dict, cfg, identity: dict) -> None:
    if ckpt.get("protocol") != cfg.protocol or "progress" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of a {cfg.protocol} run; use another --out, or --fresh")
    diffs = config_differences(ckpt["config"], cfg)
    if diffs:
        raise UserError(f"{path} was written with another config ({'; '.join(diffs[:3])}); resume with the same "
                        "settings, or pass --fresh (start over in this directory) or --out (a new run)")
    if ckpt.get("identity") != identity:
        raise UserError(f"{path} was written for another backbone or subset ({ckpt.get('identity')} vs {identity}); "
                        "pass --fresh (start over in this directory) or --out (a new run)")


def finished(out_dir: Path, cfg, identity: dict) -> dict | None:
    """The record of a run in ``out_dir`` that already finished with this config and backbone (else None)."""
    path, rec = out_dir / CHECKPOINT, out_dir / RECORD_NAME
    if not (path.is_file() and rec.is_file()):
        return None
    ckpt = read_checkpoint(path)
    _check_same_run(path, ckpt, cfg, identity)
    if int(ckpt["epoch"]) < cfg.train.epochs:
        return None
    return load_record(rec)


def resume(path: Path, cfg, task: Task, steps_per_epoch: int, identity: dict) -> Progress:
    ckpt = read_checkpoint(path)
    _check_same_run(path, ckpt, cfg, identity)
    try:
        task.module.load_state_dict(ckpt["state_dict"])
        task.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        p = ckpt["progress"]
        progress = Progress(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]), **p,
                            resumes=list(ckpt.get("interruptions", {}).get("resumes", [])))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        what = f"missing entry {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path}: cannot resume from this checkpoint ({what}); it is damaged or from another "
                        "version: pass --fresh (start over in this directory) or --out (a new run)") from e
    if progress.epoch * steps_per_epoch + progress.step_in_epoch != progress.step:
        raise UserError(f"{path}: step {progress.step} does not match epoch {progress.epoch} with {steps_per_epoch} "
                        "steps per epoch (did the data or the batch size change?); use --fresh")
    return progress


class _TimedTee(io.TextIOBase):
    """A text stream that writes through to ``stream`` and appends every complete line to ``path`` with its time."""

    def __init__(self, stream, path: Path):
        super().__init__()
        self.stream, self.path, self.pending = stream, path, ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.pending += s
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            self.append(lines)
        return len(s)

    def append(self, lines: list[str]) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(f"[{stamp}] {ln}\n" for ln in lines)

    def finish(self) -> None:
        """Keep a last line printed without its newline."""
        if self.pending:
            self.append([self.pending])
            self.pending = ""

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def text_log(out_dir: Path, enabled: bool):
    """While active, everything printed to stdout is also appended to ``out_dir/log.txt`` with its time (rank 0:
    ``enabled``), after a line with the command; a failure appends its message. Appended to on resume."""
    if not enabled:
        yield
        return
    tee = _TimedTee(sys.stdout, out_dir / LOG)
    tee.append([f"$ {shlex.join(sys.orig_argv)} (pid {os.getpid()})"])
    try:
        with contextlib.redirect_stdout(tee):
            yield
    except BaseException as e:
        tee.finish()
        lines = str(e).strip().splitlines()
        tee.append([f"failed: {type(e).__name__}" + (f": {lines[0]}" if lines else "")])
        raise
    tee.finish()


def keep_checkpoint(ckpt_path: Path, epoch: int) -> Path:
    """Keep the current checkpoint as ``checkpoint_<epoch>.pth.tar`` (``epoch`` 0-based): a hard link, or a copy where
    the file system has none; atomic (written beside, then renamed)."""
    kept = ckpt_path.with_name(KEPT.format(epoch))
    tmp = kept.with_name(f".tmp-{kept.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, kept)
    return kept


def best_of(history: list[dict]) -> dict:
    """``best_acc1`` (the highest val top-1 over the evaluated epochs) and ``best_epoch`` (1-based, the first that
    reached it, as main_lincls' ``acc1 > best_acc1``); empty without an evaluation."""
    best: dict = {}
    for row in history:
        if "top1" in row and ("best_acc1" not in best or row["top1"] > best["best_acc1"]):
            best = {"best_acc1": row["top1"], "best_epoch": row["epoch"] + 1}
    return best


class Logger:
    """metrics.jsonl + TensorBoard scalars per epoch (``tb/``) + a tqdm bar (or a progress line every 10 s when
    stderr is not a terminal); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, total: int, initial: int, desc: str, keep_epochs: int):
        self.enabled = enabled
        self.path = out_dir / METRICS
        self.bar = None
        self._last = time.time()
        if not enabled:
            return
        rows = []
        if self.path.exists():  # drop lines of epochs the checkpoint does not cover (they are redone)
            rows = [ln for ln in self.path.read_text().splitlines()
                    if jsonl_row(ln).get("epoch", keep_epochs) < keep_epochs]
        atomic.write_text(self.path, "".join(r + "\n" for r in rows))
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        self.prefix = desc.split("/")[0]
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc, leave=False)

    def step(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif time.time() - self._last > 10:
            print(line, flush=True)
            self._last = time.time()

    def epoch(self, row: dict, line: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "top1", "top5"):
                if k in row:
                    self.tb.add_scalar(f"{self.prefix}/{k}", row[k], row["epoch"] + 1)
            self.tb.flush()
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self._last = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled and self.tb is not None:
            self.tb.close()


def fit(cfg, task: Task, out_dir: Path, env: D.DistEnv, *, identity: dict, fresh: bool = False,
        desc: str = "train") -> dict:
    """Train ``task`` for ``cfg.train.epochs`` (resuming from ``out_dir`` when its checkpoint has the same config and
    ``identity``: the backbone, the subset) and evaluate; returns the metrics: ``top1``, ``top5`` (last epoch;
    absent when stopped before it), ``best_acc1``, ``best_epoch`` (see the module docstring), ``epochs_done``,
    ``complete``, ``train_time_s``, ``s_per_epoch``, ``loss_final``, ``unreadable_train_images``, ``resumes``,
    ``steps_redone``, ``restarts``, ``history``. Raises :class:`ctbench.distributed.Interrupted` after a stop signal
    (the checkpoint written), and a one-line error when another process of the run died or hung."""
    try:
        return _fit(cfg, task, out_dir, env, identity=identity, fresh=fresh, desc=desc)
    except D.PEER_FAILURES as e:
        if not env.distributed:
            raise
        raise D.peer_failure(env, e, None) from e


def _fit(cfg, task: Task, out_dir: Path, env: D.DistEnv, *, identity: dict, fresh: bool, desc: str) -> dict:
    ckpt_path = out_dir / CHECKPOINT
    sampler = task.sampler
    steps_per_epoch = sampler.steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch
    stop_at = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    progress = Progress()
    # The RNG states saved in checkpoints are the run's, not the OS's (the trained module is already built).
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    resumed = ckpt_path.is_file() and not fresh
    if resumed:
        progress = resume(ckpt_path, cfg, task, steps_per_epoch, identity)
        redone = max(read_last_step(out_dir) - progress.step, 0) if env.is_main else 0
        progress.resumes.append({"at_step": progress.step, "redone": redone, "restart": env.restart})
        if not env.is_main:
            progress.loss_sum, progress.loss_count, progress.bad = 0.0, 0, 0
    if env.is_main:
        print(start_line(resumed, fresh and ckpt_path.is_file(), progress.step, progress.epoch,
                         progress.step_in_epoch, steps_per_epoch, ckpt_path, progress.resumes, env.restart),
              flush=True)
    device = env.device
    if env.is_main:
        atomic.clean_stale_temps(out_dir)  # left by a process killed while writing a checkpoint
    log = Logger(out_dir, env.is_main, stop_at, progress.step, desc,
                 progress.epoch + (1 if progress.step_in_epoch else 0))

    def fold_partial_sums() -> None:
        sums = all_reduce_sum(torch.tensor([progress.loss_sum, progress.loss_count, progress.bad],
                                           dtype=torch.float64), device)
        keep = env.is_main
        progress.loss_sum = float(sums[0]) if keep else 0.0
        progress.loss_count = int(sums[1]) if keep else 0
        progress.bad = int(sums[2]) if keep else 0

    # Mid-epoch checkpoints hold the RNG states of the epoch's start: a data loader draws its base seed from the
    # global generator when the epoch's iterator is made, and a resumed run makes that iterator again.
    epoch_rng: dict | None = None

    def save(rng: dict | None = None) -> None:
        fold_partial_sums()
        if env.is_main:
            rng = rng or (epoch_rng if progress.step_in_epoch and epoch_rng is not None else None)
            atomic.torch_save(checkpoint_dict(cfg, task, progress, {"identity": identity}, rng), ckpt_path)
        D.barrier()

    last_eval: dict = {}

    def interrupted(signum: int, t0: float) -> D.Interrupted:
        """Write the checkpoint of the step boundary where every process stopped; the line says where."""
        progress.train_time_s += time.time() - t0
        save(epoch_rng)  # mid-epoch or before the epoch's first step: the RNG state of the epoch's start
        line = (f"interrupted by {D.signal_name(signum)} after step {progress.step}: checkpoint written to "
                f"{ckpt_path}; run the same command again to resume at step {progress.step}")
        if env.is_main:
            print(line, flush=True)
        return D.Interrupted(line)

    try:
        with D.StopSignals() as stop, StepMark(out_dir, env.is_main, progress.step) as last_step:
            while progress.step < stop_at:
                epoch = progress.epoch
                lr = learning_rate(cfg, epoch)
                for group, mult in zip(task.optimizer.param_groups, task.lr_mults):
                    group["lr"] = lr * mult
                sampler.set_epoch(epoch, progress.step_in_epoch)
                task.train_mode()
                epoch_rng = rng_state()
                t0 = time.time()
                loss_acc = torch.zeros(2, dtype=torch.float64)  # (CE sum, images) since the last fold, this process
                for inputs, targets, n_bad in task.batches():
                    signum = D.host_max([stop.signum])[0]  # every process stops at this step boundary, or none
                    if signum:
                        progress.loss_sum += float(loss_acc[0])
                        progress.loss_count += int(loss_acc[1])
                        raise interrupted(signum, t0)
                    n_global = sampler.global_size(progress.step_in_epoch)
                    logits = task.logits(inputs)  # B x classes
                    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
                    loss = ce * (env.world_size / n_global)
                    task.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    task.optimizer.step()
                    loss_acc += torch.stack([ce.detach().double().cpu(), torch.tensor(float(targets.shape[0]),
                                                                                      dtype=torch.float64)])
                    progress.bad += n_bad
                    progress.step += 1
                    progress.step_in_epoch += 1
                    last_step.write(progress.step)
                    log.step(f"{desc}: epoch {epoch + 1}/{cfg.train.epochs} step {progress.step}/{stop_at}")
                    mid_ckpt = cfg.train.ckpt_every and progress.step % cfg.train.ckpt_every == 0
                    if progress.step_in_epoch == steps_per_epoch or progress.step >= stop_at or mid_ckpt:
                        progress.loss_sum += float(loss_acc[0])
                        progress.loss_count += int(loss_acc[1])
                        loss_acc.zero_()
                        progress.train_time_s += time.time() - t0
                        t0 = time.time()
                        if progress.step_in_epoch == steps_per_epoch or progress.step >= stop_at:
                            break
                        save()
                if progress.step_in_epoch < steps_per_epoch:  # stopped mid-epoch by train.max_steps
                    save()
                    break
                task.after_epoch()
                sums = all_reduce_sum(torch.tensor([progress.loss_sum, progress.loss_count, progress.bad],
                                                   dtype=torch.float64), device)
                progress.unreadable += int(sums[2])
                row = {"epoch": epoch, "step": progress.step, "lr": lr,
                       "loss": float(sums[0] / max(float(sums[1]), 1.0)), "unreadable": int(sums[2]),
                       "train_time_s": progress.train_time_s}
                progress.epoch += 1
                progress.step_in_epoch = 0
                progress.loss_sum, progress.loss_count, progress.bad = 0.0, 0, 0
                line = f"{desc}: epoch {progress.epoch}/{cfg.train.epochs} loss {row['loss']:.4f} lr {lr:.4g}"
                last = progress.epoch == cfg.train.epochs
                if last or (cfg.train.eval_every and progress.epoch % cfg.train.eval_every == 0):
                    last_eval = task.evaluate()
                    row.update(top1=last_eval["top1"], top5=last_eval["top5"])
                    line += f" | val top-1 {last_eval['top1']:.2f} top-5 {last_eval['top5']:.2f}"
                progress.history.append(row)
                keep = cfg.train.keep_every and progress.epoch % cfg.train.keep_every == 0
                if last or keep or progress.epoch % cfg.train.ckpt_epochs == 0 or progress.step >= stop_at:
                    save()
                if keep and env.is_main:
                    keep_checkpoint(ckpt_path, progress.epoch - 1)
                log.epoch(row, line)
    finally:
        log.close()
    complete = progress.epoch >= cfg.train.epochs
    if complete and not last_eval:  # resumed after the last epoch's checkpoint: evaluate again
        last_eval = task.evaluate()
    if not complete:  # top1 / top5 are the last epoch's: a run stopped before it has none (best_acc1 so far stays)
        last_eval = {}
    best = best_of(progress.history)
    epochs_done = progress.epoch + progress.step_in_epoch / steps_per_epoch
    unreadable = progress.unreadable + int(all_reduce_sum(torch.tensor([float(progress.bad)]), device)[0])
    history = progress.history
    return {
        **last_eval, **best, "epochs_done": epochs_done, "complete": complete, "steps": progress.step,
        "train_time_s": progress.train_time_s, "s_per_epoch": progress.train_time_s / max(epochs_done, 1e-9),
        "loss_final": history[-1]["loss"] if history else None, "unreadable_train_images": unreadable,
        **interruption_metrics(progress.resumes, env.restart), "history": history,
    }
