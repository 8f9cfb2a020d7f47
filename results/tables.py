"""Paper-style tables (Markdown, CSV, LaTeX) and plots from run records, reported numbers side by side.

    python -m results.tables --records outputs --out results/generated      # what `make tables` runs
    python -m results.tables --records outputs/demo --out results/demo      # what `make demo` runs at its end
    python -m results.tables --records DIR --out DIR --no-plots --print     # tables only, printed too

Reads every run record below ``--records`` (``results.records.iter_records``) and ``results/reported.csv``, writes
into ``--out``:

- ``<table>.md``, ``<table>.csv``, ``<table>.tex`` for ``linear``, ``semisup``, ``voc``, ``coco``, ``coco_kp`` and
  one ``ablation_<sweep>`` per sweep (``python -m ctbench.sweep``); ``tables.md`` holds them all;
- ``sources.csv``: every cell -> the record ids and paths (relative to ``--records``) or the published source it
  came from;
- ``plots/``: loss curves, ablation curves and throughput bars, PNG and SVG (``results.plots``).

Rules: a reproduced cell is the mean ± sample std over its trials (records with the same method, pretraining
config and evaluation config up to seeds and paths, on the same data); the ``data`` column says ``toy`` when the
number comes from the embedded toy datasets (marked †: it checks the pipeline, it is not a paper reproduction);
runs of a sweep appear only in their ablation table. The output is a pure function of the records: sorted, no
timestamps, byte-identical when regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ctbench import atomic
from ctbench.errors import UserError, cli_main
from results.collect import results_frame
from results.records import iter_records
from results.render import render_csv, render_latex, render_markdown, sources_rows, tex_escape
from results.reported import REPORTED_CSV, load_reported

METHOD_ORDER = ("supervised", "random", "moco_v1", "co2_moco_v1", "moco_v2", "jcl", "jcl_official", "eqco", "simo",
                "co2")
METHOD_NAMES = {"supervised": "supervised", "random": "random init", "moco_v1": "MoCo v1",
                "co2_moco_v1": "CO2 (MoCo v1)", "moco_v2": "MoCo v2", "jcl": "JCL", "jcl_official": "JCL (official)",
                "eqco": "EqCo", "simo": "SiMo", "co2": "CO2 (MoCo v2)"}
TOY_LEGEND = ("† toy data (the embedded toy datasets of `ctbench.toydata`; `mixed`: pretraining or evaluation "
              "on toy data; `unknown`: a record without dataset information): checks the pipeline end to end; "
              "not comparable with the published numbers.")


@dataclass(frozen=True)
class Column:
    label: str  # Markdown / CSV header
    latex: str  # LaTeX header
    metric: str  # the record's metric key
    task: str | None = None  # None: the row's own task (tables with a task per row)
    digits: int = 1  # decimals printed (papers print AP and top-1 with one)


@dataclass(frozen=True)
class TableSpec:
    key: str  # file stem
    title: str
    tasks: tuple[str, ...]
    columns: tuple[Column, ...]
    setting: str | None = None  # "protocol" or "task": shown as a column and part of a row's identity
    setting_label: str = ""
    note: str = ""


def _cols(prefix: str, tex: str, metric_prefix: str, task: str | None = None) -> tuple[Column, ...]:
    return (Column(f"{prefix}AP", f"AP$^{{{tex}}}$", f"{metric_prefix}/AP", task),
            Column(f"{prefix}AP50", f"AP$^{{{tex}}}_{{50}}$", f"{metric_prefix}/AP50", task),
            Column(f"{prefix}AP75", f"AP$^{{{tex}}}_{{75}}$", f"{metric_prefix}/AP75", task))


MAIN_TABLES = (
    TableSpec("linear", "ImageNet linear classification (frozen backbone): top-1 / top-5", ("linear",),
              (Column("top-1", "top-1", "top1"), Column("top-5", "top-5", "top5")),
              setting="protocol", setting_label="probe",
              note="probe: `cached` = head trained on cached frozen features, `standard` = MoCo's main_lincls, "
                   "`+bn` = features BatchNorm-standardised before the head (MAE's probe; the toy preset); "
                   "the published numbers use the standard protocol."),
    TableSpec("semisup", "Semi-supervised ImageNet (1 % / 10 % labels): top-1 / top-5",
              ("semisup_1pct", "semisup_10pct"),
              (Column("1% top-1", r"1\% top-1", "top1", "semisup_1pct"),
               Column("1% top-5", r"1\% top-5", "top5", "semisup_1pct"),
               Column("10% top-1", r"10\% top-1", "top1", "semisup_10pct"),
               Column("10% top-5", r"10\% top-5", "top5", "semisup_10pct"))),
    TableSpec("voc", "PASCAL VOC07+12 detection (Faster R-CNN R50-C4): AP50 / AP / AP75", ("voc_det",),
              (Column("AP50", "AP$_{50}$", "bbox/AP50"), Column("AP", "AP", "bbox/AP"),
               Column("AP75", "AP$_{75}$", "bbox/AP75")),
              note="MoCo reports VOC as the mean of 5 trials (std about 0.2 AP)."),
    TableSpec("coco", "COCO detection and instance segmentation: box and mask AP",
              ("coco_det", "coco_mask", "coco_det_c4", "coco_mask_c4"),
              _cols("box ", "bb", "bbox") + _cols("mask ", "mk", "segm"), setting="task", setting_label="task",
              note="task: `coco_det`/`coco_mask` = Faster/Mask R-CNN R50-FPN, `_c4` = R50-C4."),
    TableSpec("coco_kp", "COCO keypoint detection (Keypoint R-CNN R50-FPN): keypoint AP", ("coco_kp",),
              _cols("kp ", "kp", "keypoints")),
)

# The numbers an ablation table shows for each evaluation a sweep ran, in this order.
HEADLINE = {"linear": ("top1", "top5"), "semisup_1pct": ("top1", "top5"), "semisup_10pct": ("top1", "top5"),
            "voc_det": ("bbox/AP50", "bbox/AP", "bbox/AP75"), "coco_det": ("bbox/AP",), "coco_det_c4": ("bbox/AP",),
            "coco_mask": ("bbox/AP", "segm/AP"), "coco_mask_c4": ("bbox/AP", "segm/AP"),
            "coco_kp": ("keypoints/AP",), "pretrain": ("loss_final",)}


@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None
    n: int = 0
    record_ids: tuple[str, ...] = ()
    records: tuple[str, ...] = ()
    source: str = ""  # reported numbers: the publication


@dataclass
class Row:
    method: str  # method key (moco_v2, random, ...)
    fields: dict[str, str]  # identity columns, by name
    cells: list[Cell]  # one per table column
    reported: bool  # a published number (True) or ours
    sort_key: tuple


@dataclass
class Table:
    key: str
    title: str
    fields: list[str]  # identity columns shown before the numbers
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def fmt_epochs(e: object) -> str:
    if e is None or e is pd.NA or (isinstance(e, float) and math.isnan(e)):
        return ""
    e = float(e)
    return str(int(e)) if e == int(e) else f"{e:g}"


def _cell(values: pd.DataFrame) -> Cell:
    v = values.sort_values(["record", "record_id"])
    xs = [float(x) for x in v["value"]]
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return Cell(mean, std, n, tuple(v["record_id"]), tuple(v["record"]))


def _reproduced_rows(spec: TableSpec, df: pd.DataFrame) -> list[Row]:
    sub = df[df["task"].isin(spec.tasks) & (df["sweep"] == "") & (df["kind"] != "pretrain")]
    keys = ["method", "pgroup", "egroup", "data"] + (["task"] if spec.setting == "task" else []) \
        + (["protocol"] if spec.setting == "protocol" else [])
    rows = []
    for ident, g in sub.groupby(keys, sort=True, dropna=False):
        ident = dict(zip(keys, ident if isinstance(ident, tuple) else (ident,)))
        cells = []
        for col in spec.columns:
            sel = g[g["metric"] == col.metric]
            if col.task is not None:
                sel = sel[sel["task"] == col.task]
            cells.append(_cell(sel) if len(sel) else Cell())
        if not any(c.n for c in cells):
            continue
        epochs = sorted({fmt_epochs(e) for e in g["epochs"]})
        runs = sorted(set(g["run"]))
        setting = str(ident.get(spec.setting, "")) if spec.setting else ""
        fields = {"method": method_name(ident["method"]), "run": ", ".join(runs), "epochs": "/".join(epochs),
                  "source": "ours", "data": ident["data"],
                  "setting": setting}
        sort_key = (method_rank(ident["method"]), 1, ident["data"] != "real", ident["data"], setting,
                    ", ".join(runs), "/".join(epochs), ident["pgroup"], ident["egroup"])
        rows.append(Row(ident["method"], fields, cells, False, sort_key))
    return rows


def _reported_rows(spec: TableSpec, reported: pd.DataFrame) -> list[Row]:
    sub = reported[reported["task"].isin(spec.tasks)]
    keys = ["method", "epochs"] + (["task"] if spec.setting == "task" else [])
    rows = []
    for ident, g in sub.groupby(keys, sort=True, dropna=False):
        ident = dict(zip(keys, ident))
        cells = []
        for col in spec.columns:
            sel = g[g["metric"] == col.metric]
            if col.task is not None:
                sel = sel[sel["task"] == col.task]
            if len(sel):
                r = sel.iloc[0]
                cells.append(Cell(float(r["value"]), source=_source_text(r)))
            else:
                cells.append(Cell())
        epochs = fmt_epochs(ident["epochs"])
        setting = str(ident.get("task", "")) if spec.setting == "task" else ("standard" if spec.setting else "")
        fields = {"method": method_name(ident["method"]), "run": "", "epochs": epochs, "source": "paper",
                  "data": "real", "setting": setting}
        rows.append(Row(ident["method"], fields, cells, True, (method_rank(ident["method"]), 0, setting, epochs)))
    return rows


def _source_text(r: pd.Series) -> str:
    parts = [str(r["source"])]
    if r.get("protocol"):
        parts.append(f"protocol: {r['protocol']}")
    if r.get("note"):
        parts.append(str(r["note"]))
    return "; ".join(parts)


def build_table(spec: TableSpec, df: pd.DataFrame, reported: pd.DataFrame) -> Table:
    rows = sorted(_reported_rows(spec, reported) + _reproduced_rows(spec, df), key=lambda r: r.sort_key)
    show_run = any(r.fields["run"] != r.method for r in rows if not r.reported)
    setting = spec.setting_label or spec.setting
    for r in rows:
        value = r.fields.pop("setting")
        if spec.setting:
            r.fields[setting] = value
    fields = ["method"] + (["run"] if show_run else []) + ["epochs"] + ([setting] if spec.setting else []) \
        + ["source", "data"]
    notes = [spec.note, TOY_LEGEND if any(r.fields["data"] != "real" for r in rows) else ""]
    return Table(spec.key, spec.title, fields, list(spec.columns), rows, [n for n in notes if n])


def build_ablations(df: pd.DataFrame) -> list[Table]:
    """One table per sweep: a row per swept setting, a column per headline number of each evaluation it ran."""
    tables = []
    sweeps = df[df["sweep"] != ""]
    for sweep, g in sweeps.groupby("sweep", sort=True):
        keys = sorted({k for s in g["swept"] for k in json.loads(s)})
        tasks = sorted(set(g["task"]), key=lambda t: (list(HEADLINE).index(t) if t in HEADLINE else len(HEADLINE), t))
        columns = [Column(f"{t} {m}" if t != "pretrain" else m, tex_escape(f"{t} {m}" if t != "pretrain" else m),
                          m, t, 3 if m.startswith("loss") else 1)
                   for t in tasks for m in HEADLINE.get(t, ()) if (g["metric"][g["task"] == t] == m).any()]
        methods = sorted(set(g["method"]), key=method_rank)
        rows = []
        for (pgroup, data), rg in g.groupby(["pgroup", "data"], sort=True):
            swept = json.loads(rg["swept"].iloc[0])
            cells = []
            for col in columns:
                sel = rg[(rg["task"] == col.task) & (rg["metric"] == col.metric)]
                cells.append(_cell(sel) if len(sel) else Cell())
            method = rg["method"].iloc[0]
            fields = {"method": method_name(method), **{k: _fmt_value(swept.get(k)) for k in keys},
                      "epochs": "/".join(sorted({fmt_epochs(e) for e in rg["epochs"]})), "source": "ours",
                      "data": data}
            sort_key = (method_rank(method), tuple(_sortable(swept.get(k)) for k in keys), data, pgroup)
            rows.append(Row(method, fields, cells, False, sort_key))
        rows.sort(key=lambda r: r.sort_key)
        title = f"Ablation `{sweep}`: {', '.join(method_name(m) for m in methods)} over {', '.join(keys)}"
        t = Table(f"ablation_{sweep}", title, ["method", *keys, "epochs", "source", "data"], columns, rows)
        if any(r.fields["data"] != "real" for r in rows):
            t.notes.append(TOY_LEGEND)
        tables.append(t)
    return tables


def _fmt_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _sortable(v: object) -> tuple:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return (1, 0.0, str(v))
    return (0, float(v), "")


def build_tables(df: pd.DataFrame, reported: pd.DataFrame) -> list[Table]:
    return [build_table(spec, df, reported) for spec in MAIN_TABLES] + build_ablations(df)


def write_tables(tables: Iterable[Table], out: Path) -> list[Path]:
    """``<key>.md/.csv/.tex`` per table, ``tables.md`` with all, ``sources.csv`` with every cell's origin."""
    tables = list(tables)
    written = []
    for t in tables:
        for ext, text in (("md", render_markdown(t)), ("csv", render_csv(t)), ("tex", render_latex(t))):
            atomic.write_text(out / f"{t.key}.{ext}", text)
            written.append(out / f"{t.key}.{ext}")
    header = "# Results\n\nGenerated by `python -m results.tables` from run records; do not edit.\n\n"
    atomic.write_text(out / "tables.md", header + "\n".join(render_markdown(t, level=2) for t in tables))
    src = pd.DataFrame([r for t in tables for r in sources_rows(t)],
                       columns=["table", "row", "column", "value", "std", "n", "origin", "record_ids", "records",
                                "source"])
    atomic.write_text(out / "sources.csv", src.to_csv(index=False, lineterminator="\n"))
    written += [out / "tables.md", out / "sources.csv"]
    return written


