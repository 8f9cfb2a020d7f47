"""Speed and memory benchmarks against the original MoCo v2 recipe: ``python -m benchmarks`` (``make bench``).

    python -m benchmarks                      # this machine's device (GPU if visible), every section
    python -m benchmarks --device cpu         # the CPU run (64 px, batch 32, 5 windows; < 10 min on 2 cores)
    python -m benchmarks --device cuda        # the GPU run (224 px, batch 256)
    python -m benchmarks --quick              # tiny smoke run of the harness (seconds; numbers mean nothing)
    python -m benchmarks --only compute,switches --steps 20

Writes one run record per section (``$CTBENCH_OUTPUT/bench/<tag>/<section>/record.json``) and the report
``benchmarks/reports/<tag>.md`` (+ ``<tag>.json`` with every row). ``<tag>`` is ``cpu`` or ``cuda-<gpu model>``
(``-quick`` appended for smoke runs). Every speed number has a ratio against the reference MoCo v2 step
(``benchmarks/reference_moco.py``) measured in the same run on the same device. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import suite
from benchmarks.report import evaluate_goals, render
from ctbench import atomic
from ctbench.errors import UserError, choices_error, cli_main
from ctbench.paths import outputs_root
from ctbench.records import RunRecord, git_info, library_versions

REPORTS = Path(__file__).resolve().parent / "reports"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                epilog="sections: " + ", ".join(suite.SECTIONS) + "; methods: "
                                + ", ".join(suite.METHODS))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one step: checks the harness, not the speed")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    p.add_argument("--methods", default="", help="comma-separated methods for compute/pipeline (default: all)")
    p.add_argument("--batch", type=int, help="batch size (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--image-size", type=int, help="crop size in pixels (default: 64 on CPU, 224 on GPU)")
    p.add_argument("--queue", type=int, help="queue size K (default 65536)")
    p.add_argument("--steps", type=int, help="timed steps per window")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: 2 on CPU, min(cores, 16) on GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoders in every 'ours' row (default off: the switch table measures it "
                        "on GPU; every compile of two ResNet-50s takes minutes)")
    p.add_argument("--tag", help="report/record name (default: cpu or cuda-<gpu model>)")
    p.add_argument("--reports", default=str(REPORTS), help="where the Markdown/JSON report goes")
    return p


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return _cpu_model()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_processes() -> list[str]:
    """Other processes using CPU right now (what shares the cores with the measurement)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out.splitlines():
        pid, pcpu, args = line.strip().split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) >= 20.0 and not args.startswith("ps "):
            busy.append(f"{pcpu}% {args[:90]}")
    return busy[:5]


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    only = tuple(x for x in args.only.split(",") if x) or suite.SECTIONS
    for x in only:
        if x not in suite.SECTIONS:
            raise choices_error("section", x, suite.SECTIONS)
    s = suite.Settings.for_device(device, args.quick)
    if args.methods:
        methods = tuple(args.methods.split(","))
        for m in methods:
            if m not in suite.METHODS:
                raise choices_error("method", m, suite.METHODS)
        s.methods = methods
    for field, value in (("batch", args.batch), ("image_size", args.image_size), ("queue_size", args.queue),
                         ("steps", args.steps), ("warmup", args.warmup), ("workers", args.workers),
                         ("compile", args.compile)):
        if value is not None:
            setattr(s, field, value)
    if s.batch < 2 or s.steps < 1 or s.warmup < 0 or s.workers < 0:
        raise UserError("--batch must be >= 2, --steps >= 1, --warmup and --workers >= 0")
    if s.queue_size % s.batch:
        raise UserError(f"--queue ({s.queue_size}) must be a multiple of --batch ({s.batch})")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as main_moco.py, for the reference and ours alike
    name = device_name(device)
    tag = args.tag or ("cpu" if device == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
    if s.quick and not args.tag:
        tag += "-quick"
    meta = {"device": device, "device_name": name, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "versions": _versions(), "git": git_info(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_start": round(os.getloadavg()[0], 2), "other_processes": _busy_processes(),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv), "notes": []}
    print(f"benchmarks on {name} ({device}): {', '.join(only)}; {s.image_size} px, batch {s.batch}"
          + (" [quick]" if s.quick else ""), flush=True)

    results = suite.run_sections(s, only, lambda msg: print("  " + msg, flush=True))

    meta["load_end"] = round(os.getloadavg()[0], 2)
    meta["notes"] += _notes(s, results)
    goals = evaluate_goals(results, s.to_dict(), name)
    records = {}
    root = outputs_root() / "bench" / tag
    for section, rows in results.items():
        with RunRecord("bench", f"{tag}/{section}", root / section, config=s.to_dict(), task=section) as rec:
            rec.metrics["rows"] = rows
            if section == "compute" or section == "pipeline":
                rec.metrics["goals"] = [g for g in goals if g["measured"] is not None]
        records[section] = str(root / section / "record.json")
    reports = Path(args.reports)
    text = render(meta, s.to_dict(), results, goals, records)
    atomic.write_text(reports / f"{tag}.md", text)
    atomic.write_json(reports / f"{tag}.json", {"meta": meta, "settings": s.to_dict(), "results": results,
                                                "goals": goals, "records": records})
    print(f"report: {reports / (tag + '.md')}", flush=True)
    return 0


def _versions() -> dict:
    v = library_versions()
    out = {k: v[k] for k in ("python", "torch", "torchvision", "detectron2") if k in v}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def _notes(s: suite.Settings, results: dict) -> list[str]:
    notes = []
    if s.device == "cpu":
        notes.append("CPU run: bf16 autocast and channels_last are off in ours (as `make pretrain` on CPU); the "
                     "switch table shows what each would do here. torch.compile is not measured on CPU unless "
                     "--compile is given (compiling ResNet-50 takes minutes on 2 cores).")
    if "pipeline" in results or "data" in results:
        notes.append("Data comes from synthetic JPEGs (benchmarks/inputs.py), cached under "
                     "$CTBENCH_OUTPUT/bench/data/.")
    notes.append("Reference = facebookresearch/moco's step on one process (no DDP) with MoCo's own one-process "
                 "split-BN (its notebook's SplitBatchNorm in both encoders, 8 sub-batches, keys shuffled): the "
                 "engine's semantics (model.shuffle_bn=split, one ghost-BN pass). The 'one BN group' reference row "
                 "is MoCo on one GPU (its shuffle cannot change the statistics). Ours uses split-BN unless the "
                 "split_bn switch says otherwise.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
