"""Plots from run records (matplotlib, Agg), each as PNG and SVG, byte-identical when regenerated.

- ``loss_curves``: the pretraining loss per method (one panel per run, from the ``metrics.jsonl`` beside each
  pretraining record), points and lines, a partial log window merged into its neighbour (:func:`loss_windows`), a
  one-point run drawn and labelled "one point";
- ``knn_curves``: learning curves, kNN top-1 against the pretraining step per run (the kNN monitor's history and
  ``python -m pretrain.knn``'s final number), random init and chance as lines;
- ``ablation_<sweep>``: each evaluation number against the swept value, one panel per number, one line per value
  of any second swept key, points with error bars = ± std over trials and each point's n, the chance level and the
  random-init floor as lines, the y axis from 0 (the style of JCL's and EqCo's ablation figures);
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

from ctbench.records import find_input
from results.collect import _task, parse_sweep_name
from results.model import HEADLINE, fmt_epochs, method_name, method_rank

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
        with matplotlib.rc_context(RC):  # svg.hashsalt: the SVG ids, hence the bytes, do not depend on the run
            fig.savefig(tmp, format=ext, metadata=meta, dpi=120)
        tmp.replace(p)
        paths.append(p)
    return paths


def read_jsonl_rows(record: Mapping) -> list[dict]:
    """Every JSON line of the ``metrics.jsonl`` beside a pretraining record (empty when the file is gone)."""
    p = Path(record.get("_path", "")).parent / (record.get("outputs") or {}).get("metrics", "metrics.jsonl")
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def read_metrics(record: Mapping) -> list[dict]:
    """The loss lines of a pretraining record's ``metrics.jsonl`` (one per log step; not the epoch summaries)."""
    return [r for r in read_jsonl_rows(record) if isinstance(r.get("loss"), (int, float))]


def _log_every(record: Mapping | None) -> int | None:
    v = ((record or {}).get("config") or {}).get("train", {}) or {}
    v = v.get("log_every") if isinstance(v, Mapping) else None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 else None


def loss_windows(rows: Iterable[Mapping], log_every: int | None = None) -> list[dict]:
    """The logged loss means as windows of at least ``log_every`` steps: ``[{"step", "loss", "n"}]``.

    Each ``metrics.jsonl`` loss line is the mean over the steps since the previous line: its ``n`` (the
    ``steps_in_window`` the line gives, else the step difference). The engine also writes a line at every epoch end,
    so where ``steps_per_epoch`` is not a multiple of ``train.log_every`` that line averages the few steps left (one
    step on the toy data: 31 steps per epoch, log_every 5): a one-step mean is as noisy as one step, the spike every
    curve showed at the epoch boundary. A partial window is merged into the next one (a mean weighted by steps,
    which is the mean over both), a trailing partial one into the previous; a run shorter than one window keeps its
    one point. A step logged twice (a resumed run redoing steps) counts once, its last line. ``log_every``: the
    record's ``train.log_every``, else the most common window.
    """
    by_step: dict[int, Mapping] = {}
    for r in rows:
        if isinstance(r.get("loss"), (int, float)) and math.isfinite(float(r["loss"])):
            by_step[int(r["step"])] = r
    windows, prev = [], 0
    for step in sorted(by_step):
        r = by_step[step]
        n = r.get("steps_in_window")
        n = int(n) if isinstance(n, (int, float)) and n >= 1 else max(step - prev, 1)
        windows.append({"step": step, "loss": float(r["loss"]), "n": n})
        prev = step
    if not windows:
        return []
    if log_every is None:
        sizes = [w["n"] for w in windows]
        log_every = max(set(sizes), key=lambda k: (sizes.count(k), k))
    out: list[dict] = []
    acc_n, acc_sum = 0, 0.0
    for w in windows:
        acc_n += w["n"]
        acc_sum += w["n"] * w["loss"]
        if acc_n >= log_every:
            out.append({"step": w["step"], "loss": acc_sum / acc_n, "n": acc_n})
            acc_n, acc_sum = 0, 0.0
    if acc_n:
        if out:
            last = out[-1]
            n = last["n"] + acc_n
            out[-1] = {"step": windows[-1]["step"], "loss": (last["n"] * last["loss"] + acc_sum) / n, "n": n}
        else:
            out.append({"step": windows[-1]["step"], "loss": acc_sum / acc_n, "n": acc_n})
    return out


