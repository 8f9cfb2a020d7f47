"""``make sweep SPEC=...``: an ablation grid of pretraining runs, each evaluated, feeding the ablation tables.

    make sweep SPEC=results/sweeps/jcl_m_toy.yaml         # = python -m orchestrate.sweep results/sweeps/jcl_m_toy.yaml
    python -m orchestrate.sweep results/sweeps/jcl_m_toy.yaml --dry-run      # the runs and their commands
    python -m orchestrate.sweep SPEC --force --jobs 2

A spec (YAML; examples in ``results/sweeps/``)::

    name: jcl_m_toy                 # sweep name: runs are called <name>/<key>=<value>[__<key>=<value>...]
    method: jcl                     # python -m pretrain --loss METHOD
    scale: toy                      # optional: toy | full (default: from the data, as python -m pretrain)
    data: null                      # optional: --data for pretraining (default: the toy ImageNet)
    overrides: [train.epochs=4]     # optional: key=value given to every run
    grid:                           # key -> values; every combination is one pretraining run
      data.num_keys: [1, 2, 3]
    trials: 1                       # optional: seeds 0..trials-1 (train.seed); > 1 adds /seed=<s> to the names
    evals: [linear]                 # optional: linear (cached probe), semisup_1, semisup_10, voc07_svm (VOC07
                                    # linear SVMs), and detectron2 tasks (voc_det, voc_seg, coco_det, coco_mask,
                                    # coco_det_c4, coco_mask_c4, coco_det_c4_2x, coco_mask_c4_2x, coco_kp, coco_kp_2x)

Every variant's config is resolved (``pretrain.config``) before anything runs, so a wrong key or value is an
error up front. Runs go to ``$CTBENCH_OUTPUT/pretrain/<name>/<key>=<value>`` with their evaluations beside the
other outputs; each is skipped when its record exists (``--force`` reruns). The swept values are read back from
each record's resolved config, so ``python -m results.tables`` (run at the end; ``make tables`` does the same)
writes one ``ablation_<name>`` table and plot per sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctbench.config import read_mapping
from ctbench.errors import UserError, choices_error, cli_main
from ctbench.paths import outputs_root
from orchestrate.demo import Runner, Stage, eval_stages, fmt_s, stage_env, stop_on_sigterm
from transfer.tasks import PRETRAINED_TASKS

# The detectron2 tasks a sweep may evaluate (transfer.tasks: every transfer/configs/<task>.yaml that evaluates
# pretrained weights, voc_seg included; not the baselines that bring their own weights); the ablation tables show
# each (results.model.HEADLINE).
DETECTION_TASKS = PRETRAINED_TASKS
SVM = "voc07_svm"  # transfer.voc07_svm on the pretraining checkpoint
EVALS = ("linear", "semisup_1", "semisup_10", SVM, *DETECTION_TASKS)
SPEC_KEYS = ("name", "method", "scale", "data", "overrides", "grid", "trials", "evals")


@dataclass
class SweepSpec:
    name: str
    method: str
    grid: dict[str, list[Any]]
    scale: str | None = None
    data: str | None = None
    overrides: list[str] = field(default_factory=list)
    trials: int = 1
    evals: list[str] = field(default_factory=lambda: ["linear"])


@dataclass(frozen=True)
class Variant:
    run: str  # pretraining run name (record name), <sweep>/<key>=<value>[__...][/seed=<s>]
    overrides: tuple[str, ...]  # the swept key=value (+ train.seed)


def value_text(v: Any) -> str:
    """How a grid value is written in an override and in a run name."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec (one-line errors naming the problem)."""
    p = Path(path)
    raw = read_mapping(p, missing="sweep spec not found: {path} (examples: results/sweeps/*.yaml)",
                       not_mapping="{path}: a sweep spec is a mapping with keys " + ", ".join(SPEC_KEYS))
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{p}: unknown key {unknown[0]!r}; a sweep spec has {', '.join(SPEC_KEYS)}")
    for k in ("name", "method", "grid"):
        if not raw.get(k):
            raise UserError(f"{p}: '{k}' is required")
    name = str(raw["name"])
    if "/" in name or "=" in name or name.startswith("."):
        raise UserError(f"{p}: name {name!r} may not contain '/' or '=' (it prefixes the run names)")
    from pretrain.config import METHODS

    if raw["method"] not in METHODS:
        raise choices_error("method", raw["method"], METHODS)
    grid = raw["grid"]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{p}: 'grid' maps config keys to non-empty lists of values, e.g. data.num_keys: [1, 3]")
    for key, values in grid.items():
        if "__" in key or "=" in key or "/" in key:
            raise UserError(f"{p}: grid key {key!r} may not contain '__', '=' or '/'")
        for v in values:
            if "/" in value_text(v) or "__" in value_text(v):
                raise UserError(f"{p}: grid value {v!r} of {key} may not contain '/' or '__'")
    evals = raw.get("evals", ["linear"]) or []
    for e in evals:
        if e not in EVALS:
            raise choices_error("evaluation", e, EVALS)
    trials = raw.get("trials", 1)
    if not isinstance(trials, int) or trials < 1:
        raise UserError(f"{p}: trials must be an integer >= 1, got {trials!r}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"{p}: overrides is a list of 'key=value' strings")
    scale = raw.get("scale")
    if scale not in (None, "toy", "full"):
        raise choices_error("scale", scale, ("toy", "full"))
    return SweepSpec(name, raw["method"], {str(k): list(v) for k, v in grid.items()}, scale,
                     str(raw["data"]) if raw.get("data") else None, list(overrides), trials, list(evals))


def variants(spec: SweepSpec) -> list[Variant]:
    """Every grid combination x trial, with its run name and overrides."""
    keys = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        pairs = [f"{k}={value_text(v)}" for k, v in zip(keys, combo)]
        for seed in range(spec.trials):
            run = f"{spec.name}/{'__'.join(pairs)}" + (f"/seed={seed}" if spec.trials > 1 else "")
            seed_override = (f"train.seed={seed}",) if spec.trials > 1 else ()
            out.append(Variant(run, tuple(pairs) + seed_override))
    return out


def check_configs(spec: SweepSpec, force_full: bool = False) -> None:
    """Resolve every variant's pretraining config now: a bad key or value fails before any run starts (and a
    full-scale spec on the embedded toy data, unless ``force_full``)."""
    from ctbench.paths import detect_scale, imagenet_root
    from pretrain.config import resolve_config

    data = Path(spec.data) if spec.data else imagenet_root() / "train"
    scale = spec.scale or detect_scale(data)
    from pretrain.__main__ import check_scale

    try:
        check_scale(scale, data, force_full, flag="--force-full (make sweep ARGS=--force-full)")
    except UserError as e:
        raise UserError(f"sweep {spec.name}: {e}") from None
    for v in variants(spec):
        try:
            resolve_config(spec.method, scale, None, [*spec.overrides, *v.overrides], data_path=data)
        except UserError as e:
            raise UserError(f"sweep {spec.name}, run {v.run}: {e}") from None


def plan(spec: SweepSpec, root: Path, force: bool = False, force_full: bool = False) -> list[Stage]:
    """Pretraining + evaluation stages of every variant (``root`` = the outputs directory)."""
    py = sys.executable
    stages = []
    for v in variants(spec):
        run_dir = root / "pretrain" / v.run
        ckpt = run_dir / "checkpoint.pth.tar"
        argv = [py, "-m", "pretrain", "--loss", spec.method, "--name", v.run, "--out", str(run_dir)]
        argv += (["--scale", spec.scale] if spec.scale else []) + (["--data", spec.data] if spec.data else [])
        argv += ["--force-full"] if force_full else []
        argv += [*spec.overrides, *v.overrides] + (["--fresh"] if force else [])
        pre = f"pretrain/{v.run}"
        stages.append(Stage(pre, "pretrain", argv, done=lambda d=run_dir: (d / "record.json").is_file()))
        pkl = run_dir / "model_d2.pkl"
        if any(e in DETECTION_TASKS for e in spec.evals):
            stages.append(Stage(f"convert/{v.run}", "convert", [py, "-m", "transfer.convert", str(ckpt), str(pkl)],
                                done=lambda p=pkl: p.with_name(p.name + ".record.json").is_file(), needs=(pre,)))
        tasks = [e for e in spec.evals if e in DETECTION_TASKS]
        pcts = [int(e.split("_")[1]) for e in spec.evals if e.startswith("semisup_")]
        stages += eval_stages(root, v.run, str(ckpt), str(pkl), (pre,), linear="linear" in spec.evals, pcts=pcts,
                              tasks=tasks, force=force, svm=SVM in spec.evals)
    return stages


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrate.sweep",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run an ablation grid of pretraining runs and their evaluations.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", type=Path, nargs="?", help="sweep spec (YAML), e.g. results/sweeps/jcl_m_toy.yaml")
    p.add_argument("--data", help="pretraining data folder, replacing the spec's 'data' (full-scale specs)")
    p.add_argument("--force", action="store_true", help="rerun runs whose records exist")
    p.add_argument("--jobs", type=int, default=1, help="stages run at once (default 1)")
    p.add_argument("--tables", type=Path, default=Path("results/generated"),
                   help="where the tables are regenerated at the end (default: %(default)s, as make tables)")
    p.add_argument("--no-tables", action="store_true", help="do not regenerate the tables at the end")
    p.add_argument("--dry-run", action="store_true", help="print the runs and commands and exit")
    p.add_argument("--force-full", action="store_true", help="allow a full-scale spec on the embedded toy data")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.spec is None:
        raise UserError("give a sweep spec: make sweep SPEC=results/sweeps/jcl_m_toy.yaml")
    spec = load_spec(args.spec)
    if args.data:
        spec.data = args.data
    check_configs(spec, args.force_full)
    root = outputs_root().resolve()
    stages = plan(spec, root, force=args.force, force_full=args.force_full)
    if not args.no_tables:
        stages.append(Stage("tables", "tables", [sys.executable, "-m", "results.tables", "--records", str(root),
                                                 "--out", str(args.tables)], always=True, final=True))
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    env = stage_env(args.jobs)
    logs = root / "sweeps" / spec.name
    runner = Runner(stages, logs / "logs", logs / "timings.json", force=args.force, jobs=args.jobs, env=env)
    if args.dry_run:
        for i, s in enumerate(stages, 1):
            state = "skip (record exists)" if runner.would_skip(s) else "run"
            print(f"[{i}/{len(stages)}] {s.label:<40} {state:<20} $ {shlex.join(s.argv)}")
        return 0
    n_runs = len(variants(spec))
    print(f"sweep {spec.name}: {spec.method}, {n_runs} runs over {', '.join(spec.grid)}; evals: "
          f"{', '.join(spec.evals) or 'none'}; logs in {logs / 'logs'}", flush=True)
    t0 = time.time()
    stop_on_sigterm()
    runner.run()
    rc, text = runner.summary()
    print(f"\nsweep finished in {fmt_s(time.time() - t0)}: {text}", flush=True)
    if not args.no_tables:
        print(f"ablation table: {args.tables}/ablation_{spec.name}.md, plot: {args.tables}/plots/", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
