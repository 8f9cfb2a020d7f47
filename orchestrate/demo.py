"""``make demo``: the whole pipeline on the embedded toy data, tables printed at the end.

    make demo                            # = python -m orchestrate.demo (after `make data`): the default subset
    make demo FULL=1                     # the whole grid (every method, detection task and label fraction)
    make demo FORCE=1                    # rerun every stage, even those whose records exist
    make demo FULL=1 ARGS="--epochs 48"  # every method at 720 steps (runs M_e48): the budget at which every
                                         # method beats random init by 10 points (JCL and CO2 need more than 480)
    python -m orchestrate.demo --dry-run # the plan: every stage, its command, and whether it would be skipped
    python -m orchestrate.demo --methods moco_v2,jcl --tasks voc_det --pcts 1 --seeds 0 --jobs 2

Stages, each a subprocess (one failing stage cannot take the others down):

1. toy data (``python -m ctbench.toydata``) when a toy dataset is missing;
2. for each seed (default 0 and 1): the random-init floor (``random``, ``random_s1``) and the methods (default
   moco_v2; ``FULL=1``: moco_v2, jcl, eqco, simo, co2) pretrained with the toy preset (``pretrain/presets/toy.yaml``:
   32 px, 480 steps of 64) and the kNN monitor every 4 epochs (``python -m pretrain --loss M``, run ``M`` /
   ``M_s1``); for the first seed (``FULL=1``: every seed) the supervised ceiling (``python -m pretrain.supervised``:
   the same ResNet-50 and init trained on the toy labels, 720 steps of 64, in less time than one pretraining run);
3. for every run and seed, the headline cells: kNN top-1 (``python -m pretrain.knn --image-size 32``) and the
   cached linear probe at 32 px (``python -m transfer.linear --mode cached``);
4. for the first seed only (the costly ones): conversion to detectron2 (``python -m transfer.convert``), the
   semi-supervised fine-tuning (default 1 %; ``FULL=1``: 1 % and 10 %), VOC07 linear-SVM classification and the
   detectron2 transfer tasks (default ``voc_det``, ``voc_seg``; ``FULL=1``: + ``coco_mask``, ``coco_kp``);
5. tables and plots (``python -m results.tables``) into ``results/demo/``; the main tables are printed.

Outputs: ``$CTBENCH_OUTPUT/demo/`` (default ``outputs/demo``) laid out as ``$CTBENCH_OUTPUT`` is (the stages run
with ``CTBENCH_OUTPUT`` pointed there): ``pretrain/<method>/``, ``transfer/<task>/<run>/``, ``linear/``, ``semisup/``,
one run record each; ``logs/<stage>.log`` holds each stage's full output, ``timings.json`` the last time of each
stage (the next run's ETA).

Re-running skips a stage whose record exists, unless ``--force`` (``FORCE=1``) is given or a stage it depends on
ran again in this invocation. A failed stage prints the tail of its log; the stages that depend on it are
skipped as blocked, the others still run, the tables are built from what exists, and the exit code is 1.
Budget: measured from a fresh clone (2 CPU cores, the default plan and 3 jobs, b40333c): 19 min 24 s, set-up
included (with the 960-step ceiling: 20 min 9 s; 2 jobs, d9379c2: 23 min 28 s; one stage at a time, 5ba27f6: 30 min
41 s). Two 480-step moco_v2 runs are the smallest budget measured to beat random init by 10 points on both probes
(``ctbench/toydata/README.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctbench import atomic
from ctbench.errors import UserError, cli_main
from ctbench.paths import datasets_root, outputs_root
from ctbench.records import TOY_MARKER, find_input, iter_records

METHODS = ("moco_v2", "jcl", "eqco", "simo", "co2")
TASKS = ("voc_det", "coco_mask", "coco_kp", "voc_seg")
PCTS = (1, 10)
SEEDS = (0, 1)
# `make demo` (the default): every kind of stage on the headline method, the supervised ceiling and the random-init
# floor, two seeds for the headline cells (kNN and linear top-1); `make demo FULL=1` (--full): the whole grid.
DEFAULT = {"methods": ("moco_v2",), "tasks": ("voc_det", "voc_seg"), "pcts": (1,), "seeds": SEEDS}
FULL = {"methods": METHODS, "tasks": TASKS, "pcts": PCTS, "seeds": SEEDS}
TOY_PX = 32  # the toy training and evaluation resolution (the toy ImageNet's images are 40-50 px)
# The demo's additions to the toy preset (pretrain/presets/toy.yaml: 32 px, 480 steps of 64) and to the supervised
# ceiling's defaults (720 steps of 64): the kNN monitor every 60 steps of pretraining (every 4 epochs) and every 120
# of the ceiling (every 8), the metrics.jsonl rows {"step", "epoch", "knn_top1"} of the learning curves in
# results/demo/ (9 and 7 points; each evaluation encodes the 1,200 toy images, ~5 s).
PRETRAIN_OVERRIDES = ("monitor.knn_every=4",)
SUPERVISED_ARGS = ("--knn-every", "8")
TOY_DATASETS = ("imagenet", "coco", "VOC2007", "VOC2012")
# Three stages at once: the default plan's three long trainings (two moco_v2 seeds and the ceiling) start together and
# share the cores to the end. On 2 cores (one thread each, one more process than cores) a fresh clone's demo took
# 19 min 24 s (stages 18 min 15 s; b40333c, the 720-step ceiling); with the 960-step ceiling 20 min 9 s against
# 23 min 28 s with two at once, where the ceiling then trained for 9.5 min at one thread while the other core, its
# evaluations done, idled; the numbers are bit-identical (one thread each).
DEFAULT_JOBS = 3
# Seconds per stage kind, used for the ETA until a run has measured the real ones: a fresh clone's `make demo` at
# b40333c (2 CPU cores, 3 jobs of one thread each; the toy preset's 480-step pretraining and the 720-step ceiling).
ESTIMATE_S = {"toydata": 3.0, "pretrain": 1029.0, "supervised": 744.0, "convert": 6.5, "transfer": 17.0,
              "knn": 11.5, "linear": 14.0, "semisup": 22.0, "svm": 38.0, "tables": 1.5}
# Only stages estimated at this many seconds or more say how this machine compares: the 3-second toy data stage
# (process start and file writes) ran 4 s in a fresh clone and, alone, scaled the first ETA of the 17-minute
# trainings by a third.
SCALE_MIN_S = 10.0


# ---- the stage runner (shared with orchestrate.sweep) ----------------------------------------------------------------


@dataclass
class Stage:
    key: str  # unique, path-like: "pretrain/moco_v2", "transfer/voc_det/random"
    kind: str  # a key of ESTIMATE_S
    argv: list[str]  # the command
    done: Callable[[], bool] = lambda: False  # True when the stage's record exists
    needs: tuple[str, ...] = ()  # keys of stages that must succeed first
    show_output: bool = False  # stream the output to the console (the final tables)
    always: bool = False  # run even when done() (cheap, regenerated every time)
    final: bool = False  # start only once every other stage has ended, whatever its outcome (the tables)

    @property
    def label(self) -> str:
        return self.key.replace("/", " ")


def _kind_estimate(stage: Stage) -> float:
    return ESTIMATE_S.get(stage.kind, 30.0)


@dataclass
class Outcome:
    status: str  # ok | skipped | failed | blocked
    seconds: float = 0.0
    detail: str = ""


def stage_env(jobs: int) -> dict[str, str]:
    """The environment of every stage when ``jobs`` run at once: unbuffered output (the logs follow the run), and
    the CPU threads shared out among the jobs."""
    env = {"PYTHONUNBUFFERED": "1"}
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 2) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


@dataclass
class Runner:
    """Runs stages in order, or up to ``jobs`` at a time when their dependencies allow, the longest estimated
    first; one log file each."""

    stages: list[Stage]
    log_dir: Path
    timings_file: Path
    force: bool = False
    jobs: int = 1
    verbose: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    out: Callable[[str], None] = lambda line: print(line, flush=True)
    heartbeat_s: float = 30.0

    def __post_init__(self) -> None:
        keys = [s.key for s in self.stages]
        if len(set(keys)) != len(keys):
            raise ValueError("stage keys must be unique")
        try:
            self.history: dict[str, float] = json.loads(self.timings_file.read_text())
        except (OSError, ValueError):
            self.history = {}
        self.outcomes: dict[str, Outcome] = {}
        self._ran: set[str] = set()
        self._done_at_start: dict[str, bool] = {}
        self._scale_num = self._scale_den = 0.0

    # ETA: the last measured time of a stage, else its kind's estimate scaled by how this machine compares.
    def estimate(self, stage: Stage) -> float:
        if stage.key in self.history:
            return self.history[stage.key]
        scale = min(max(self._scale_num / self._scale_den, 0.5), 4.0) if self._scale_den else 1.0
        return _kind_estimate(stage) * scale

    def _measured(self, stage: Stage, seconds: float) -> None:
        """A first measurement of a stage: it scales the estimates of the stages not measured yet (stages estimated
        under ``SCALE_MIN_S`` are mostly process start and say little about the machine)."""
        estimate = _kind_estimate(stage)
        if estimate >= SCALE_MIN_S:
            self._scale_num += seconds
            self._scale_den += estimate

    def _eta(self, pending: Sequence[Stage], running: Mapping[str, tuple]) -> float:
        rest = sum(self.estimate(s) for s in pending if self._will_run(s))
        rest += sum(max(self.estimate(st) - (time.time() - t0), 0.0) for st, _, t0, _ in running.values())
        return rest / max(self.jobs, 1)

    def _will_run(self, stage: Stage) -> bool:
        """For the ETA: a guess from the records found when the run started (no file system scan per line)."""
        if stage.key not in self._done_at_start:
            self._done_at_start[stage.key] = self._skippable(stage)
        return self.force or stage.always or any(n in self._ran for n in stage.needs) \
            or not self._done_at_start[stage.key]

    def would_skip(self, stage: Stage) -> bool:
        """Whether the stage would be skipped now (its record exists and nothing forces it)."""
        return self._skippable(stage)

    def _skippable(self, stage: Stage) -> bool:
        if self.force or stage.always or any(n in self._ran for n in stage.needs):
            return False
        try:
            return bool(stage.done())
        except Exception:  # a record being written by another process, unreadable: not done
            return False

    def _log_path(self, stage: Stage) -> Path:
        return self.log_dir / (stage.key.replace("/", "__") + ".log")

    def run(self) -> dict[str, Outcome]:
        t_start = time.time()
        pending = list(self.stages)
        running: dict[str, tuple[Stage, subprocess.Popen, float, object]] = {}
        n = len(self.stages)
        index = {s.key: i + 1 for i, s in enumerate(self.stages)}
        last_beat = time.time()
        self.log_dir.mkdir(parents=True, exist_ok=True)

        def line(stage: Stage, status: str, extra: str = "") -> None:
            elapsed = time.time() - t_start
            eta = self._eta(pending, running)
            self.out(f"[{index[stage.key]:>{len(str(n))}}/{n}] {status:<7} {stage.label:<28} {extra:<18} "
                     f"| elapsed {fmt_s(elapsed)}, ETA {fmt_s(eta) if pending or running else '0s'}")

        try:
            while pending or running:
                # start what can start: in order when sequential; with several jobs, the longest (estimated)
                # ready stage first (plan order among equals), so the long pretraining runs share the machine
                # instead of one of them running alone at the end
                order = list(pending) if self.jobs <= 1 else sorted(pending, key=lambda st: -self.estimate(st))
                for stage in order:
                    if len(running) >= max(self.jobs, 1):
                        break
                    if stage.final and (running or any(not st.final for st in pending)):
                        continue
                    blockers = [k for k in stage.needs if k in self.outcomes
                                and self.outcomes[k].status in ("failed", "blocked")]
                    if blockers:
                        pending.remove(stage)
                        self.outcomes[stage.key] = Outcome("blocked", detail=f"needs {', '.join(blockers)}")
                        line(stage, "blocked", f"({blockers[0]} failed)")
                        continue
                    if any(k not in self.outcomes or self.outcomes[k].status not in ("ok", "skipped")
                           for k in stage.needs):
                        if self.jobs <= 1:
                            break  # sequential: keep the order
                        continue
                    pending.remove(stage)
                    if self._skippable(stage):
                        self.outcomes[stage.key] = Outcome("skipped", detail="record exists")
                        line(stage, "skip", "(record exists)")
                        continue
                    log = open(self._log_path(stage), "w", encoding="utf-8")  # noqa: SIM115 - closed when it ends
                    log.write("$ " + shlex.join(stage.argv) + "\n")
                    log.flush()
                    env = {**os.environ, **self.env}
                    if stage.show_output or self.verbose:
                        proc = subprocess.Popen(stage.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, bufsize=1)
                    else:
                        proc = subprocess.Popen(stage.argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                    running[stage.key] = (stage, proc, time.time(), log)
                    line(stage, "start", f"(~{fmt_s(self.estimate(stage))})")
                # follow the running ones
                for key, (stage, proc, t0, log) in list(running.items()):
                    if proc.stdout is not None:
                        for text in proc.stdout:  # streamed stages run alone: read to the end
                            log.write(text)
                            self.out(text.rstrip("\n"))
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[key]
                    log.close()
                    seconds = time.time() - t0
                    self._ran.add(key)
                    if rc == 0 and (stage.always or stage.done()):
                        self.outcomes[key] = Outcome("ok", seconds)
                        if key not in self.history:
                            self._measured(stage, seconds)
                        self.history[key] = round(seconds, 1)
                        line(stage, "done", f"in {fmt_s(seconds)}")
                    else:
                        why = f"exit code {rc}" if rc != 0 else "exit code 0 but no run record was written"
                        self.outcomes[key] = Outcome("failed", seconds, why)
                        line(stage, "FAILED", f"({why})")
                        self._show_tail(stage)
                if running:
                    if time.time() - last_beat >= self.heartbeat_s:
                        last_beat = time.time()
                        for stage, _, t0, _ in running.values():
                            self.out(f"        ... {stage.label}: running for {fmt_s(time.time() - t0)}"
                                     f"{self._last_line(stage)}")
                    time.sleep(0.2)
        finally:
            for stage, proc, _, log in running.values():  # interrupted (Ctrl-C, an error): stop the children
                self.out(f"stopping {stage.label}")
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            atomic.write_json(self.timings_file, self.history)
        return self.outcomes

    def _last_line(self, stage: Stage) -> str:
        try:
            with open(self._log_path(stage), "rb") as f:
                f.seek(max(0, os.path.getsize(self._log_path(stage)) - 2000))
                lines = [ln for ln in f.read().decode(errors="replace").replace("\r", "\n").splitlines()
                         if ln.strip()]
        except OSError:
            return ""
        return f" | {lines[-1].strip()[:100]}" if lines else ""

    def _show_tail(self, stage: Stage, n: int = 25) -> None:
        try:
            lines = self._log_path(stage).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        self.out(f"---- last {min(n, len(lines))} lines of {self._log_path(stage)} ----")
        for ln in lines[-n:]:
            self.out("    " + ln)
        self.out("----")

    def summary(self) -> tuple[int, str]:
        """Exit code (0: every stage ok or skipped) and a one-paragraph summary."""
        counts: dict[str, int] = {}
        for o in self.outcomes.values():
            counts[o.status] = counts.get(o.status, 0) + 1
        text = ", ".join(f"{counts[k]} {k}" for k in ("ok", "skipped", "failed", "blocked") if counts.get(k))
        bad = [f"  {k}: {o.status} ({o.detail}); log: {self._log_path(self._stage(k))}"
               for k, o in self.outcomes.items() if o.status in ("failed", "blocked")]
        return (1 if bad else 0), "\n".join([text, *bad])

    def _stage(self, key: str) -> Stage:
        return next(s for s in self.stages if s.key == key)


# ---- record look-ups ------------------------------------------------------------------------------------------------


def run_name(record: Mapping) -> str:
    """The pretraining run an evaluation record belongs to (its own name for baselines)."""
    pre = find_input(record, "pretrain")
    return str(pre.get("name") if pre is not None else record.get("name"))


def has_record(root: Path, kind: str, run: str, task: str | None = None, pct: float | None = None) -> bool:
    """Whether ``root`` holds a record of ``kind`` for pretraining run ``run`` (and ``task`` / semi-sup ``pct``)."""
    for rec in iter_records(root, kind):
        if run_name(rec) != run or (task is not None and rec.get("task") != task):
            continue
        if pct is not None:
            p = (rec.get("metrics") or {}).get("pct", (rec.get("config") or {}).get("pct"))
            if not isinstance(p, (int, float)) or float(p) != float(pct):
                continue
        return True
    return False


# ---- the demo plan ------------------------------------------------------------------------------------------------


def eval_stages(root: Path, run: str, ckpt: str, pkl: str, needs: tuple[str, ...], *, linear: bool,
                pcts: Sequence[int], tasks: Sequence[str], force: bool, svm: bool = False, knn: bool = False,
                seed: int | None = None, image_size: int | None = None) -> list[Stage]:
    """kNN, linear probe, semi-supervised, VOC07 SVM and detection stages of one pretraining run (``run`` = its
    record name, or ``random``), each writing into ``root/<kind>/.../<run>``; ``pkl`` is the converted backbone (or
    ``random``). ``seed`` (the random init's, and the probe's) names the random-init runs ``random_s<seed>`` for a
    seed other than 0; ``image_size`` sets the kNN view and the classification crops (the toy resolution)."""
    py = sys.executable
    fresh = ["--fresh"] if force else []
    label = run if not seed or run != "random" else f"random_s{seed}"  # output folder / stage key
    seed_args = ["--seed", str(seed)] if seed is not None else []
    size = [f"data.image_size={image_size}"] if image_size else []
    cls_over = size + ([f"train.seed={seed}"] if seed else [])
    out = []
    if knn:
        out.append(Stage(f"knn/{label}", "knn",
                         [py, "-m", "pretrain.knn", "--ckpt", ckpt, "--name", run, *seed_args,
                          *(["--image-size", str(image_size)] if image_size else []),
                          "--out", str(root / "knn" / label)],
                         done=lambda: (root / "knn" / label / "record.json").is_file(), needs=needs))
    if linear:
        out.append(Stage(f"linear/{label}", "linear",
                         [py, "-m", "transfer.linear", "--ckpt", ckpt, "--mode", "cached",
                          "--out", str(root / "linear" / label), *fresh, *cls_over],
                         done=lambda: (root / "linear" / label / "record.json").is_file() if label != run
                         else has_record(root, "linear", run), needs=needs))
    for p in pcts:
        out.append(Stage(f"semisup/pct{p}/{label}", "semisup",
                         [py, "-m", "transfer.semisup", "--pct", str(p), "--ckpt", ckpt,
                          "--out", str(root / "semisup" / f"pct{p}" / label), *fresh, *cls_over],
                         done=lambda p=p: has_record(root, "semisup", run, pct=p), needs=needs))
    if svm:
        out.append(Stage(f"transfer/voc07_svm/{label}", "svm",
                         [py, "-m", "transfer.voc07_svm", "--ckpt", ckpt, "--workers", "1",
                          "--out", str(root / "transfer" / "voc07_svm" / label), *fresh],
                         done=lambda: has_record(root, "transfer", run, task="voc07_svm"), needs=needs))
    for t in tasks:
        out.append(Stage(f"transfer/{t}/{label}", "transfer",
                         [py, "-m", "transfer.detection", "--task", t, "--weights", pkl,
                          "--out", str(root / "transfer" / t / label)],
                         done=lambda t=t: has_record(root, "transfer", run, task=t),
                         needs=needs + ((f"convert/{run}",) if pkl != "random" else ())))
    return out


def toy_data_ready(root: Path) -> bool:
    return all((root / d / TOY_MARKER).is_file() for d in TOY_DATASETS)


def toy_epochs() -> int:
    """``train.epochs`` of the toy preset (pretrain/presets/toy.yaml)."""
    from pretrain.config import PRESETS_DIR, read_yaml

    return int(read_yaml(PRESETS_DIR / "toy.yaml")["train"]["epochs"])


def run_label(name: str, seed: int) -> str:
    """The run name of ``name`` (a method, ``supervised``) at ``seed``: ``moco_v2``, ``moco_v2_s1``."""
    return name if seed == 0 else f"{name}_s{seed}"


def plan(root: Path, tables_out: Path, methods: Sequence[str], tasks: Sequence[str], pcts: Sequence[int],
         linear: bool = True, force: bool = False, svm: bool = True, seeds: Sequence[int] = (0,),
         supervised: bool = True, knn: bool = True, supervised_seeds: int | None = 1,
         epochs: int | None = None) -> list[Stage]:
    """The demo's stages in the order they run (``root`` = the demo's output directory).

    Every run (random init, the supervised ceiling, each method) is trained or drawn once per seed; the kNN and
    linear probes run for every seed (the headline cells, mean +- std over seeds), the other evaluations for the
    first seed only (they are the costly ones). The supervised ceiling is trained for the first ``supervised_seeds``
    seeds (None: all; the default 1: its 720 steps cost three quarters of a pretraining run). ``epochs``: every
    method's pretraining epochs (None: the toy preset's); another number than the preset's names the runs
    ``M_eE`` (``moco_v2_e48``, ``moco_v2_e48_s1``), so they are other rows than the preset's runs, never mixed
    with them."""
    py = sys.executable
    data = datasets_root()
    stages = [Stage("toydata", "toydata", [py, "-m", "ctbench.toydata", "--root", str(data)],
                    done=lambda: toy_data_ready(data))]
    first = seeds[0]

    def evals(run: str, ckpt: str, pkl: str, needs: tuple[str, ...], seed: int) -> list[Stage]:
        rest = seed == first
        return eval_stages(root, run, ckpt, pkl, needs, linear=linear, pcts=pcts if rest else (),
                           tasks=tasks if rest else (), force=force, svm=svm and rest, knn=knn,
                           seed=seed if run == "random" else None, image_size=TOY_PX)

    for seed in seeds:
        stages += evals("random", "random", "random", ("toydata",), seed)
    runs: list[tuple[str, int, list[str]]] = []  # (run name, seed, command without --out)
    if supervised:
        runs += [(run_label("supervised", s), s, [py, "-m", "pretrain.supervised", "--seed", str(s), "--name",
                                                  run_label("supervised", s)])
                 for s in seeds[:supervised_seeds]]
    schedule = [] if epochs is None or epochs == toy_epochs() else [f"train.epochs={epochs}"]
    for m in methods:
        name = f"{m}_e{epochs}" if schedule else m
        runs += [(run_label(name, s), s, [py, "-m", "pretrain", "--loss", m]
                  + (["--name", run_label(name, s)] if run_label(name, s) != m else [])) for s in seeds]
    for run, seed, argv in runs:
        run_dir = root / "pretrain" / run
        ckpt = run_dir / "checkpoint.pth.tar"
        sup = argv[2] == "pretrain.supervised"
        tail = list(SUPERVISED_ARGS) if sup else (["--fresh"] if force else []) + list(PRETRAIN_OVERRIDES) \
            + schedule + ([f"train.seed={seed}"] if seed else [])
        stages.append(Stage(f"pretrain/{run}", "supervised" if sup else "pretrain",
                            argv + ["--out", str(run_dir)] + tail,
                            done=lambda d=run_dir: (d / "record.json").is_file(), needs=("toydata",)))
        if tasks and seed == first:
            pkl = run_dir / "model_d2.pkl"
            stages.append(Stage(f"convert/{run}", "convert", [py, "-m", "transfer.convert", str(ckpt), str(pkl)],
                                done=lambda p=pkl: p.with_name(p.name + ".record.json").is_file(),
                                needs=(f"pretrain/{run}",)))
        stages += evals(run, str(ckpt), str(run_dir / "model_d2.pkl"), (f"pretrain/{run}",), seed)
    stages.append(Stage("tables", "tables", [py, "-m", "results.tables", "--records", str(root), "--out",
                                             str(tables_out), "--print"], show_output=True, always=True,
                         final=True))
    return stages


def stop_on_sigterm() -> None:
    """SIGTERM behaves as Ctrl-C: the runner stops its children and the exit code is 130."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def _csv(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UserError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrate.demo", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="The whole ctbench pipeline on the embedded toy data (see `make demo`).",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--force", action="store_true", help="rerun stages whose records exist (make demo FORCE=1)")
    p.add_argument("--out", type=Path, help="demo output directory (default: $CTBENCH_OUTPUT/demo)")
    p.add_argument("--tables", type=Path, default=Path("results/demo"), help="tables and plots (default: %(default)s)")
    p.add_argument("--full", action="store_true", default=os.environ.get("FULL", "") not in ("", "0"),
                   help="the whole grid: every method, detection task and label fraction (make demo FULL=1); "
                        "default: " + ", ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT.items()))
    p.add_argument("--methods", help=f"comma-separated (default: {','.join(DEFAULT['methods'])}; --full: all)")
    p.add_argument("--tasks", help=f"detection tasks, comma-separated; '' for none (default: "
                                   f"{','.join(DEFAULT['tasks'])}; --full: {','.join(TASKS)})")
    p.add_argument("--pcts", help="semi-supervised label fractions in %%; '' for none (default: 1; --full: 1,10)")
    p.add_argument("--seeds", help="seeds of every run, comma-separated; kNN and linear for each, the rest for the "
                                   "first (default: 0,1)")
    p.add_argument("--epochs", type=int, help="pretraining epochs of every method (default: the toy preset's 32 = "
                                              "480 steps; another number names the runs M_eE: JCL and CO2 beat "
                                              "random init by 10 kNN points at 48, not at 32)")
    p.add_argument("--no-supervised", action="store_true", help="skip the supervised ceiling row")
    p.add_argument("--no-knn", action="store_true", help="skip the kNN evaluations")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--no-svm", action="store_true", help="skip the VOC07 linear-SVM classification")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help="stages run at once, the CPU threads shared out among them, at least one each (default: "
                        "%(default)s, the default plan's three long trainings side by side; on 2 cores: 18 min 15 s "
                        "of stages; with the 960-step ceiling 18 min 52 s, against 21 min 50 s with --jobs 2 and 29 "
                        "min with --jobs 1)")
    p.add_argument("--verbose", action="store_true", help="stream every stage's output, not only to its log")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pretrain.config import METHODS as ALL_METHODS

    grid = FULL if args.full else DEFAULT

    def pick(value: str | None, key: str) -> str:
        return ",".join(map(str, grid[key])) if value is None else value

    methods = _csv(pick(args.methods, "methods"), ALL_METHODS, "method")
    from transfer.tasks import PRETRAINED_TASKS

    tasks = _csv(pick(args.tasks, "tasks"), PRETRAINED_TASKS, "task")
    pcts = [int(p) for p in _csv(pick(args.pcts, "pcts"), ("1", "10"), "label fraction")]
    try:
        seeds = [int(v) for v in pick(args.seeds, "seeds").split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds takes integers separated by commas, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds needs one or more distinct seeds >= 0, got {args.seeds!r}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    root = (args.out or outputs_root() / "demo").resolve()
    stages = plan(root, args.tables, methods, tasks, pcts, linear=not args.no_linear, force=args.force,
                  svm=not args.no_svm, seeds=seeds, supervised=not args.no_supervised, knn=not args.no_knn,
                  supervised_seeds=None if args.full else 1, epochs=args.epochs)
    env = {"CTBENCH_OUTPUT": str(root), **stage_env(args.jobs)}
    runner = Runner(stages, root / "logs", root / "timings.json", force=args.force, jobs=args.jobs,
                    verbose=args.verbose, env=env)
    if args.dry_run:
        for i, s in enumerate(stages, 1):
            state = "skip (record exists)" if runner.would_skip(s) else "run"
            print(f"[{i}/{len(stages)}] {s.label:<28} {state:<20} $ {shlex.join(s.argv)}")
        return 0
    print(f"ctbench demo: {len(methods)} method(s) + supervised + random init, seeds {','.join(map(str, seeds))}"
          f"{' (--full)' if args.full else ''}; {len(stages)} stages; outputs in {root}; "
          f"logs in {root / 'logs'}" + (" (--force: rerunning everything)" if args.force else ""), flush=True)
    t0 = time.time()
    stop_on_sigterm()
    runner.run()
    rc, text = runner.summary()
    print(f"\ndemo finished in {fmt_s(time.time() - t0)}: {text}", flush=True)
    print(f"tables: {args.tables}/tables.md (+ .csv, .tex, sources.csv), plots: {args.tables}/plots/", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
