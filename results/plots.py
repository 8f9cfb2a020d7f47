"""Plots from run records (matplotlib, Agg), each as PNG and SVG, byte-identical when regenerated.

- ``loss_curves``: the pretraining loss per method (one panel per run, from the ``metrics.jsonl`` beside each
  pretraining record);
- ``ablation_<sweep>``: each evaluation number against the swept value, one panel per number, one line per value
  of any second swept key, error bars = std over trials (the style of JCL's and EqCo's ablation figures);
  ``loss_<sweep>``: the pretraining loss of each variant;
- ``throughput_<bench record>``: img/s per benchmark row, annotated with the ratio against the reference
  (``python -m benchmarks`` records).

Called by ``python -m results.tables`` (``--no-plots`` skips them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from results.tables import HEADLINE, fmt_epochs, method_name, method_rank

RC = {"svg.hashsalt": "ctbench", "svg.fonttype": "path", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
      "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100}
PNG_META = {"Software": None}
SVG_META = {"Date": None, "Creator": None}


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, meta in (("png", PNG_META), ("svg", SVG_META)):
        p = out / f"{stem}.{ext}"
        tmp = out / f".tmp-{stem}.{ext}"
        fig.savefig(tmp, format=ext, metadata=meta, dpi=120)
        tmp.replace(p)
        paths.append(p)
    return paths


def read_metrics(record: Mapping) -> list[dict]:
    """The ``metrics.jsonl`` lines of a pretraining record (empty when the file is gone)."""
    p = Path(record.get("_path", "")).parent / (record.get("outputs") or {}).get("metrics", "metrics.jsonl")
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
        if isinstance(row, dict) and "loss" in row and "step" in row:
            rows.append(row)
    return rows


def _data_tag(record: Mapping) -> str:
    ds = record.get("dataset") or {}
    return "toy" if ds.get("toy") else ("real" if ds.get("toy") is False else "unknown")


def loss_curves(records: Iterable[Mapping], out: Path, stem: str = "loss_curves", title: str = "") -> list[Path]:
    """One panel per pretraining run: loss against step."""
    runs = []
    for rec in records:
        rows = read_metrics(rec)
        if rows:
            method = (rec.get("config") or {}).get("method") or rec.get("name")
            runs.append((method_rank(str(method)), str(rec.get("name")), rec, rows))
    if not runs:
        return []
    runs.sort(key=lambda r: (r[0], r[1]))
    ncols = min(3, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.3 * ncols, 2.4 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, (_, name, rec, rows) in zip(axes.flat, runs):
            rows = sorted(rows, key=lambda r: r["step"])
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="C0", lw=1.2)
            method = method_name(str((rec.get("config") or {}).get("method") or name))
            label = method if name == (rec.get("config") or {}).get("method") else f"{method} ({name})"
            ax.set_title(f"{label}, {_data_tag(rec)} data", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        for ax in list(axes.flat)[len(runs):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, out, stem)


def sweep_loss_curves(sweep: str, records: Iterable[Mapping], out: Path) -> list[Path]:
    """The pretraining loss of every variant of a sweep, overlaid."""
    runs = sorted(((str(r.get("name")), read_metrics(r)) for r in records), key=lambda x: x[0])
    runs = [(n, rows) for n, rows in runs if rows]
    if not runs:
        return []
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(4.5, 3.0))
        ax = fig.subplots()
        for i, (name, rows) in enumerate(runs):
            rows = sorted(rows, key=lambda r: r["step"])
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i % 10}", lw=1.2,
                    label=name.split("/", 1)[1])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"sweep {sweep}: pretraining loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _save(fig, out, f"loss_{sweep}")


def ablation_curves(sweep: str, g: pd.DataFrame, out: Path) -> list[Path]:
    """Each headline number of a sweep against the (first) swept key; lines for the other keys' values."""
    swept = [json.loads(s) for s in g["swept"]]
    keys = sorted({k for s in swept for k in s})
    if not keys or not all(isinstance(s.get(keys[0]), (int, float)) for s in swept):
        return []
    x_key, line_keys = keys[0], keys[1:]
    g = g.assign(_x=[float(s[x_key]) for s in swept],
                 _line=[", ".join(f"{k}={s.get(k)}" for k in line_keys) for s in swept])
    panels = [(t, m) for t in HEADLINE for m in HEADLINE[t] if ((g["task"] == t) & (g["metric"] == m)).any()]
    if not panels:
        return []
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.2 * len(panels), 2.6))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (task, metric) in zip(axes, panels):
            sel = g[(g["task"] == task) & (g["metric"] == metric)]
            for i, (line, lg) in enumerate(sorted(sel.groupby("_line"), key=lambda x: x[0])):
                stats = lg.groupby("_x")["value"].agg(["mean", "std", "count"]).sort_index()
                std = stats["std"].where(stats["count"] > 1, 0.0).fillna(0.0)
                ax.errorbar(stats.index, stats["mean"], yerr=std, marker="o", ms=4, lw=1.2, capsize=3,
                            color=f"C{i % 10}", label=line or None)
            ax.set_xlabel(x_key)
            ax.set_ylabel(metric if task == "pretrain" else f"{task} {metric}")
            ax.set_xticks(sorted(set(sel["_x"])))
            if line_keys:
                ax.legend(fontsize=7)
        methods = sorted(set(g["method"]), key=method_rank)
        data = "/".join(sorted(set(g["data"])))
        epochs = "/".join(sorted({fmt_epochs(e) for e in g["epochs"]}))
        fig.suptitle(f"{', '.join(method_name(m) for m in methods)}: sweep {sweep} ({data} data, {epochs} ep)",
                     fontsize=9)
        fig.tight_layout()
        return _save(fig, out, f"ablation_{sweep}")


