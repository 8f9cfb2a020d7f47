"""Chaos: kill -9 / resume and bad-input scenarios on a temporary copy of the toy data (``make chaos``).

    python -m orchestrate.chaos                   # every scenario; a table, then "tried N, survived N, data lost 0 ..."
    python -m orchestrate.chaos --only kill       # scenarios whose name contains "kill"
    python -m orchestrate.chaos --list            # the scenario names

What "survived" means:

- **kill / resume**: a pretraining run (CPU, deterministic algorithms, 32 px, 1 data worker, a checkpoint every
  step) or a linear probe is SIGKILLed — at a given step, before / in the middle of / right after a checkpoint
  write, or at a random time — and the same command is run again until it completes. The final checkpoint must
  equal an uninterrupted run's bit for bit: weights, BN statistics, queue and pointer, optimizer state, lr, step
  and epoch counters, RNG states, the per-step loss history, and ``metrics.jsonl`` (step, loss, lr per line).
  *Steps lost* = steps of the uninterrupted run missing from the resumed one's history.
- **bad data**: zero-byte, truncated, corrupt and non-image files among readable grayscale / CMYK / 16-bit /
  palette images and an empty class folder: the run completes and reports exactly the unreadable files as
  skipped (at each epoch end and in the record). *Images lost* = readable images counted as skipped, plus
  unreadable ones not counted. No usable image at all -> one error line, exit 2.
- **bad config / checkpoint / disk**: out-of-range or unknown config values, foreign or damaged checkpoints, a full
  disk or a permission error while writing a checkpoint, a ``.pkl``, a record or a table -> exit code 2, one line
  naming the problem, the previous file intact, no half-written file or run directory.
- **ddp**: a 2-process pretraining run (``torchrun --standalone --nproc_per_node 2``, c10d rendezvous, gloo on
  CPU, a checkpoint every 2 steps) loses one rank to SIGKILL: rank 1 mid-epoch, rank 0 in the middle of a
  checkpoint write, rank 1 inside the queue's all-gather of the keys. Under ``--max-restarts 1`` torchrun's new
  generation must rejoin, resume from the last complete checkpoint and end equal, bit for bit, to an uninterrupted
  2-process run (restart and steps redone counted in the record); without restarts the survivor must end with one
  error line (no traceback of ours) within the process-group timeout of the kill.

The kill points are injected from outside the code under test: ``python -m orchestrate.chaos victim [hooks] -- STAGE
ARGS`` runs a stage's command line (``pretrain``, ``linear``, ``semisup``) after wrapping one function of it
(``pretrain.engine.step_generator`` is called once per step with the step number; the classification loop calls
``EpochSampler.global_size`` once per step; checkpoints go through ``ctbench.atomic.torch_save``). The same hooks
make a DDP rank exit or hang at a step (``--fault-rank``), which ``tests/test_reliability.py`` uses; under torchrun
``--fault-restart 0`` limits them to the first generation of workers (``tests/test_elastic.py``), and
``--signal-at-step`` makes a process send itself SIGINT / SIGTERM / SIGUSR1 (``tests/test_interrupt.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctbench.errors import UserError, cli_main

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = "checkpoint.pth.tar"
STAGES = {"pretrain": "pretrain.__main__", "linear": "transfer.linear", "semisup": "transfer.semisup"}

# Tiny, fast settings shared by every pretraining scenario: 3 classes x 4 images, batch 4 -> 3 steps per epoch.
# Options first, then key=value overrides (more overrides may be appended).
PRETRAIN_ARGS = ["--loss", "moco_v2", "--scale", "toy", "data.image_size=32", "data.workers=1", "train.batch_size=4",
                 "model.queue_size=8", "model.bn_splits=2", "model.hidden_dim=64", "model.dim=16", "train.epochs=2",
                 "train.log_every=1", "train.ckpt_every=1", "train.device=cpu"]
LINEAR_ARGS = ["--ckpt", "random", "--mode", "cached", "--scale", "toy", "data.image_size=32", "data.workers=0",
               "train.epochs=2", "optim.milestones=[1]", "train.batch_size=4", "train.eval_batch_size=8",
               "optim.lr=0.1", "train.device=cpu", "train.ckpt_every=1", "cache.views=2"]
# 10 % of 3 classes x 4 images: the generated balanced list keeps 1 image per class -> 2 steps per epoch (2 + 1
# images; 64 px so that the single image of the last step still has 2 x 2 values per channel in res5's BN)
# The DDP scenarios: the pretraining settings on 2 gloo processes (2 images each), a checkpoint every 2 steps, and a
# process-group timeout that bounds how long a survivor may wait for a dead peer.
DDP_TIMEOUT_S = 20.0
DDP_ARGS = ["train.ckpt_every=2", f"train.dist_timeout_s={DDP_TIMEOUT_S:g}"]
SEMISUP_ARGS = ["--ckpt", "random", "--pct", "10", "--scale", "toy", "data.image_size=64", "data.workers=0",
                "train.epochs=2", "optim.milestones=[1]", "train.batch_size=2", "train.eval_batch_size=6",
                "train.device=cpu"]


# ---- the victim: a stage's CLI with a fault injected ----------------------------------------------------------------

def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    stamp = os.environ.get("CTBENCH_CHAOS_KILL_STAMP")
    if stamp:  # when this process died, for the DDP scenarios' time-to-exit of the survivors
        Path(stamp).write_text(f"{time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install_hooks(die_at_step: int | None = None, die_in_save: int | None = None, save_mode: str = "mid",
                  fault_rank: int | None = None, exit_code: int | None = None, hang: bool = False,
                  die_in_enqueue: int | None = None, signal_at_step: int | None = None, signal_name: str = "INT",
                  fault_restart: int | None = None) -> None:
    """Wrap the step and checkpoint functions of this process so that it fails where asked.

    ``die_at_step``: at that step (pretraining: the global step number about to run; classification: the number of
    steps this process already ran) SIGKILL this process, or ``os._exit(exit_code)``, or hang (``hang``).
    ``die_in_save``: at the n-th checkpoint write of this process (1-based), SIGKILL ``before`` it, in the ``mid``dle
    (half the bytes in the temporary file) or right ``after`` the rename. ``die_in_enqueue``: at that pretraining
    step, start the queue's all-gather of the keys, then SIGKILL (the other ranks are inside the collective).
    ``signal_at_step``: at that step send ``SIG<signal_name>`` to this process (as ``kill -INT``: the run is to stop
    after the step with a checkpoint). ``fault_rank``: only on that rank; ``fault_restart``: only in that generation
    of torchrun's workers (``TORCHELASTIC_RESTART_COUNT``), so that a restarted generation runs clean."""
    import torch

    from ctbench import atomic
    from pretrain import engine
    from transfer.classify import data as cdata

    if fault_rank is not None and _rank() != fault_rank:
        return
    if fault_restart is not None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != fault_restart:
        return

    if signal_at_step is not None:
        sig = getattr(signal, f"SIG{signal_name.upper()}")
        real_gen_s = engine.step_generator

        def step_generator_s(seed: int, step: int) -> torch.Generator:
            if step == signal_at_step:
                print(f"chaos: rank {_rank()} sends itself SIG{signal_name.upper()} at step {step + 1}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
            return real_gen_s(seed, step)

        engine.step_generator = step_generator_s
        real_size_s = cdata.EpochSampler.global_size
        calls_s = [0]

        def global_size_s(self, step: int) -> int:
            if calls_s[0] == signal_at_step:
                print(f"chaos: rank {_rank()} sends itself SIG{signal_name.upper()} at step {calls_s[0] + 1}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
            calls_s[0] += 1
            return real_size_s(self, step)

        cdata.EpochSampler.global_size = global_size_s

    if die_in_enqueue is not None:
        import torch.distributed as dist

        from ctbench import distributed as D
        from pretrain.model import ContrastiveModel

        current = [-1]
        real_gen_e = engine.step_generator

        def step_generator_e(seed: int, step: int) -> torch.Generator:
            current[0] = step
            return real_gen_e(seed, step)

        engine.step_generator = step_generator_e
        real_enqueue, real_gather = ContrastiveModel.enqueue, D.gather
        inside = [False]

        def enqueue(self, keys) -> None:
            inside[0] = True
            try:
                return real_enqueue(self, keys)
            finally:
                inside[0] = False

        def gather(x):
            if inside[0] and current[0] == die_in_enqueue and D.world_size() > 1:
                parts = [torch.empty_like(x) for _ in range(D.world_size())]
                dist.all_gather(parts, x.contiguous(), async_op=True)  # this rank's part is on its way
                print(f"chaos: rank {_rank()} dies in the queue all-gather of step {current[0] + 1}",
                      file=sys.stderr, flush=True)
                _die()
            return real_gather(x)

        ContrastiveModel.enqueue = enqueue
        D.gather = gather

    def fail() -> None:
        if hang:
            print(f"chaos: rank {_rank()} hangs", file=sys.stderr, flush=True)
            time.sleep(3600)
        if exit_code is not None:
            print(f"chaos: rank {_rank()} exits with {exit_code}", file=sys.stderr, flush=True)
            os._exit(exit_code)
        _die()

    if die_at_step is not None:
        real_gen = engine.step_generator

        def step_generator(seed: int, step: int) -> torch.Generator:
            if step == die_at_step:
                fail()
            return real_gen(seed, step)

        engine.step_generator = step_generator
        real_size = cdata.EpochSampler.global_size
        calls = [0]

        def global_size(self, step: int) -> int:
            if calls[0] == die_at_step:
                fail()
            calls[0] += 1
            return real_size(self, step)

        cdata.EpochSampler.global_size = global_size

    if die_in_save is not None:
        real_save = atomic.torch_save
        saves = [0]

        def torch_save(obj, path) -> None:
            if Path(path).name != CHECKPOINT:
                return real_save(obj, path)
            saves[0] += 1
            if saves[0] != die_in_save:
                return real_save(obj, path)
            if save_mode == "before":
                _die()
            if save_mode == "after":
                real_save(obj, path)
                _die()
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getbuffer()
            with atomic.atomic_open(path, "wb") as f:  # the same temporary file a real write uses
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()

        atomic.torch_save = torch_save


def victim_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrate.chaos victim")
    ap.add_argument("--die-at-step", type=int)
    ap.add_argument("--die-in-save", type=int)
    ap.add_argument("--save-mode", choices=("before", "mid", "after"), default="mid")
    ap.add_argument("--fault-rank", type=int)
    ap.add_argument("--exit-code", type=int)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--die-in-enqueue", type=int)
    ap.add_argument("--signal-at-step", type=int)
    ap.add_argument("--signal-name", default="INT", choices=("INT", "TERM", "USR1"))
    ap.add_argument("--fault-restart", type=int)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    import importlib

    import torch

    torch.use_deterministic_algorithms(True)
    install_hooks(a.die_at_step, a.die_in_save, a.save_mode, a.fault_rank, a.exit_code, a.hang, a.die_in_enqueue,
                  a.signal_at_step, a.signal_name, a.fault_restart)
    module = importlib.import_module(STAGES[a.stage])  # its errors read "python -m <its module>: error: ..."
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    return int(module.main(args) or 0)


def victim_command(stage: str, args: list[str], **hooks) -> list[str]:
    """The command line of a victim process (``hooks``: die_at_step, die_in_save, save_mode, ...)."""
    cmd = [sys.executable, "-m", "orchestrate.chaos", "victim"]
    for k, v in hooks.items():
        if v is None or v is False:
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return [*cmd, stage, "--", *args]


def victim_env() -> dict:
    """One thread, the repository importable: the same arithmetic in every victim process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@dataclass
class Proc:
    rc: int
    out: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def run_victim(stage: str, args: list[str], kill_after_s: float | None = None, timeout: float = 300,
               **hooks) -> Proc:
    """Run a victim to its end (or SIGKILL its whole process group after ``kill_after_s``, as a preemption)."""
    t0 = time.time()
    p = subprocess.Popen(victim_command(stage, args, **hooks), cwd=REPO, env=victim_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=kill_after_s if kill_after_s is not None else timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        if kill_after_s is None:
            raise RuntimeError(f"{stage} victim ran past {timeout} s:\n{out[-2000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # data-loader workers of a killed process
    return Proc(p.returncode, out, time.time() - t0)


def run_torchrun(stage: str, args: list[str], restarts: int = 0, nproc: int = 2, timeout: float = 300,
                 **hooks) -> Proc:
    """A victim under ``torchrun --standalone --nproc_per_node NPROC --max-restarts RESTARTS`` (c10d rendezvous,
    gloo on CPU); the hooks act in torchrun's first generation of workers only."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--max-restarts", str(restarts), *victim_command(stage, args, **hooks,
                                                            fault_restart=0 if hooks else None)[1:]]
    p = subprocess.Popen(cmd, cwd=REPO, env=victim_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise RuntimeError(f"torchrun {stage} ran past {timeout} s:\n{out[-2000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    return Proc(p.returncode, out, time.time() - t0)


# ---- comparing two runs -------------------------------------------------------------------------------------------

VOLATILE = ("train_time_s", "img_per_s", "time", "wall_s", "interruptions")  # how the run went, not what it is


def _equal(a, b, where: str, diffs: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b)):
            diffs.append(where)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)):
            diffs.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in VOLATILE:
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k} (missing on one side)")
            else:
                _equal(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{where} (length {len(a)} vs {len(b)})")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                _equal(x, y, f"{where}[{i}]", diffs)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        diffs.append(f"{where} ({a!r} vs {b!r})")


def compare_runs(ref: Path, other: Path) -> list[str]:
    """Everything that differs between two run directories' checkpoints and ``metrics.jsonl`` (wall times aside)."""
    import torch

    a = torch.load(ref / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(other / CHECKPOINT, map_location="cpu", weights_only=False)
    diffs: list[str] = []
    _equal(a, b, "checkpoint", diffs)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, other)]
    _equal(rows[0], rows[1], "metrics.jsonl", diffs)
    return diffs