def _data_tag(record: Mapping) -> str:
    ds = record.get("dataset") or {}
    return "toy" if ds.get("toy") else ("real" if ds.get("toy") is False else "unknown")


def _one_point_note(ax, x: float, y: float, what: str) -> None:
    ax.annotate(f"one point: {what}", (x, y), xytext=(0, 8), textcoords="offset points", ha="center", fontsize=7)


def _curve(ax, windows: list[dict], color: str, label: str | None = None) -> None:
    """A loss curve: line and points (a one-point run is its marker, labelled so)."""
    xs, ys = [w["step"] for w in windows], [w["loss"] for w in windows]
    ax.plot(xs, ys, color=color, lw=1.2, marker="o", ms=3, label=label)
    if len(windows) == 1:
        _one_point_note(ax, xs[0], ys[0], f"step {xs[0]}, mean of {windows[0]['n']} step(s)")
        ax.set_xlim(0, max(xs[0] * 1.5, 1))


def loss_figure(records: Iterable[Mapping], title: str = "") -> Figure | None:
    """One panel per pretraining run: loss against step (points and line; partial windows merged)."""
    runs = []
    for rec in records:
        windows = loss_windows(read_metrics(rec), _log_every(rec))
        if windows:
            method = (rec.get("config") or {}).get("method") or rec.get("name")
            runs.append((method_rank(str(method)), str(rec.get("name")), rec, windows))
    if not runs:
        return None
    runs.sort(key=lambda r: (r[0], r[1]))
    ncols = min(3, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.3 * ncols, 2.4 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, (_, name, rec, windows) in zip(axes.flat, runs):
            _curve(ax, windows, "C0")
            method = method_name(str((rec.get("config") or {}).get("method") or name))
            label = method if name == (rec.get("config") or {}).get("method") else f"{method} ({name})"
            ax.set_title(f"{label}, {_data_tag(rec)} data", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(f"loss (means of >= {min(w['n'] for w in windows)} steps)" if len(windows) > 1 else "loss")
        for ax in list(axes.flat)[len(runs):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig


def loss_curves(records: Iterable[Mapping], out: Path, stem: str = "loss_curves", title: str = "") -> list[Path]:
    """``loss_curves.png/.svg``: :func:`loss_figure` written to ``out``."""
    fig = loss_figure(records, title)
    return [] if fig is None else _save(fig, out, stem)


def sweep_loss_figure(sweep: str, records: Iterable[Mapping]) -> Figure | None:
    """The pretraining loss of every variant of a sweep, overlaid."""
    runs = sorted(((str(r.get("name")), loss_windows(read_metrics(r), _log_every(r))) for r in records),
                  key=lambda x: x[0])
    runs = [(n, w) for n, w in runs if w]
    if not runs:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(4.5, 3.0))
        ax = fig.subplots()
        for i, (name, windows) in enumerate(runs):
            _curve(ax, windows, f"C{i % 10}", label=name.split("/", 1)[1])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"sweep {sweep}: pretraining loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def sweep_loss_curves(sweep: str, records: Iterable[Mapping], out: Path) -> list[Path]:
    fig = sweep_loss_figure(sweep, records)
    return [] if fig is None else _save(fig, out, f"loss_{sweep}")


# Classification tasks whose top-k has a chance level (100 k / classes percent) and the record kinds behind them.
CLASSIFICATION = ("knn", "linear", "semisup_1pct", "semisup_10pct")


def count_classes(record: Mapping | None) -> int | None:
    """The number of classes of a classification record's dataset: ``dataset.classes`` when recorded, else the
    class folders of the ImageNet-layout directory it names (``<path>/train/*``, or ``<path>/*`` for a train
    folder) when it is still there; None when neither tells."""
    ds = (record or {}).get("dataset") or {}
    if isinstance(ds.get("classes"), int):
        return int(ds["classes"])
    path = ds.get("path")
    if not path:
        return None
    p = Path(str(path))
    folder = p / "train" if (p / "train").is_dir() else p
    if not folder.is_dir():
        return None
    n = sum(1 for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    return n or None


def chance_levels(records: Iterable[Mapping]) -> dict[str, int]:
    """task -> classes, for the classification tasks whose records agree on one class count."""

    seen: dict[str, set[int]] = {}
    for rec in records:
        if rec.get("kind") not in ("linear", "semisup", "knn"):
            continue
        n = count_classes(rec)
        if n:
            seen.setdefault(_task(rec)[0], set()).add(n)
    return {t: next(iter(ns)) for t, ns in seen.items() if len(ns) == 1}


def chance(metric: str, classes: int | None) -> float | None:
    """``top1`` / ``top5`` at chance, percent: 100 min(k, C) / C."""
    if not classes or metric not in ("top1", "top5"):
        return None
    return 100.0 * min(int(metric[3:]), classes) / classes


def _floor_lines(ax, task: str, metric: str, baselines: pd.DataFrame | None, classes: dict[str, int],
                 ax_rows: pd.DataFrame) -> None:
    """The chance level and the random-init floor of a (task, metric) as horizontal lines, labelled (the floor from
    ``baselines`` rows of the same protocol and data as the panel's ``ax_rows``)."""
    c = chance(metric, classes.get(task)) if task in CLASSIFICATION else None
    if c is not None:
        ax.axhline(c, color="0.45", ls="--", lw=1.0, label=f"chance {c:.3g} ({classes[task]} classes)")
    if baselines is not None and len(baselines):
        sel = baselines[(baselines["task"] == task) & (baselines["metric"] == metric)
                        & (baselines["method"] == "random")]
        for col in ("protocol", "data"):  # the same evaluation protocol (linear mode) and data as the panel
            if col in sel and col in ax_rows and ax_rows[col].nunique() == 1:
                sel = sel[sel[col] == ax_rows[col].iloc[0]]
        if len(sel):
            m, n = float(sel["value"].mean()), len(sel)
            sd = float(sel["value"].std()) if n > 1 else None
            text = f"random init {m:.3g}" + (f" ± {sd:.2g}" if sd is not None else "") + f" (n={n})"
            ax.axhline(m, color="C3", ls=":", lw=1.2, label=text)
            if sd is not None:
                ax.axhspan(m - sd, m + sd, color="C3", alpha=0.08, lw=0)


def ablation_figure(sweep: str, g: pd.DataFrame, baselines: pd.DataFrame | None = None,
                    classes: Mapping[str, int] | None = None, zoom: bool = False) -> Figure | None:
    """Each headline number of a sweep against the (first) swept key; lines for the other keys' values.

    Points with lines, error bars = ± std over the trials of a point and its n written beside it, the chance level
    (classification top-k, where the record's dataset tells the classes) and the random-init floor (``baselines``:
    rows of method ``random``, same task and metric) as lines; the y axis starts at 0 unless ``zoom``.
    """
    swept = [json.loads(s) for s in g["swept"]]
    keys = sorted({k for s in swept for k in s})
    if not keys or not all(isinstance(s.get(keys[0]), (int, float)) for s in swept):
        return None
    x_key, line_keys = keys[0], keys[1:]
    g = g.assign(_x=[float(s[x_key]) for s in swept],
                 _line=[", ".join(f"{k}={s.get(k)}" for k in line_keys) for s in swept])
    panels = [(t, m) for t in HEADLINE for m in HEADLINE[t] if ((g["task"] == t) & (g["metric"] == m)).any()]
    if not panels:
        return None
    classes = dict(classes or {})
    counts: list[int] = []
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.4 * len(panels), 3.0))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (task, metric) in zip(axes, panels):
            sel = g[(g["task"] == task) & (g["metric"] == metric)]
            for i, (line, lg) in enumerate(sorted(sel.groupby("_line"), key=lambda x: x[0])):
                stats = lg.groupby("_x")["value"].agg(["mean", "std", "count"]).sort_index()
                std = stats["std"].where(stats["count"] > 1, 0.0).fillna(0.0)
                ax.errorbar(stats.index, stats["mean"], yerr=std, marker="o", ms=4, lw=1.2, capsize=3,
                            color=f"C{i % 10}", label=line or None)
                for x, (mean, n) in zip(stats.index, zip(stats["mean"], stats["count"])):
                    ax.annotate(f"n={int(n)}", (x, mean), xytext=(4, 4), textcoords="offset points", fontsize=6,
                                color=f"C{i % 10}")
                    counts.append(int(n))
            _floor_lines(ax, task, metric, baselines, classes, sel)
            ax.set_xlabel(x_key)
            ax.set_ylabel(metric if task == "pretrain" else f"{task} {metric}")
            ax.set_xticks(sorted(set(sel["_x"])))
            if not zoom:
                ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], float(sel["value"].max()) * 1.12, 1.0))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        methods = sorted(set(g["method"]), key=method_rank)
        data = "/".join(sorted(set(g["data"])))
        epochs = "/".join(sorted({fmt_epochs(e) for e in g["epochs"]}))
        spread = ("error bars: ± std over n trials" if any(n > 1 for n in counts)
                  else "n=1 trial per point: no error bars")
        fig.suptitle(f"{', '.join(method_name(m) for m in methods)}: sweep {sweep} ({data} data, {epochs} ep); "
                     f"{spread}", fontsize=9)
        fig.tight_layout()
        return fig


