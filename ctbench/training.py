"""The skeleton of every training run (pretraining, the linear probe, semi-supervised fine-tuning):

    build -> resume -> for each step: forward, check finite, backward, step, schedule, log, checkpoint -> metrics

A stage keeps its own explicit loop (what it builds, its forward, what it logs at a step and an epoch end) and
calls these for everything else, so a fix to resuming, stopping, logging or checkpointing is made once:

    run = TrainingRun(out_dir, env, MyProgress(), steps_per_epoch=spe, stop_at=stop, state=state, new_run="--out")
    run.resume(fresh, check=same_run, restore=load_tensors)   # or start fresh; a resume is counted
    log = RunLog(out_dir, env.is_main, run, desc="linear")
    log.say(run.start_line())
    run.say = log.say
    with run:                                                  # stop signals, .last_step
        while run.progress.step < stop:
            set_lr(optimizer, schedule_lr(base, run.progress.epoch, epochs, milestones=[60, 80]))
            for batch in loader:
                run.check_stop()                               # every process stops at this step, or none
                run.backward_step(loss_of(batch), optimizer)   # zero_grad, backward, (finite check), step
                run.step_done(); log.advance()
                ...
            run.end_epoch(); run.save()

Files in the run directory (rank 0 writes, atomically): ``checkpoint.pth.tar`` (:func:`checkpoint_dict`),
``checkpoint_%04d.pth.tar`` (:func:`keep_checkpoint`, MoCo main_moco.py's name, 0-based epoch), ``metrics.jsonl``
and ``tb/`` (:class:`RunLog`), ``log.txt`` (:func:`append_log`), ``.last_step`` (:class:`StepMark`).

Stopping (:meth:`TrainingRun.check_stop`): SIGINT, SIGTERM and SIGUSR1 stop the run at the next step boundary, the
same on every process (one small host-side collective per step), after the checkpoint of that step; the line says
where. Resuming (:meth:`TrainingRun.resume`): the checkpoint must be the stage's and have the same config; model,
optimizer, RNG and counters come back, and the steps rank 0 finished after it (``.last_step``) are counted as
redone. The run's metrics count resumes, steps redone and torchrun's restarts (:func:`interruption_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import torch
from tqdm import tqdm

import ctbench
from ctbench import atomic
from ctbench import distributed as D
from ctbench.checkpoints import read_checkpoint
from ctbench.errors import UserError
from ctbench.records import jsonl_row

CHECKPOINT = "checkpoint.pth.tar"
KEPT_CHECKPOINT = "checkpoint_{:04d}.pth.tar"  # MoCo main_moco.py's name, 0-based epoch
METRICS = "metrics.jsonl"
LOG = "log.txt"
LAST_STEP = ".last_step"
WARMUP_FACTOR = 0.001  # warmup_steps start at this fraction of the lr (cvpods base_config.py WARMUP_FACTOR)

P = TypeVar("P", bound="Progress")


# ---- seeds and RNG state ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Python, NumPy and torch seeded, so the RNG states in the checkpoints are the run's, not the OS's."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ---- learning rate ----------------------------------------------------------------------------------------------

def schedule_lr(base: float, epoch: float, epochs: int, *, schedule: str = "step", milestones: Sequence[float] = (),
                gamma: float = 0.1, warmup_epochs: float = 0.0, step: int = 0, warmup_steps: int = 0) -> float:
    """The lr at ``epoch`` (fractional when the lr changes per step) of an ``epochs``-long schedule starting at
    ``base``: a linear warm-up from 0 over ``warmup_epochs``, then cosine to 0 at the end (per step) or x ``gamma``
    at each of ``milestones`` (epochs) passed (MoCo's ``adjust_learning_rate``); ``warmup_steps`` (cvpods'
    ``WarmupCosineLR`` / ``WarmupMultiStepLR``) multiplies the schedule by a factor going linearly from
    ``WARMUP_FACTOR`` at step 0 to 1 at that step."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base * epoch / warmup_epochs
    if schedule == "cosine":
        lr = base * 0.5 * (1.0 + math.cos(math.pi * min((epoch - warmup_epochs) / (epochs - warmup_epochs), 1.0)))
    else:
        lr = base * gamma ** sum(epoch >= m for m in milestones)
    if step < warmup_steps:
        a = step / warmup_steps
        lr *= WARMUP_FACTOR * (1.0 - a) + a
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float, mults: Sequence[float] | None = None) -> float:
    """``lr`` (times each param group's multiplier) into the optimizer; returns ``lr``."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr * (mults[i] if mults is not None else 1.0)
    return lr


# ---- counters, checkpoints ----------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What survives a restart besides the tensors. A stage subclasses it with its own counters; all of them are
    saved under the checkpoint's ``progress`` entry, except ``step`` and ``epoch`` (top level, as MoCo's) and
    ``resumes`` (``interruptions``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0
    train_time_s: float = 0.0
    resumes: list[dict] = field(default_factory=list)  # one per resume: at_step, redone, restart (not compared)

    # partial sums of the current epoch that rank 0 saves for every process: the others start again from 0
    RANK0_SUMS: ClassVar[tuple[str, ...]] = ()

    def state(self) -> dict:
        """The checkpoint's ``progress`` entry."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("step", "epoch", "resumes")}

    @classmethod
    def from_checkpoint(cls: type[P], ckpt: dict, is_main: bool) -> P:
        values = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in ckpt["progress"].items()}
        if not is_main:
            values.update({k: type(values.get(k, 0))() for k in cls.RANK0_SUMS})
        return cls(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]),
                   resumes=list(ckpt.get("interruptions", {}).get("resumes", [])), **values)