def throughput_bars(record: Mapping, out: Path) -> list[Path]:
    """img/s per row of a ``bench`` record (rows holding ``items_per_s``), ratio vs the reference as a label."""
    rows = [r for r in (record.get("metrics") or {}).get("rows", []) if isinstance(r, Mapping)
            and isinstance(r.get("items_per_s"), (int, float)) and r.get("name")]
    if not rows:
        return []
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.0, 0.35 * len(rows) + 1.0))
        ax = fig.subplots()
        names = [str(r["name"]) for r in rows]
        values = [float(r["items_per_s"]) for r in rows]
        colors = ["0.6" if r.get("impl") == "reference" else "C0" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            ratio = r.get("ratio_vs_reference")
            if isinstance(ratio, (int, float)):
                ax.text(values[i], i, f" {ratio:.2f}x", va="center", fontsize=7)
        ax.set_xlabel("images / s")
        hw = record.get("hardware") or {}
        ax.set_title(f"{record.get('name')} ({hw.get('gpus', [hw.get('cpu', '')])[0] if hw.get('gpus') else 'CPU'})",
                     fontsize=9)
        fig.tight_layout()
        stem = "throughput_" + str(record.get("name")).replace("/", "_")
        return _save(fig, out, stem)


def write_plots(records: list[Mapping], df: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    """Every plot the records allow; returns the files written."""
    from results.collect import parse_sweep_name

    written: list[Path] = []
    pretrain = [r for r in records if r.get("kind") == "pretrain"]
    main = [r for r in pretrain if parse_sweep_name(str(r.get("name"))) is None]
    written += loss_curves(main, out, title="pretraining loss")
    by_sweep: dict[str, list[Mapping]] = {}
    for r in pretrain:
        parsed = parse_sweep_name(str(r.get("name")))
        if parsed is not None:
            by_sweep.setdefault(parsed[0], []).append(r)
    for sweep in sorted(by_sweep):
        written += sweep_loss_curves(sweep, by_sweep[sweep], out)
    sweeps = df[df["sweep"] != ""]
    for sweep, g in sweeps.groupby("sweep", sort=True):
        written += ablation_curves(str(sweep), g, out)
    for r in sorted((r for r in records if r.get("kind") == "bench"), key=lambda r: str(r.get("name"))):
        written += throughput_bars(r, out)
    return written