def ablation_curves(sweep: str, g: pd.DataFrame, out: Path, baselines: pd.DataFrame | None = None,
                    classes: Mapping[str, int] | None = None, zoom: bool = False) -> list[Path]:
    fig = ablation_figure(sweep, g, baselines, classes, zoom)
    return [] if fig is None else _save(fig, out, f"ablation_{sweep}")


def knn_history(record: Mapping) -> list[tuple[int, float]]:
    """(step, kNN top-1) of a pretraining run's monitor (``monitor.knn_every``): its ``metrics.jsonl`` lines with
    ``knn_top1``, else the last value the record's metrics keep (at ``knn_epoch``'s step)."""
    hist = {int(r["step"]): float(r["knn_top1"]) for r in read_jsonl_rows(record)
            if isinstance(r.get("knn_top1"), (int, float))}
    if not hist:
        m = record.get("metrics") or {}
        if isinstance(m.get("knn_top1"), (int, float)) and isinstance(m.get("steps"), (int, float)):
            epochs = m.get("epochs") if isinstance(m.get("epochs"), (int, float)) and m.get("epochs") else None
            e = m.get("knn_epoch")
            step = m["steps"] if not (epochs and isinstance(e, (int, float))) else round(m["steps"] * e / epochs)
            hist[int(step)] = float(m["knn_top1"])
    return sorted(hist.items())


