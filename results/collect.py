"""Run records -> one tidy pandas frame: a row per (record, metric), with everything a table groups by.

    df = results_frame(root)          # every linear / semisup / transfer / pretrain record below root

Columns:

| column | meaning |
|---|---|
| ``record_id``, ``record`` | the record's id and its path relative to ``root`` (the traceability of every cell) |
| ``kind``, ``task`` | record kind; ``linear``, ``semisup_<P>pct``, a transfer task (``voc07_svm``...), ``pretrain`` |
| ``protocol`` | linear: ``cached`` or ``standard``, ``+bn`` appended when ``head.norm=bn``; otherwise empty |
| ``schedule`` | detection: the task's schedule as the record gives it (``24k``, ``1x``, ``2x``); otherwise empty |
| ``pre_protocol`` | the pretraining record's ``protocol.deviations`` (JSON; ``null``: none; empty: a baseline) |
| ``eval_protocol`` | the same for the evaluation record (empty for a pretraining row) |
| ``method`` | the pretraining record's ``config.method`` (else its name); ``random`` / ``supervised`` for baselines |
| ``run`` | pretraining run name (a sweep variant is ``<sweep>/<key>=<value>[__<key>=<value>]``) |
| ``sweep``, ``swept`` | sweep name and ``{key: value}`` (JSON) when the pretraining run is part of a sweep |
| ``epochs`` | pretraining epochs completed (empty for baselines) |
| ``data`` | ``toy`` / ``real`` / ``mixed`` / ``unknown``: the toy flags of the pretraining and evaluation datasets |
| ``pgroup`` | hash of the method, pretraining config (seeds and paths removed) and deviations (trials share it) |
| ``egroup`` | the same for the evaluation (a subset list by its content): same pgroup, egroup, task, data = trials |
| ``seed``, ``metric``, ``value`` | the trial's seed, the metric name (as in the record) and its value |
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ctbench.records import find_input, iter_records

COLUMNS = ("record_id", "record", "kind", "task", "protocol", "schedule", "method", "run", "sweep", "swept", "epochs",
           "data", "pre_protocol", "eval_protocol", "pgroup", "egroup", "seed", "metric", "value")
EVAL_KINDS = ("linear", "semisup", "transfer", "knn")

# Config entries that change between trials or machines but not the numbers: left out of the grouping hash
# (compared lower-case, so detectron2's SEED and OUTPUT_DIR match too), as is every absolute path. Trials are runs
# that differ only in these; anything else (the linear probe's cache.views, the semi-supervised list, ...) and any
# difference in the records' protocol deviations makes another table row.
VOLATILE_KEYS = frozenset({
    "seed", "seeds", "trial", "trials", "path", "root", "out", "out_dir", "output", "output_dir",
    "weights", "ckpt", "checkpoint", "workers", "num_workers", "device", "num_gpus", "num_machines", "dist_url",
    "resume", "cache_dir", "log_every", "print_freq", "ckpt_every", "ckpt_epochs", "keep_every", "dist_timeout_s",
    "monitor",
    "task",  # the task is a column of its own
})
# Sweep run names: <sweep>/<key>=<value>[__<key>=<value>...][/seed=<s>] (written by orchestrate.sweep).
_SWEEP_RE = re.compile(r"^(?P<sweep>[^/]+)/(?P<variant>[^/=]+=[^/]*)(?:/seed=\d+)?$")


def parse_sweep_name(run: str) -> tuple[str, dict[str, str]] | None:
    """``("jcl_m", {"data.num_keys": "3"})`` for ``jcl_m/data.num_keys=3``; ``None`` for a run outside a sweep."""
    m = _SWEEP_RE.match(run or "")
    if m is None:
        return None
    pairs = {}
    for part in m.group("variant").split("__"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            return None
        pairs[key] = value
    return m.group("sweep"), pairs


def config_value(config: Mapping, dotted: str) -> Any:
    """``config["data"]["num_keys"]`` for ``"data.num_keys"``; ``None`` when absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def signature(config: Mapping | None) -> str:
    """Short hash of a config without its volatile entries (seeds, paths, devices)."""
    def strip(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): strip(v) for k, v in x.items() if str(k).lower() not in VOLATILE_KEYS}
        if isinstance(x, (list, tuple)):
            return [strip(v) for v in x]
        return None if isinstance(x, str) and x.startswith("/") else x
    text = json.dumps(strip(config or {}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def deviations(record: Mapping | None) -> list[str] | None:
    """The record's ``protocol.deviations`` (``[]``: exactly the published recipe); ``None`` when it has none."""
    proto = (record or {}).get("protocol")
    if not isinstance(proto, Mapping) or not isinstance(proto.get("deviations"), list):
        return None
    return [str(d) for d in proto["deviations"]]


def _eval_config(rec: Mapping) -> dict:
    """The evaluation config as grouped: a semi-supervised list by its origin and content, not by where it lies
    (a generated list is its seed's: a seed, so trials may differ in it)."""
    cfg = dict(rec.get("config") or {})
    if rec.get("kind") == "semisup" and isinstance(cfg.get("subset"), Mapping):
        info = rec.get("subset") if isinstance(rec.get("subset"), Mapping) else {}
        source = info.get("source")
        content = None if source in (None, "generated") else (info.get("given_sha256") or info.get("sha256"))
        cfg["subset"] = {**{k: v for k, v in cfg["subset"].items() if k != "file"}, "list": source,
                         "list_sha256": content}
    return cfg


def _toy(record: Mapping | None) -> bool | None:
    ds = (record or {}).get("dataset")
    if not isinstance(ds, Mapping) or "toy" not in ds:
        return None
    return bool(ds["toy"])


def data_label(*flags: bool | None) -> str:
    """``toy`` when every dataset involved is toy data, ``real`` when none is, ``mixed`` otherwise; ``unknown``
    when a dataset's flag is missing (a number is never called real without a record saying so)."""
    if any(f is None for f in flags):
        return "unknown" if not any(f for f in flags if f is not None) else "mixed"
    if all(flags):
        return "toy"
    return "real" if not any(flags) else "mixed"


def _task(rec: Mapping) -> tuple[str, str]:
    kind, cfg, metrics = rec.get("kind"), rec.get("config") or {}, rec.get("metrics") or {}
    if kind == "linear":
        mode = str(cfg.get("mode") or metrics.get("mode") or "")
        return "linear", mode + ("+bn" if config_value(cfg, "head.norm") == "bn" else "")
    if kind == "semisup":
        pct = metrics.get("pct", cfg.get("pct"))
        pct_s = f"{float(pct):g}" if isinstance(pct, (int, float)) else str(pct)
        return f"semisup_{pct_s}pct", ""
    if kind in ("pretrain", "knn"):
        return str(kind), ""
    return str(rec.get("task") or ""), ""


def _epochs(pretrain: Mapping | None) -> float | None:
    if pretrain is None:
        return None
    e = (pretrain.get("metrics") or {}).get("epochs")
    if not isinstance(e, (int, float)):
        e = config_value(pretrain.get("config") or {}, "train.epochs")
    return round(float(e), 2) if isinstance(e, (int, float)) else None


def _numeric_metrics(metrics: Mapping) -> Iterable[tuple[str, float]]:
    for k, v in sorted(metrics.items()):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            continue
        yield k, float(v)


def record_rows(rec: Mapping, root: Path) -> list[dict]:
    """The tidy rows of one record (empty for kinds that hold no table numbers: convert, bench)."""
    kind = rec.get("kind")
    if kind not in (*EVAL_KINDS, "pretrain"):
        return []
    pretrain = rec if kind == "pretrain" else find_input(rec, "pretrain")
    task, protocol = _task(rec)
    if pretrain is not None:
        pcfg = pretrain.get("config") or {}
        method, run = str(pcfg.get("method") or pretrain.get("name")), str(pretrain.get("name"))
    else:
        method = run = str(rec.get("name"))
    parsed = parse_sweep_name(run) if pretrain is not None else None
    sweep, swept = "", ""
    if parsed is not None:
        sweep = parsed[0]
        values = {k: config_value(pretrain.get("config") or {}, k) for k in parsed[1]}
        swept = json.dumps({k: (v if v is not None else parsed[1][k]) for k, v in values.items()}, sort_keys=True)
    flags = [_toy(pretrain)] if pretrain is not None else []
    if kind != "pretrain":
        flags.append(_toy(rec))
    pdev = deviations(pretrain) if pretrain is not None else None
    edev = deviations(rec) if kind != "pretrain" else None
    pgroup = signature({"method": method, "pretrain": (pretrain or {}).get("config"), "protocol": pdev})
    egroup = signature({"config": _eval_config(rec), "protocol": edev} if kind != "pretrain" else None)
    path = Path(rec.get("_path", ""))
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = path.as_posix()
    seed = rec.get("seed")
    schedule = rec.get("schedule") if kind == "transfer" else None
    base = {"record_id": str(rec.get("id", "")), "record": rel, "kind": kind, "task": task, "protocol": protocol,
            "schedule": str(schedule) if schedule else "", "method": method, "run": run, "sweep": sweep,
            "swept": swept, "epochs": _epochs(pretrain), "data": data_label(*flags),
            "pre_protocol": json.dumps(pdev) if pretrain is not None else "",
            "eval_protocol": json.dumps(edev) if kind != "pretrain" else "", "pgroup": pgroup, "egroup": egroup,
            "seed": int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None}
    metrics = dict(rec.get("metrics") or {})
    if kind == "pretrain":
        metrics.update(pretrain_costs(rec))
    return [{**base, "metric": k, "value": v} for k, v in _numeric_metrics(metrics)]


def pretrain_costs(rec: Mapping) -> dict[str, float]:
    """What a pretraining run cost: ``train_h`` (hours of training, wall clock) and, on GPUs, ``gpu_hours``
    (``train_h`` x the processes of the run, one GPU each)."""
    t = (rec.get("metrics") or {}).get("train_time_s")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return {}
    hw = rec.get("hardware") or {}
    out = {"train_h": float(t) / 3600.0}
    if hw.get("gpus"):
        out["gpu_hours"] = out["train_h"] * int(hw.get("world_size") or 1)
    return out


def is_trial_summary(record: Mapping) -> bool:
    """A record summarising several trials (``python -m transfer.detection --trials T``: ``trials`` > 1 and
    ``trial`` null, the mean under each metric's name), written beside the trials' own records."""
    trials = record.get("trials")
    return isinstance(trials, int) and trials > 1 and record.get("trial") is None


def drop_summaries(records: Iterable[Mapping]) -> list[Mapping]:
    """The records without trial summaries whose trials have records of their own below them (no double counting;
    a summary whose trial records are gone is kept, as one trial)."""
    recs = list(records)
    dirs = [Path(r.get("_path", "")).parent for r in recs]
    out = []
    for rec, d in zip(recs, dirs):
        if is_trial_summary(rec) and any(o != d and d in o.parents for o in dirs):
            continue
        out.append(rec)
    return out


def results_frame(root: str | Path, records: Iterable[Mapping] | None = None) -> pd.DataFrame:
    """Tidy frame of every table number below ``root`` (or of ``records``, paths taken relative to ``root``);
    trial summaries are left out where the trials' own records are there."""
    root = Path(root)
    recs = drop_summaries(records if records is not None else iter_records(root))
    rows = [r for rec in recs for r in record_rows(rec, root)]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["epochs"] = df["epochs"].astype("Float64")
    df["seed"] = df["seed"].astype("Int64")
    df["value"] = df["value"].astype(float)
    return df.sort_values(["task", "method", "run", "record", "metric"], kind="stable").reset_index(drop=True)