def main_tables_text(tables: Iterable[Table]) -> str:
    """The main tables as Markdown (what the demo prints at its end)."""
    return "\n".join(render_markdown(t, level=3, footnotes=False) for t in tables)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m results.tables", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0],
                                epilog="Outputs: <out>/{tables.md, sources.csv, <table>.md|csv|tex, plots/}.")
    p.add_argument("--records", type=Path, required=True, help="directory searched (recursively) for record.json")
    p.add_argument("--out", type=Path, required=True, help="output directory for tables and plots")
    p.add_argument("--reported", type=Path, default=REPORTED_CSV, help="published numbers (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--print", action="store_true", help="print the main tables (Markdown) after writing them")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.records.is_dir():
        raise UserError(f"--records {args.records}: not a directory (run something first, e.g. `make demo`)")
    records = list(iter_records(args.records))
    reported = load_reported(args.reported)
    df = results_frame(args.records, records)
    tables = build_tables(df, reported)
    written = write_tables(tables, args.out)
    if not args.no_plots:
        from results.plots import write_plots

        written += write_plots(records, df, args.records, args.out / "plots")
    n_cells = sum(c.n > 0 and not r.reported for t in tables for r in t.rows for c in r.cells)
    print(f"{len(records)} records -> {len(tables)} tables ({n_cells} reproduced cells), {len(written)} files in "
          f"{args.out}", flush=True)
    if args.print:
        print(main_tables_text(tables[:len(MAIN_TABLES)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