def learning_figure(records: list[Mapping], zoom: bool = False) -> Figure | None:
    """kNN top-1 against the pretraining step, one line per run (the kNN monitor's history, and the final
    ``python -m pretrain.knn`` number as a star at the run's last step), random init (``pretrain.knn --ckpt random``)
    and chance as horizontal lines; y from 0 unless ``zoom``."""

    pretrain = [r for r in records if r.get("kind") == "pretrain" and parse_sweep_name(str(r.get("name"))) is None]
    knn = [r for r in records if r.get("kind") == "knn" and isinstance((r.get("metrics") or {}).get("top1"),
                                                                       (int, float))]
    final: dict[str, list[float]] = {}
    random_init: list[float] = []
    for r in knn:
        pre = find_input(r, "pretrain")
        if pre is None:
            if str(r.get("name")) == "random":
                random_init.append(float(r["metrics"]["top1"]))
            continue
        final.setdefault(str(pre.get("name")), []).append(float(r["metrics"]["top1"]))
    runs = []
    for rec in pretrain:
        hist, name = knn_history(rec), str(rec.get("name"))
        steps = (rec.get("metrics") or {}).get("steps")
        if hist or name in final:
            method = str((rec.get("config") or {}).get("method") or name)
            runs.append((method_rank(method), name, method, hist, steps, final.get(name, [])))
    if not runs:
        return None
    runs.sort(key=lambda r: (r[0], r[1]))
    classes = [n for n in (count_classes(r) for r in [*knn, *pretrain]) if n]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(5.2, 3.4 + 0.2 * math.ceil((len(runs) + 3) / 2)))
        ax = fig.subplots()
        starred = False
        for i, (_, name, method, hist, steps, fin) in enumerate(runs):
            # more runs than the 10 default colours: tab20's, so no two runs share one (C3 stays random init's)
            color = f"C{i % 10}" if len(runs) <= 10 else matplotlib.colormaps["tab20"](i % 20)
            label = method_name(method) if name == method else f"{method_name(method)} ({name})"
            if hist:
                xs, ys = [h[0] for h in hist], [h[1] for h in hist]
                ax.plot(xs, ys, color=color, marker="o", ms=4, lw=1.2,
                        label=label + (" (one point)" if len(hist) == 1 else ""))
                label = None
            if fin and isinstance(steps, (int, float)):
                ax.plot([steps] * len(fin), fin, color=color, marker="*", ms=10, ls="none",
                        label=f"{label} (pretrain.knn, final)" if label
                        else None if starred else "* = pretrain.knn of the final checkpoint")
                starred = starred or label is None
        if random_init:
            m = sum(random_init) / len(random_init)
            ax.axhline(m, color="C3", ls=":", lw=1.2, label=f"random init {m:.3g} (n={len(random_init)})")
        if classes and len(set(classes)) == 1:
            c = 100.0 / classes[0]
            ax.axhline(c, color="0.45", ls="--", lw=1.0, label=f"chance {c:.3g} ({classes[0]} classes)")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("kNN top-1 (%)")
        if not zoom:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.05, 1.0))
        ax.set_xlim(left=0)
        data = "/".join(sorted({_data_tag(r) for r in pretrain}))
        ax.set_title(f"learning curves: kNN top-1 during pretraining ({data} data)", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        fig.tight_layout()
        return fig


def learning_curves(records: list[Mapping], out: Path, zoom: bool = False) -> list[Path]:
    """``knn_curves.png/.svg``: :func:`learning_figure` written to ``out``."""
    fig = learning_figure(records, zoom)
    return [] if fig is None else _save(fig, out, "knn_curves")


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


def write_plots(records: list[Mapping], df: pd.DataFrame, root: Path, out: Path, zoom: bool = False) -> list[Path]:
    """Every plot the records allow; returns the files written. ``zoom``: y axes fit the data (default: from 0)."""

    written: list[Path] = []
    pretrain = [r for r in records if r.get("kind") == "pretrain"]
    main = [r for r in pretrain if parse_sweep_name(str(r.get("name"))) is None]
    written += loss_curves(main, out, title="pretraining loss")
    written += learning_curves(records, out, zoom)
    by_sweep: dict[str, list[Mapping]] = {}
    for r in pretrain:
        parsed = parse_sweep_name(str(r.get("name")))
        if parsed is not None:
            by_sweep.setdefault(parsed[0], []).append(r)
    for sweep in sorted(by_sweep):
        written += sweep_loss_curves(sweep, by_sweep[sweep], out)
    sweeps = df[df["sweep"] != ""]
    baselines = df[df["method"] == "random"]
    classes = chance_levels(records)
    for sweep, g in sweeps.groupby("sweep", sort=True):
        written += ablation_curves(str(sweep), g, out, baselines, classes, zoom)
    for r in sorted((r for r in records if r.get("kind") == "bench"), key=lambda r: str(r.get("name"))):
        written += throughput_bars(r, out)
    return written