def steps_in(run: Path) -> int:
    import torch

    p = run / CHECKPOINT
    return int(torch.load(p, map_location="cpu", weights_only=False)["step"]) if p.is_file() else 0


# ---- disk faults ----------------------------------------------------------------------------------------------------

class _FullFile:
    """A file object whose writes fail with ENOSPC once ``budget`` bytes were written."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n > self._left:
            self._f.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def disk_fault(name: str, kind: str = "enospc", budget: int = 4096) -> Iterator[None]:
    """While active, atomic writes of files called ``name`` fail: ``enospc`` after ``budget`` bytes of the
    temporary file, ``eacces`` when creating it (what a read-only directory or a wrong owner gives)."""
    from ctbench import atomic

    real_fdopen, real_mkstemp = os.fdopen, tempfile.mkstemp

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if kind == "enospc" and target.startswith(f".tmp-{name}."):
            return _FullFile(f, budget)
        return f

    def mkstemp(*args, prefix=None, **kwargs):
        if kind == "eacces" and prefix and prefix.startswith(f".tmp-{name}."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    atomic.os.fdopen, atomic.tempfile.mkstemp = fdopen, mkstemp
    try:
        yield
    finally:
        atomic.os.fdopen, atomic.tempfile.mkstemp = real_fdopen, real_mkstemp


@contextlib.contextmanager
def captured() -> Iterator[io.StringIO]:
    """stdout and stderr of an in-process CLI call."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ": error: " in ln]