def checkpoint_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, progress: Progress, *,
                    config: dict, about: dict, data: dict, rng: dict | None = None, **extra) -> dict:
    """The checkpoint of a run: ``state_dict`` (on the CPU), ``epoch``, ``step``, ``optimizer`` (absent when None),
    ``rng`` (``rng`` or the current state, with the data order ``data``), the resolved ``config``, ``ctbench``
    (version + ``about``), ``progress`` (:meth:`Progress.state`), ``interruptions`` (the resumes so far: how the run
    went, not part of its result) and the stage's ``extra`` entries."""
    ckpt = {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "epoch": progress.epoch, "step": progress.step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": {**(rng or rng_state()), "data": data}, "config": config,
            "ctbench": {"version": ctbench.__version__, **about}, "progress": progress.state(),
            "interruptions": {"resumes": progress.resumes}, **extra}
    if optimizer is None:
        del ckpt["optimizer"]
    return ckpt


def keep_checkpoint(ckpt_path: Path, epoch: int) -> Path:
    """Keep the checkpoint just written as ``checkpoint_<epoch>.pth.tar`` (``epoch`` 0-based): a hard link (no extra
    space; the checkpoint is later replaced by rename, which leaves the link alone), else a copy; atomic either
    way."""
    kept = ckpt_path.with_name(KEPT_CHECKPOINT.format(epoch))
    tmp = kept.with_name(f".tmp-{kept.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, kept)
    return kept


class StepMark:
    """``.last_step`` in the run directory: the number of the last step this process finished, rewritten in place
    (one small write per step, no fsync: it only has to survive the process, not the machine); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, step: int):
        self.fd = os.open(out_dir / LAST_STEP, os.O_RDWR | os.O_CREAT, 0o644) if enabled else None
        self.write(step)

    def write(self, step: int) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, f"{step:>19}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_last_step(out_dir: Path) -> int:
    """The step number in ``out_dir/.last_step`` (0 when missing or unreadable)."""
    try:
        return int((out_dir / LAST_STEP).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def interruption_metrics(resumes: list[dict], restart: int) -> dict:
    """The record's account of interruptions: resumes, steps redone in all, torchrun's restart count."""
    return {"resumes": len(resumes), "steps_redone": int(sum(r["redone"] for r in resumes)), "restarts": restart}


class Diverged(UserError):
    """The loss became non-finite; the last good checkpoint is kept."""


def refuse_other_config(path: Path, diffs: list[str], new_run: str) -> None:
    """The one-line refusal of a checkpoint written with another config (``diffs``: ``key: old -> new``)."""
    if diffs:
        raise UserError(f"{path} was written with another config ({'; '.join(diffs[:3])}); resume with the same "
                        f"settings, or pass --fresh (start over in this directory) or {new_run} (a new run)")


@contextlib.contextmanager
def peer_failures_are_one_line(env: D.DistEnv, timeout_s: float | None = None):
    """Under DDP, a collective failing because another process died or hung ends this one with one line."""
    try:
        yield
    except D.PEER_FAILURES as e:
        if not env.distributed:
            raise
        raise D.peer_failure(env, e, timeout_s) from e


# ---- the run ------------------------------------------------------------------------------------------------------

class TrainingRun:
    """One run in ``out_dir``: resume, the per-step bookkeeping, stopping, checkpoints.

    ``state(interrupted)`` is the stage's checkpoint: every process calls it (it may hold collectives) and it
    returns the checkpoint dict on rank 0 (None elsewhere); ``interrupted`` is true for the checkpoint of a stop
    signal. ``nonfinite`` (``stop`` / ``skip``, or None: not checked) is what :meth:`backward_step` does with a
    non-finite loss; ``hint`` ends the error of a stopped run. ``new_run`` is the option that starts a run
    elsewhere (``--name`` / ``--out``), named by the one-line errors of a refused resume."""

    def __init__(self, out_dir: Path, env: D.DistEnv, progress: Progress, *, steps_per_epoch: int, stop_at: int,
                 state: Callable[[bool], dict | None], new_run: str = "--out", nonfinite: str | None = None,
                 hint: str = ""):
        self.out_dir, self.env, self.progress = out_dir, env, progress
        self.steps_per_epoch, self.stop_at, self.state = steps_per_epoch, stop_at, state
        self.new_run, self.nonfinite, self.hint = new_run, nonfinite, hint
        self.ckpt_path = out_dir / CHECKPOINT
        self.resumed = self.replaced = False
        self.saved_at = -1  # the step of the last checkpoint this process wrote or resumed from
        self.say: Callable[[str], None] = print  # how the run's lines reach the user (a RunLog's say)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=env.device)  # first non-finite step
        self._stack: contextlib.ExitStack | None = None
        self._clock, self._window = time.time(), 0

    # -- resume --
    def resume(self, fresh: bool, check: Callable[[dict], None], restore: Callable[[dict], None]) -> bool:
        """Resume from the checkpoint in the run directory (unless ``fresh`` or there is none): ``check(ckpt)``
        raises a one-line error when it is not this stage's or has another config (:func:`refuse_other_config`),
        ``restore(ckpt)`` loads the tensors (module, optimizer, ...); then the RNG state and the counters. A
        resume is counted with the steps redone. Returns whether it resumed."""
        path = self.ckpt_path
        self.replaced = fresh and path.is_file()
        if fresh or not path.is_file():
            return False
        ckpt = read_checkpoint(path)
        check(ckpt)
        again = f"pass --fresh (start over in this directory) or {self.new_run} (a new run)"
        try:
            restore(ckpt)
            set_rng_state(ckpt["rng"])
            progress = type(self.progress).from_checkpoint(ckpt, self.env.is_main)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            what = f"missing entry {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
            raise UserError(f"{path}: cannot resume from this checkpoint ({what}); it is damaged or from another "
                            f"version: {again}") from e
        if progress.epoch * self.steps_per_epoch + progress.step_in_epoch != progress.step:
            raise UserError(f"{path}: step {progress.step} does not match epoch {progress.epoch} with "
                            f"{self.steps_per_epoch} steps per epoch (did the data or the batch size change?); "
                            "use --fresh")
        redone = max(read_last_step(self.out_dir) - progress.step, 0) if self.env.is_main else 0
        progress.resumes.append({"at_step": progress.step, "redone": redone, "restart": self.env.restart})
        self.progress, self.resumed, self.saved_at = progress, True, progress.step
        return True

    def start_line(self) -> str:
        """What a run says when it starts: where it resumes and what it redoes, or that it starts fresh and why."""
        p, where = self.progress, self.ckpt_path.parent
        if not self.resumed:
            return (f"starting fresh (--fresh): the checkpoint in {where} will be replaced" if self.replaced
                    else f"starting fresh: no checkpoint in {where}")
        line = (f"resuming at step {p.step} (epoch {p.epoch + 1}, step {p.step_in_epoch} of {self.steps_per_epoch}; "
                f"resumed from {self.ckpt_path})")
        redone = p.resumes[-1]["redone"] if p.resumes else 0
        if redone:
            line += f": the {redone} step(s) run after that checkpoint are done again"
        if self.env.restart:
            line += f" [torchrun restart {self.env.restart}]"
        return line

    # -- the step loop --
    def __enter__(self) -> TrainingRun:
        self._stack = contextlib.ExitStack()
        self._stop = self._stack.enter_context(D.StopSignals())
        self._mark = StepMark(self.out_dir, self.env.is_main, self.progress.step)
        self._stack.callback(self._mark.close)
        self.restart_clock()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def check_stop(self, *flags: int) -> list[int]:
        """At a step boundary, on every process: the maximum over processes of each flag (one small collective,
        with the stop request); after a stop signal on any process, the checkpoint of this step, the line saying
        where, and :class:`ctbench.distributed.Interrupted` (exit 130)."""
        *values, signum = D.host_max([*(int(f) for f in flags), self._stop.signum])
        if signum:
            self.tick()
            self.save(interrupted=True)
            line = (f"interrupted by {D.signal_name(signum)} after step {self.progress.step}: checkpoint written to "
                    f"{self.ckpt_path}; run the same command again to resume at step {self.progress.step}")
            if self.env.is_main:
                self.say(line)
            raise D.Interrupted(line)
        return values

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> bool:
        """zero_grad, backward, optimizer step. With ``nonfinite`` set, the loss is checked without a host sync:
        the first non-finite step is kept on the device and raised at the next :meth:`check_finite` (``stop``), or
        every process skips the optimizer step of a non-finite loss on any (``skip``: a host sync per step).
        Returns whether the optimizer stepped."""
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if self.nonfinite is not None:
            finite = torch.isfinite(loss.detach())
            if self.nonfinite == "skip" and not bool(D.all_true(finite).item()):
                return False
            self._bad_step.copy_(torch.where((self._bad_step < 0) & ~finite, self.progress.step, self._bad_step))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return True

    def check_finite(self) -> None:
        """Raise :class:`Diverged` when a step's loss was non-finite (a collective: every process calls it at the
        same steps; the log steps and checkpoints)."""
        if self.nonfinite is not None and not bool(D.all_true(self._bad_step < 0).item()):
            at = int(self._bad_step.item())
            raise Diverged(f"the loss became non-finite at step {at if at >= 0 else '(on another rank)'} (epoch "
                           f"{self.progress.epoch}); the last good checkpoint is kept in {self.ckpt_path}. {self.hint}")

    def step_done(self) -> None:
        self.progress.step += 1
        self.progress.step_in_epoch += 1
        self._window += 1
        self._mark.write(self.progress.step)

    def end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.step_in_epoch = 0

    def restart_clock(self) -> None:
        """Time from now on is training time (after an evaluation, or a phase that is not training)."""
        self._clock, self._window = time.time(), 0

    def tick(self) -> tuple[float, int]:
        """Seconds and steps since the last tick (or :meth:`restart_clock`), added to ``progress.train_time_s``."""
        now = time.time()
        seconds, steps = now - self._clock, self._window
        self.progress.train_time_s += seconds
        self._clock, self._window = now, 0
        return seconds, steps

    # -- checkpoints --
    def save(self, interrupted: bool = False) -> None:
        """The checkpoint of this step: non-finite check, the stage's ``state`` (every process), rank 0 writes it
        atomically, then every process waits for the write."""
        self.check_finite()
        ckpt = self.state(interrupted)
        if self.env.is_main:
            atomic.torch_save(ckpt, self.ckpt_path)
        D.barrier()
        self.saved_at = self.progress.step


# ---- logging ------------------------------------------------------------------------------------------------------

def append_log(out_dir: Path, line: str) -> None:
    """One timestamped line appended to ``out_dir/log.txt`` (rank 0 calls it; nothing when the directory is
    missing, e.g. a run that failed before it started)."""
    if out_dir.is_dir():
        with open(out_dir / LOG, "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


class RunLog:
    """What a run reports, rank 0 only: ``metrics.jsonl`` (one JSON row per :meth:`row`; the rows after the step the
    run resumes from are dropped, they are written again), TensorBoard scalars under ``tb/`` (tag
    ``<desc up to the first '/'>/<key>``; ``tb_keys``: which, default every number but the step and epoch), a tqdm
    bar on a terminal, else progress lines at most every 10 s; with ``log_file`` every line it handles also goes to
    ``log.txt`` (the classification CLIs tee their whole output there instead)."""

    def __init__(self, out_dir: Path, enabled: bool, run: TrainingRun, *, desc: str, log_file: bool = False,
                 tb_keys: Sequence[str] | None = None, leave: bool = True):
        self.enabled, self.out_dir, self.log_file, self.tb_keys = enabled, out_dir, log_file, tb_keys
        self.path = out_dir / METRICS
        self.prefix = desc.split("/")[0]
        self.bar = self.tb = self.file = None
        self._started, self._last_print = time.time(), 0.0  # rows: the first printed at once; advance: after 10 s
        if not enabled:
            return
        step = run.progress.step
        keep = ([line for line in self.path.read_text().splitlines() if jsonl_row(line).get("step", step + 1) <= step]
                if self.path.exists() else [])
        atomic.write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        if sys.stderr.isatty():
            self.bar = tqdm(total=run.stop_at, initial=min(step, run.stop_at), unit="step", dynamic_ncols=True,
                            desc=desc, leave=leave)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self._last_print = time.time()

    def say(self, line: str) -> None:
        """Print a line (above the bar) and, with ``log_file``, keep it in log.txt."""
        if not self.enabled:
            return
        self._print(line)
        if self.log_file:
            append_log(self.out_dir, line)

    def advance(self, line: str | None = None) -> None:
        """One step done: the bar moves, or (no terminal) ``line`` is printed when the last print and the start of
        the log are 10 s old."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif line is not None and time.time() - max(self._last_print, self._started) > 10:
            self._print(line)

    def row(self, row: dict, line: str, *, force_print: bool = False, tb_step: int | None = None) -> None:
        """A metrics row (x of its TensorBoard scalars: ``tb_step``, default its step) and its line: printed when
        ``force_print`` or the last print is 10 s old, shown beside the bar."""
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if (k in self.tb_keys if self.tb_keys is not None else k not in ("step", "epoch")) \
                        and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{self.prefix}/{k}", v, row["step"] if tb_step is None else tb_step)
            self.tb.flush()
        if self.log_file:
            append_log(self.out_dir, line)
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
        if force_print or (self.bar is None and time.time() - self._last_print > 10):
            self._print(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
