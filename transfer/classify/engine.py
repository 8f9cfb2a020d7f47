"""The training loop of the classification evaluations: build -> resume -> for each epoch: lr, steps, check,
evaluate, checkpoint -> metrics. One explicit loop on the skeleton every training stage shares
(:mod:`ctbench.training`: resume, stop signals, logging, checkpoint writing); what differs between the linear probe
and fine-tuning lives in a :class:`Task` whose methods the loop calls by name.

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
- ``record.json``: the run record (written by the caller's :class:`ctbench.records.RunRecord`).

Stopping and resuming (as pretraining, :mod:`ctbench.training`): SIGINT / SIGTERM / SIGUSR1 stop the run at the next
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
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ctbench import atomic, training
from ctbench import distributed as D
from ctbench.checkpoints import read_checkpoint
from ctbench.config import to_dict
from ctbench.errors import UserError
from ctbench.records import RECORD_NAME, load_record
from ctbench.training import CHECKPOINT, LOG, METRICS, RunLog, TrainingRun, keep_checkpoint
from transfer.classify.config import config_differences
from transfer.classify.data import EpochSampler

__all__ = ["CHECKPOINT", "LOG", "METRICS", "Task", "accuracy", "all_reduce_sum", "amp_dtype", "best_of", "finished",
           "fit", "learning_rate", "text_log", "topk_correct"]

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
class Progress(training.Progress):
    # Partial sums of the current epoch: this process's since the last save; at a save they are replaced by the
    # all-process sums on rank 0 (zero elsewhere), so an epoch-end all-reduce gives the totals after a resume too.
    loss_sum: float = 0.0  # CE summed over the images
    loss_count: int = 0  # images
    bad: int = 0  # unreadable images skipped
    unreadable: int = 0  # unreadable train images skipped in finished epochs (all processes)
    history: list[dict] = field(default_factory=list)  # one row per finished epoch

    RANK0_SUMS = ("loss_sum", "loss_count", "bad")


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default (``train.precision``), none on CPU."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def learning_rate(cfg, epoch: int) -> float:
    """Base lr of ``epoch`` (before a param group's multiplier)."""
    base = cfg.optim.lr * cfg.train.batch_size / cfg.optim.lr_batch
    return training.schedule_lr(base, epoch, cfg.train.epochs, milestones=cfg.optim.milestones, gamma=cfg.optim.gamma)


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


def _check_same_run(path: Path, ckpt: dict, cfg, identity: dict) -> None:
    if ckpt.get("protocol") != cfg.protocol or "progress" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of a {cfg.protocol} run; use another --out, or --fresh")
    training.refuse_other_config(path, config_differences(ckpt["config"], cfg), "--out")
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


def already_finished(out_dir: Path, cfg, identity: dict, env: D.DistEnv, fresh: bool) -> dict | None:
    """The metrics of a run in ``out_dir`` that already finished with this config and backbone, said in one line
    (rank 0); None when it has to run (``fresh``, or not finished)."""
    done = None if fresh else finished(out_dir, cfg, identity)
    if done is None:
        return None
    if env.is_main:
        m = done["metrics"]
        print(f"{out_dir} already finished: top-1 {m['top1']:.2f} top-5 {m['top5']:.2f} (--fresh to redo)")
    return done["metrics"]


def in_process_group(device: str, body, *args):
    """``body(*args, env)`` inside the process group of ``device`` (set up, always torn down)."""
    env = D.setup(device)
    try:
        return body(*args, env)
    finally:
        D.teardown(env)


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


def best_of(history: list[dict]) -> dict:
    """``best_acc1`` (the highest val top-1 over the evaluated epochs) and ``best_epoch`` (1-based, the first that
    reached it, as main_lincls' ``acc1 > best_acc1``); empty without an evaluation."""
    best: dict = {}
    for row in history:
        if "top1" in row and ("best_acc1" not in best or row["top1"] > best["best_acc1"]):
            best = {"best_acc1": row["top1"], "best_epoch": row["epoch"] + 1}
    return best


def fit(cfg, task: Task, out_dir: Path, env: D.DistEnv, *, identity: dict, fresh: bool = False,
        desc: str = "train") -> dict:
    """Train ``task`` for ``cfg.train.epochs`` (resuming from ``out_dir`` when its checkpoint has the same config and
    ``identity``: the backbone, the subset) and evaluate; returns the metrics: ``top1``, ``top5`` (last epoch;
    absent when stopped before it), ``best_acc1``, ``best_epoch`` (see the module docstring), ``epochs_done``,
    ``complete``, ``train_time_s``, ``s_per_epoch``, ``loss_final``, ``unreadable_train_images``, ``resumes``,
    ``steps_redone``, ``restarts``, ``history``. Raises :class:`ctbench.distributed.Interrupted` after a stop signal
    (the checkpoint written), and a one-line error when another process of the run died or hung."""
    with training.peer_failures_are_one_line(env):
        return _fit(cfg, task, out_dir, env, identity=identity, fresh=fresh, desc=desc)


def _fit(cfg, task: Task, out_dir: Path, env: D.DistEnv, *, identity: dict, fresh: bool, desc: str) -> dict:
    sampler = task.sampler
    steps_per_epoch = sampler.steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch
    stop_at = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    training.seed_everything(cfg.train.seed)  # the RNG states saved are the run's (the trained module is built)
    loss_acc = torch.zeros(2, dtype=torch.float64)  # (CE sum, images) since the last fold, this process
    # Mid-epoch checkpoints hold the RNG states of the epoch's start: a data loader draws its base seed from the
    # global generator when the epoch's iterator is made, and a resumed run makes that iterator again.
    epoch_rng: dict | None = None

    def fold() -> None:
        progress.loss_sum += float(loss_acc[0])
        progress.loss_count += int(loss_acc[1])
        loss_acc.zero_()

    def state(interrupted: bool) -> dict | None:  # the checkpoint (every process; the dict on rank 0)
        fold()
        sums = all_reduce_sum(torch.tensor([progress.loss_sum, progress.loss_count, progress.bad],
                                           dtype=torch.float64), env.device)
        progress.loss_sum, progress.loss_count, progress.bad = float(sums[0]), int(sums[1]), int(sums[2])
        if not env.is_main:
            progress.loss_sum, progress.loss_count, progress.bad = 0.0, 0, 0
            return None
        # mid-epoch, or stopped before the epoch's first step: the RNG state of the epoch's start
        rng = epoch_rng if (progress.step_in_epoch or interrupted) and epoch_rng is not None else None
        data = {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "seed": cfg.train.seed}
        return training.checkpoint_dict(task.module, task.optimizer, progress, config=to_dict(cfg),
                                        about={"protocol": cfg.protocol}, data=data, rng=rng, protocol=cfg.protocol,
                                        identity=identity)

    run = TrainingRun(out_dir, env, Progress(), steps_per_epoch=steps_per_epoch, stop_at=stop_at, state=state)
    run.resume(fresh, lambda ckpt: _check_same_run(run.ckpt_path, ckpt, cfg, identity),
               lambda ckpt: (task.module.load_state_dict(ckpt["state_dict"]),
                             task.optimizer.load_state_dict(ckpt["optimizer"])))
    progress = run.progress
    if env.is_main:
        print(run.start_line(), flush=True)
        atomic.clean_stale_temps(out_dir)  # left by a process killed while writing a checkpoint
    log = RunLog(out_dir, env.is_main, run, desc=desc, tb_keys=("loss", "lr", "top1", "top5"), leave=False)
    run.say = log.say
    last_eval: dict = {}
    try:
        with run:
            while progress.step < stop_at:
                epoch = progress.epoch
                lr = training.set_lr(task.optimizer, learning_rate(cfg, epoch), task.lr_mults)
                sampler.set_epoch(epoch, progress.step_in_epoch)
                task.train_mode()
                epoch_rng = training.rng_state()
                run.restart_clock()
                for inputs, targets, n_bad in task.batches():
                    run.check_stop()  # every process stops at this step boundary, or none
                    n_global = sampler.global_size(progress.step_in_epoch)
                    logits = task.logits(inputs)  # B x classes
                    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
                    run.backward_step(ce * (env.world_size / n_global), task.optimizer)
                    loss_acc += torch.stack([ce.detach().double().cpu(), torch.tensor(float(targets.shape[0]),
                                                                                      dtype=torch.float64)])
                    progress.bad += n_bad
                    run.step_done()
                    log.advance(f"{desc}: epoch {epoch + 1}/{cfg.train.epochs} step {progress.step}/{stop_at}")
                    end = progress.step_in_epoch == steps_per_epoch or progress.step >= stop_at
                    if end or (cfg.train.ckpt_every and progress.step % cfg.train.ckpt_every == 0):
                        run.tick()
                        if end:
                            break
                        run.save()
                fold()
                if progress.step_in_epoch < steps_per_epoch:  # stopped mid-epoch by train.max_steps
                    run.save()
                    break
                task.after_epoch()
                sums = all_reduce_sum(torch.tensor([progress.loss_sum, progress.loss_count, progress.bad],
                                                   dtype=torch.float64), env.device)
                progress.unreadable += int(sums[2])
                row = {"epoch": epoch, "step": progress.step, "lr": lr,
                       "loss": float(sums[0] / max(float(sums[1]), 1.0)), "unreadable": int(sums[2]),
                       "train_time_s": progress.train_time_s}
                run.end_epoch()
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
                    run.save()
                if keep and env.is_main:
                    keep_checkpoint(run.ckpt_path, progress.epoch - 1)
                log.row(row, line, force_print=True, tb_step=row["epoch"] + 1)
    finally:
        log.close()
    complete = progress.epoch >= cfg.train.epochs
    if complete and not last_eval:  # resumed after the last epoch's checkpoint: evaluate again
        last_eval = task.evaluate()
    if not complete:  # top1 / top5 are the last epoch's: a run stopped before it has none (best_acc1 so far stays)
        last_eval = {}
    best = best_of(progress.history)
    epochs_done = progress.epoch + progress.step_in_epoch / steps_per_epoch
    unreadable = progress.unreadable + int(all_reduce_sum(torch.tensor([float(progress.bad)]), env.device)[0])
    history = progress.history
    return {
        **last_eval, **best, "epochs_done": epochs_done, "complete": complete, "steps": progress.step,
        "train_time_s": progress.train_time_s, "s_per_epoch": progress.train_time_s / max(epochs_done, 1e-9),
        "loss_final": history[-1]["loss"] if history else None, "unreadable_train_images": unreadable,
        **training.interruption_metrics(progress.resumes, env.restart), "history": history,
    }