# ---- data -----------------------------------------------------------------------------------------------------------

def tiny_imagenet(src: Path, dst: Path, classes: int = 3, train: int = 4, val: int = 2) -> Path:
    """Copy ``classes`` x (``train`` + ``val``) images of an ImageNet-layout root (train/ and val/) to ``dst``."""
    names = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())[:classes]
    for split, n in (("train", train), ("val", val)):
        for c in names:
            files = sorted((src / split / c).iterdir())[:n]
            if len(files) < n:
                raise UserError(f"{src / split / c} has {len(files)} images, the chaos copy needs {n}")
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / split / c / f.name)
    return dst


def add_bad_files(train: Path) -> int:
    """Add unreadable files (zero-byte, truncated, corrupt JPEGs, text named .JPEG), odd but readable images
    (grayscale, CMYK, 16-bit, palette) and an empty class folder; returns the number of unreadable files."""
    from PIL import Image

    classes = sorted(d for d in train.iterdir() if d.is_dir())
    a, b = classes[0], classes[1 % len(classes)]
    good = sorted(a.iterdir())[0]
    data = good.read_bytes()
    (a / "zero.JPEG").write_bytes(b"")
    (a / "truncated.JPEG").write_bytes(data[: len(data) // 3])
    (b / "corrupt.JPEG").write_bytes(data[:2] + bytes(range(256)) * 8)  # JPEG SOI, then garbage
    (b / "notes.JPEG").write_text("this is not an image\n")
    rgb = Image.open(good).convert("RGB")
    rgb.convert("L").save(a / "gray.JPEG")
    rgb.convert("CMYK").save(b / "cmyk.JPEG")
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(a / "sixteen.png")
    rgb.convert("P").save(b / "palette.png")
    (train / "n99999999").mkdir()
    return 4


# ---- scenarios ------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    survived: bool
    detail: str
    lost_steps: int = 0
    lost_images: int = 0
    seconds: float = 0.0


class Chaos:
    """The scenarios, sharing one temporary copy of the data and one uninterrupted reference run per stage."""

    def __init__(self, work: Path, source: Path, seed: int = 0):
        self.work = work
        self.rng = random.Random(seed)
        self.data = tiny_imagenet(source, work / "imagenet")
        self._ref: dict[str, tuple[Path, float]] = {}
        self._ref_out: dict[str, Proc] = {}
        self._n_bad = 0

    def pretrain_args(self, out: Path, data: Path | None = None) -> list[str]:
        return ["--data", str(data or self.data / "train"), "--out", str(out), "--name", "chaos", *PRETRAIN_ARGS]

    def linear_args(self, out: Path) -> list[str]:
        return ["--data", str(self.data), "--out", str(out), "--name", "chaos", *LINEAR_ARGS]

    def semisup_args(self, out: Path) -> list[str]:
        return ["--data", str(self.data), "--out", str(out), "--name", "chaos", *SEMISUP_ARGS]

    def ddp_reference(self) -> Path:
        """The uninterrupted 2-process pretraining run (made once)."""
        if "ddp" not in self._ref:
            out = self.work / "ddp-reference"
            p = run_torchrun("pretrain", self.pretrain_args(out) + DDP_ARGS)
            if p.rc != 0:
                raise RuntimeError(f"uninterrupted 2-process run failed (rc {p.rc}):\n{p.out[-3000:]}")
            self._ref["ddp"] = (out, p.seconds)
        return self._ref["ddp"][0]

    def ddp_kill(self, name: str, restarts: int, **fault) -> Outcome:
        """A 2-process pretraining run (torchrun, gloo) with one rank SIGKILLed where ``fault`` says. With
        ``--max-restarts 1`` it must complete and equal the uninterrupted 2-process run bit for bit; without
        restarts the survivor must end, with one error line and no traceback of ours, within the process-group
        timeout of the kill."""
        ref = self.ddp_reference()
        out = self.work / name.replace(" ", "_").replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        stamp = self.work / f"{out.name}.killed"
        os.environ["CTBENCH_CHAOS_KILL_STAMP"] = str(stamp)  # read by the victims through victim_env()
        try:
            p = run_torchrun("pretrain", self.pretrain_args(out) + DDP_ARGS, restarts=restarts, **fault)
        finally:
            os.environ.pop("CTBENCH_CHAOS_KILL_STAMP", None)
        ended = time.time()
        if not stamp.is_file():
            return Outcome(name, False, f"no rank was killed (rc {p.rc}): {p.out.strip()[-300:]}")
        after_kill = ended - float(stamp.read_text())
        errors = error_lines(p.out)
        ours = [m for m in ("pretrain/engine.py", "ctbench/distributed.py", "pretrain/model.py") if m in p.out]
        if restarts == 0:
            ok = p.rc != 0 and len(errors) == 1 and "lost another process of the run" in errors[0] and not ours \
                and after_kill < DDP_TIMEOUT_S
            detail = (f"exit {p.rc} {after_kill:.1f} s after the kill (process-group timeout {DDP_TIMEOUT_S:g} s): "
                      + (errors[0].split(": error: ", 1)[1].split(": [")[0] if len(errors) == 1 else f"{errors}")
                      + (f"; traceback through {ours}" if ours else ""))
            return Outcome(name, ok, detail)
        resumed = [ln for ln in p.out.splitlines() if ln.startswith("resuming at step")]
        if p.rc != 0 or not resumed:
            return Outcome(name, False, f"exit {p.rc}, resumed: {resumed}: {p.out.strip()[-400:]}")
        diffs = compare_runs(ref, out)
        metrics = json.loads((out / "record.json").read_text())["metrics"]
        lost = max(steps_in(ref) - steps_in(out), 0)
        ok = not diffs and lost == 0 and metrics["restarts"] == 1 and not list(out.glob(".tmp-*")) and not ours
        detail = (f"{len(errors)} error line(s), then torchrun restart 1: {resumed[0].split(';')[0].split(' (')[0]}, "
                  f"{metrics['steps_redone']} step(s) redone; "
                  + ("bit-exact" if not diffs else f"DIFFERS: {', '.join(diffs[:4])}"))
        return Outcome(name, ok, detail, lost_steps=lost)

    def bad_data_dir(self) -> tuple[Path, int]:
        """A copy of the data with unreadable and odd files added (made once)."""
        data = self.work / "bad-imagenet" / "train"
        if not data.is_dir():
            shutil.copytree(self.data / "train", data)
            self._n_bad = add_bad_files(data)
        return data, self._n_bad

    def args(self, stage: str, out: Path) -> list[str]:
        if stage == "pretrain-bad":  # the pretraining run on the data with unreadable files
            return self.pretrain_args(out, self.bad_data_dir()[0])
        if stage == "semisup":
            return self.semisup_args(out)
        return self.pretrain_args(out) if stage == "pretrain" else self.linear_args(out)

    def reference(self, stage: str) -> tuple[Path, float]:
        if stage not in self._ref:
            out = self.work / f"{stage}-reference"
            p = run_victim(stage.split("-")[0], self.args(stage, out))
            if p.rc != 0:
                raise RuntimeError(f"uninterrupted {stage} run failed (rc {p.rc}):\n{p.out[-3000:]}")
            self._ref[stage] = (out, p.seconds)
            self._ref_out[stage] = p
        return self._ref[stage]

    def kill_resume(self, name: str, stage: str, faults: list[dict]) -> Outcome:
        """Run with each fault in turn (every run must die by SIGKILL), then once more to the end; compare."""
        ref, ref_s = self.reference(stage)
        out = self.work / name.replace(" ", "_").replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        notes = []
        for fault in faults:
            fault = dict(fault)
            if fault.get("kill_after_s") == "random":
                fault["kill_after_s"] = round(self.rng.uniform(0.3, 1.0) * ref_s, 2)
            p = run_victim(stage.split("-")[0], self.args(stage, out), **fault)
            at = steps_in(out)
            if p.rc == 0 and "kill_after_s" in fault:
                notes.append(f"finished before the kill at {fault['kill_after_s']} s")
                continue
            if not p.killed:
                return Outcome(name, False, f"run with {fault} exited {p.rc}, expected SIGKILL: {p.out[-300:]}")
            temps = len(list(out.glob(".tmp-*")))
            when = f" after {fault['kill_after_s']:.1f} s" if "kill_after_s" in fault else ""
            notes.append(f"killed{when}, ckpt at step {at}" + (f", {temps} torn temp file" if temps else ""))
        p = run_victim(stage.split("-")[0], self.args(stage, out))
        if p.rc != 0:
            return Outcome(name, False, f"resume exited {p.rc}: {p.out.strip().splitlines()[-1:]}")
        lost = max(steps_in(ref) - steps_in(out), 0)
        lost_images = 0
        if stage == "pretrain-bad":  # unreadable files counted exactly once per epoch across the kills
            skipped = json.loads((out / "record.json").read_text())["metrics"]["skipped_images"]
            expected = self.bad_data_dir()[1] * 2
            lost_images = abs(skipped - expected)
            notes.append(f"{skipped} unreadable counted (expected {expected})")
        diffs = compare_runs(ref, out)
        leftovers = list(out.glob(".tmp-*"))
        ok = not diffs and not leftovers and lost == 0 and lost_images == 0
        detail = "; ".join(notes) + ("; resumed: bit-exact" if ok else f"; DIFFERS: {', '.join(diffs[:4])}"
                                     + (f" ({len(leftovers)} temp files left)" if leftovers else ""))
        return Outcome(name, ok, detail, lost_steps=lost, lost_images=lost_images)

    def bad_data(self) -> Outcome:
        name = "bad data: 4 unreadable + odd modes"
        n_bad = self.bad_data_dir()[1]
        out, _ = self.reference("pretrain-bad")
        p = self._ref_out["pretrain-bad"]
        rec = json.loads((out / "record.json").read_text())
        epochs = rec["config"]["train"]["epochs"]
        skipped = int(rec["metrics"]["skipped_images"])
        expected = n_bad * epochs  # 12 good + 4 odd-but-readable + 4 unreadable = 20 files, 5 batches: none dropped
        ends = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "epoch_end" in ln]
        per_epoch = [r["skipped_images"] for r in ends]
        printed = p.out.count(f"{n_bad} unreadable image(s) skipped")
        ok = skipped == expected and per_epoch == [n_bad] * epochs and printed == epochs
        return Outcome(name, ok, f"record: {skipped} skipped (expected {expected}), per epoch {per_epoch}, "
                       f"reported at {printed}/{epochs} epoch ends", lost_images=abs(skipped - expected))

    def no_usable_image(self) -> Outcome:
        name = "bad data: no usable image"
        data = self.work / "unusable" / "train"
        for c in ("n01", "n02"):
            (data / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                (data / c / f"{i}.JPEG").write_bytes(b"" if i % 2 else b"\xff\xd8garbage")
        out = self.work / "unusable-run"
        p = run_victim("pretrain", self.pretrain_args(out, data))
        errs = error_lines(p.out)
        ok = p.rc == 2 and len(errs) == 1 and "unreadable" in errs[0] and "Traceback" not in p.out
        return Outcome(name, ok, f"exit {p.rc}: {errs[0] if errs else p.out.strip()[-200:]}")

    def bad_configs(self) -> Outcome:
        from pretrain.__main__ import main

        cases = {"loss.tau=0": "loss.tau must be > 0", "loss.tau=-0.1": "loss.tau must be > 0",
                 "data.num_keys=0": "data.num_keys (M) must be >= 1", "optim.lr=-1": "optim.lr must be > 0",
                 "optim.lr=inf": "must be a finite number", "model.queue_size=10": "must be a multiple of the global",
                 "train.batch_size=abc": "must be an integer", "loss.tua=1": "unknown config key 'loss.tua'",
                 "model.head=conv": "choose from linear, mlp, mlp_bn", "train.dist_timeout_s=0": "must be > 0",
                 "model.momentum=1.5": "must be in [0, 1]"}
        bad = []
        for override, want in cases.items():
            out = self.work / "bad-config-run"
            with captured() as buf:
                rc = main([*self.pretrain_args(out), override])
            errs = error_lines(buf.getvalue())
            if rc != 2 or len(errs) != 1 or want not in errs[0] or out.exists():
                bad.append(f"{override}: rc {rc}, {errs or buf.getvalue()[-200:]}")
        return Outcome("bad config values (11 kinds)", not bad,
                       "; ".join(bad) if bad else f"{len(cases)}/{len(cases)}: exit 2, one line, no run directory")

    def bad_checkpoints(self) -> Outcome:
        import torch
        import torchvision

        from transfer.convert import main

        d = self.work / "bad-ckpts"
        d.mkdir(exist_ok=True)
        good = torchvision.models.resnet50().state_dict()
        torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pth")
        torch.save({k: v for k, v in good.items() if not k.startswith("layer4")}, d / "missing.pth")
        torch.save(good, d / "full.pth")
        data = (d / "full.pth").read_bytes()
        (d / "truncated.pth").write_bytes(data[: len(data) // 2])
        (d / "empty.pth").write_bytes(b"")
        (d / "text.pth").write_text("hello\n")
        cases = {"resnet18.pth": "not a ResNet-50", "missing.pth": "tensors missing",
                 "truncated.pth": "not a readable PyTorch checkpoint", "empty.pth": "empty file",
                 "text.pth": "not a readable PyTorch checkpoint"}
        bad = []
        for f, want in cases.items():
            dst = d / f"{f}.pkl"
            with captured() as buf:
                rc = main([str(d / f), str(dst)])
            errs = error_lines(buf.getvalue())
            if rc != 2 or len(errs) != 1 or want not in errs[0] or f not in errs[0] or dst.exists() \
                    or list(d.glob(".tmp-*")):
                bad.append(f"{f}: rc {rc}, {errs or buf.getvalue()[-200:]}")
        return Outcome("bad checkpoints -> convert (5 kinds)", not bad,
                       "; ".join(bad) if bad else f"{len(cases)}/{len(cases)}: exit 2, one line naming the file, "
                                                  "no .pkl")

    def disk_faults(self) -> Outcome:
        """ENOSPC / EACCES on a checkpoint, a record, a .pkl and a table: previous file intact, exit 2."""
        from pretrain.__main__ import main as pretrain_main
        from results.tables import main as tables_main
        from transfer.convert import main as convert_main

        run = self.work / "disk-run"
        shutil.rmtree(run, ignore_errors=True)
        ckpt, pkl, tables = run / CHECKPOINT, run / "model_d2.pkl", self.work / "disk-tables"
        one, two = [*self.pretrain_args(run), "train.max_steps=1"], [*self.pretrain_args(run), "train.max_steps=2"]
        with captured() as buf:
            ok = (pretrain_main(one) == 0 and convert_main([str(ckpt), str(pkl)]) == 0
                  and tables_main(["--records", str(run), "--out", str(tables), "--no-plots"]) == 0)
        if not ok:
            return Outcome("disk faults", False, f"setup failed: {buf.getvalue()[-300:]}")
        cases = [  # (what, file name, fault, expected message, file that must stay intact, the command)
            ("checkpoint ENOSPC", CHECKPOINT, "enospc", "no space left on device", ckpt, lambda: pretrain_main(two)),
            ("checkpoint EACCES", CHECKPOINT, "eacces", "permission denied", ckpt, lambda: pretrain_main(two)),
            ("record ENOSPC", "record.json", "enospc", "no space left on device", run / "record.json",
             lambda: pretrain_main(two)),
            (".pkl ENOSPC", "model_d2.pkl", "enospc", "no space left on device", pkl,
             lambda: convert_main([str(ckpt), str(pkl)])),
            (".pkl record EACCES", "model_d2.pkl.record.json", "eacces", "permission denied",
             run / "model_d2.pkl.record.json", lambda: convert_main([str(ckpt), str(pkl)])),
            ("table ENOSPC", "tables.md", "enospc", "no space left on device", tables / "tables.md",
             lambda: tables_main(["--records", str(run), "--out", str(tables), "--no-plots"])),
        ]
        bad = []
        for label, name, kind, want, path, call in cases:
            before = path.read_bytes()
            with disk_fault(name, kind, budget=1000), captured() as buf:
                rc = call()
            errs = error_lines(buf.getvalue())
            temps = list(path.parent.glob(".tmp-*"))
            if rc != 2 or len(errs) != 1 or want not in errs[0] or path.read_bytes() != before or temps:
                bad.append(f"{label}: rc {rc}, {errs or buf.getvalue()[-200:]}, temps {len(temps)}")
        n = len(cases)
        return Outcome(f"disk full / permission denied ({n} writes)", not bad,
                       "; ".join(bad) if bad else f"{n}/{n}: exit 2, one line, previous file intact, no temp file")

    def scenarios(self) -> dict[str, Callable[[], Outcome]]:
        k, d = self.kill_resume, self.ddp_kill
        ddp_faults = {
            "rank 1 mid-epoch (step 5)": {"fault_rank": 1, "die_at_step": 4},
            "rank 0 in the middle of checkpoint write 2": {"fault_rank": 0, "die_in_save": 2, "save_mode": "mid"},
            "rank 1 in the queue all-gather (step 4)": {"fault_rank": 1, "die_in_enqueue": 3},
        }
        ddp = {}
        for where, fault in ddp_faults.items():
            for restarts in (1, 0):
                label = f"ddp: kill {where}, " + ("--max-restarts 1" if restarts else "no restarts")
                ddp[label] = lambda label=label, restarts=restarts, fault=fault: d(label, restarts, **fault)
        return {
            "kill pretrain at step 1 (before any checkpoint)": lambda: k(
                "kill pretrain at step 1", "pretrain", [{"die_at_step": 0}]),
            "kill pretrain mid-epoch (step 5)": lambda: k(
                "kill pretrain at step 5", "pretrain", [{"die_at_step": 4}]),
            "kill pretrain in the middle of checkpoint write 2": lambda: k(
                "kill pretrain mid-write", "pretrain", [{"die_in_save": 2, "save_mode": "mid"}]),
            "kill pretrain before checkpoint write 3 (epoch end)": lambda: k(
                "kill pretrain before write", "pretrain", [{"die_in_save": 3, "save_mode": "before"}]),
            "kill pretrain right after checkpoint 6 (before the record)": lambda: k(
                "kill pretrain after last write", "pretrain", [{"die_in_save": 6, "save_mode": "after"}]),
            "kill pretrain at a random time": lambda: k(
                "kill pretrain at random", "pretrain", [{"kill_after_s": "random"}]),
            "kill pretrain 3 times (step 2, mid-write, random)": lambda: k(
                "kill pretrain 3 times", "pretrain",
                [{"die_at_step": 1}, {"die_in_save": 2, "save_mode": "mid"}, {"kill_after_s": "random"}]),
            "kill pretrain right after checkpoint 3 (epoch end)": lambda: k(
                "kill pretrain after epoch-end write", "pretrain", [{"die_in_save": 3, "save_mode": "after"}]),
            "kill pretrain on bad data (step 2, after the epoch-end checkpoint)": lambda: k(
                "kill pretrain on bad data", "pretrain-bad",
                [{"die_at_step": 1}, {"die_in_save": 4, "save_mode": "after"}]),
            "kill linear probe at step 5 (mid-epoch)": lambda: k(
                "kill linear at step 5", "linear", [{"die_at_step": 4}]),
            "kill linear probe mid-write, then at step 2": lambda: k(
                "kill linear twice", "linear", [{"die_in_save": 3, "save_mode": "mid"}, {"die_at_step": 2}]),
            "bad data: unreadable and odd images": self.bad_data,
            "bad data: no usable image": self.no_usable_image,
            "bad config values": self.bad_configs,
            "bad checkpoints": self.bad_checkpoints,
            "disk full / permission denied": self.disk_faults,
            **ddp,
        }


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 56 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def print_table(outcomes: list[Outcome], total_s: float | None = None) -> None:
    """The scenario table, then the totals line (and the whole run's duration, ``total_s``, when given)."""
    w = max(len(o.name) for o in outcomes)
    print(f"{'scenario':<{w}}  {'result':<8}  {'steps lost':>10}  {'images lost':>11}  {'s':>5}  detail")
    for o in outcomes:
        print(f"{o.name:<{w}}  {'survived' if o.survived else 'FAILED':<8}  {o.lost_steps:>10}  {o.lost_images:>11}  "
              f"{o.seconds:>5.1f}  {o.detail}")
    n, ok = len(outcomes), sum(o.survived for o in outcomes)
    print(f"\ntried {n}, survived {ok}, data lost {sum(o.lost_images for o in outcomes)} images / "
          f"{sum(o.lost_steps for o in outcomes)} steps"
          + (f" in {duration(total_s)}" if total_s is not None else ""))


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["victim"]:
        return victim_main(argv[1:])
    from ctbench.paths import imagenet_root

    ap = argparse.ArgumentParser(prog="python -m orchestrate.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="ImageNet-layout root with train/ and val/ (default: the toy ImageNet)")
    ap.add_argument("--only", help="run the scenarios whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    a = ap.parse_args(argv)
    source = a.data or imagenet_root()
    if not (source / "train").is_dir():
        raise UserError(f"{source / 'train'} not found; run `make data` (the toy ImageNet) or pass --data")
    work = Path(tempfile.mkdtemp(prefix="ctbench-chaos-"))
    try:
        chaos = Chaos(work, source, a.seed)
        todo = {n: f for n, f in chaos.scenarios().items() if not a.only or a.only in n}
        if a.list:
            print("\n".join(todo))
            return 0
        if not todo:
            raise UserError(f"no scenario matches {a.only!r}; see --list")
        print(f"chaos: {len(todo)} scenarios on a copy of {source} in {work}", flush=True)
        started = time.time()
        outcomes = []
        for n, f in todo.items():
            t0 = time.time()
            try:
                o = f()
            except Exception as e:  # a scenario that crashes is a failure to report, not a reason to stop
                o = Outcome(n, False, f"{type(e).__name__}: {str(e).strip()[-300:]}")
            o.name, o.seconds = n, time.time() - t0
            print(f"  {'ok  ' if o.survived else 'FAIL'} {n} ({o.seconds:.0f} s)", flush=True)
            outcomes.append(o)
        print()
        print_table(outcomes, time.time() - started)
        return 0 if all(o.survived for o in outcomes) else 1
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
