"""Paper-style tables (Markdown, CSV, LaTeX) and plots from run records, reported numbers side by side.

    python -m results.tables --records outputs --out results/generated      # what `make tables` runs
    python -m results.tables --records outputs/demo --out results/demo      # what `make demo` runs at its end
    python -m results.tables --records DIR --out DIR --no-plots --print     # tables only, printed too

Reads every run record below ``--records`` (``ctbench.records.iter_records``) and ``results/reported.csv``, writes
into ``--out``:

- ``<table>.md``, ``<table>.csv``, ``<table>.tex`` for ``linear``, ``semisup``, ``voc`` (detection), ``voc_transfer``
  (CO2's Table 3: VOC07 SVM classification, detection, segmentation), ``coco`` (1x and MoCo's 2x ``_c4_2x``),
  ``coco_kp`` (1x and 2x) and one ``ablation_<sweep>`` per sweep (``python -m orchestrate.sweep``); ``tables.md`` holds
  them all;
- ``sources.csv``: every cell -> the record ids and paths (relative to ``--records``) or the published source it
  came from;
- ``plots/``: loss curves, ablation curves and throughput bars, PNG and SVG (``results.plots``).

Rules: a table row is one protocol. A reproduced cell is the mean ± sample std over its trials: records with the
same method, pretraining config and evaluation config up to seeds and paths (``results.collect.VOLATILE_KEYS``),
the same ``protocol.deviations`` in the evaluation and the pretraining record, on the same data. The
``pretraining`` and ``evaluation`` columns print those deviations (``as published`` when there are none,
``unrecorded`` for a record without a ``protocol``; at toy scale the size and schedule changes are counted, the CSV
lists them all); a paper row prints the protocol ``reported.csv`` gives it. The semi-supervised table has one row
per method and pretraining, the 1 % and 10 % runs (each its own evaluation config) in its columns; so has the VOC
transfer table, with the classification, detection and segmentation runs of one pretraining. The ``data``
column says ``toy`` when the number comes from the embedded toy datasets (marked †: it checks the pipeline, it is
not a paper reproduction); runs of a sweep appear only in their ablation table. The output is a pure function of
the records: sorted, no timestamps, byte-identical when regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctbench import atomic
from ctbench.errors import UserError, cli_main
from ctbench.records import iter_records
from results.collect import results_frame
from results.model import HEADLINE, Cell, Column, Row, Table, fmt_epochs, method_name, method_rank
from results.render import render_csv, render_latex, render_markdown, sources_rows, tex_escape
from results.reported import REPORTED_CSV, load_reported

# The method label of the rows of a task that names its weights (MoCo's supervised VOC row: detectron2's MSRA
# R-50.pkl with the BGR/caffe config, facebookresearch/moco@132aea9 detection/configs/pascal_voc_R_50_C4_24k.yaml).
SUPERVISED_MSRA_TASK = "voc_det_supervised_msra"
TASK_VARIANTS = {SUPERVISED_MSRA_TASK: "MSRA R-50.pkl"}
VOC_DET_TASKS = ("voc_det", SUPERVISED_MSRA_TASK)  # a row's detection columns: one of them (the row's weights)
# Detection schedules as the records name them (transfer.detection's Task.schedule), with detectron2's iterations
# (MoCo's configs: 1x = 90k, 2x = 180k; VOC 24k); the keypoint table prints them. TASK_SCHEDULE: for a record that
# does not say.
SCHEDULES = {"1x": "1x (90k)", "2x": "2x (180k)", "24k": "24k"}
TASK_SCHEDULE = {"coco_kp": "1x", "coco_kp_2x": "2x"}
# A per-task protocol in a row of several tasks (semi-supervised 1 % / 10 %; VOC classification / detection /
# segmentation).
TASK_SHORT = {"semisup_1pct": "1 %", "semisup_10pct": "10 %", "voc07_svm": "cls", "voc_det": "det",
              SUPERVISED_MSRA_TASK: "det", "voc_seg": "seg"}
TOY = "toy scale"  # the first deviation of every toy-scale run (the protocol contract)
NO_PRETRAINING = "–"
PROTOCOL_LEGEND = ("pretraining / evaluation: how the run departs from the published recipe (the records' "
                   "`protocol.deviations`); `as published`: not at all; `unrecorded`: a record without a protocol; "
                   "`toy scale (+N size/schedule changes)`: N changes of sizes and schedule by the toy preset, listed "
                   "in the CSV; paper rows: the protocol of the published number.")
TOY_LEGEND = ("† toy data (the embedded toy datasets of `ctbench.toydata`; `mixed`: pretraining or evaluation "
              "on toy data; `unknown`: a record without dataset information): checks the pipeline end to end; "
              "not comparable with the published numbers.")


@dataclass(frozen=True)
class TableSpec:
    key: str  # file stem
    title: str
    tasks: tuple[str, ...]
    columns: tuple[Column, ...]
    setting: str | None = None  # "protocol", "task" or "schedule": shown as a column and part of a row's identity
    setting_label: str = ""
    note: str = ""

    @property
    def per_column(self) -> bool:
        """Every column names its task (semi-supervised 1 % / 10 %, VOC cls / det / seg): a row holds one run of each
        task's own config, for one pretraining."""
        return all(c.task is not None for c in self.columns)


def _cols(prefix: str, tex: str, metric_prefix: str, task: str | None = None) -> tuple[Column, ...]:
    return (Column(f"{prefix}AP", f"AP$^{{{tex}}}$", f"{metric_prefix}/AP", task),
            Column(f"{prefix}AP50", f"AP$^{{{tex}}}_{{50}}$", f"{metric_prefix}/AP50", task),
            Column(f"{prefix}AP75", f"AP$^{{{tex}}}_{{75}}$", f"{metric_prefix}/AP75", task))


MAIN_TABLES = (
    TableSpec("pretraining", "Pretraining runs: final loss, throughput, cost, kNN top-1", ("pretrain", "knn"),
              (Column("loss", "loss", "loss_final", "pretrain", digits=3),
               Column("img/s", "img/s", "img_per_s", "pretrain"),
               Column("train h", "train h", "train_h", "pretrain", digits=2),
               Column("GPU-h", "GPU-h", "gpu_hours", "pretrain"),
               Column("kNN (monitor)", "kNN (monitor)", "knn_top1", "pretrain"),
               Column("kNN top-1", "kNN top-1", "top1", "knn")),
              note="loss: the mean of the last logged steps (`loss_final`); img/s: images per second of training, all "
                   "processes together; train h: hours of training (wall clock); GPU-h: train h x GPUs (GPU runs "
                   "only); kNN (monitor): the pretraining run's own kNN monitor at its last evaluation "
                   "(`monitor.knn_every`); kNN top-1: `python -m pretrain.knn` on the final checkpoint (weighted "
                   "kNN, InstDisc Sec. 3.4, k 20, t 0.07, on the val images)."),
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
    TableSpec("voc", "PASCAL VOC07+12 detection (Faster R-CNN R50-C4, 24k): AP50 / AP / AP75",
              ("voc_det", SUPERVISED_MSRA_TASK),
              (Column("AP50", "AP$_{50}$", "bbox/AP50"), Column("AP", "AP", "bbox/AP"),
               Column("AP75", "AP$_{75}$", "bbox/AP75")),
              note="MoCo reports VOC as the mean of 5 trials (std about 0.2 AP). `supervised (MSRA R-50.pkl)`: "
                   "detectron2's MSRA R-50.pkl with MoCo's BGR/caffe config (task `voc_det_supervised_msra`: "
                   "facebookresearch/moco@132aea9 detection/configs/pascal_voc_R_50_C4_24k.yaml), the weights of "
                   "MoCo's supervised row; `supervised` on `voc_det`: torchvision weights."),
    TableSpec("voc_transfer", "PASCAL VOC transfer (CO2's Table 3): classification mAP | detection AP50 / AP / AP75 | "
              "segmentation mIoU", ("voc07_svm", *VOC_DET_TASKS, "voc_seg"),
              (Column("cls mAP", "mAP", "cls/mAP", "voc07_svm", group="classification"),
               Column("AP50", "AP$_{50}$", "bbox/AP50", VOC_DET_TASKS, group="detection"),
               Column("AP", "AP", "bbox/AP", VOC_DET_TASKS, group="detection"),
               Column("AP75", "AP$_{75}$", "bbox/AP75", VOC_DET_TASKS, group="detection"),
               Column("mIoU", "mIoU", "sem_seg/mIoU", "voc_seg", group="segmentation")),
              note="CO2's column groups: `cls mAP` = VOC07 classification, linear SVMs on frozen res5 features, mAP "
                   "over the 20 classes (task `voc07_svm`); `AP50 AP AP75` = Faster R-CNN R50-C4 on VOC07+12, 24k "
                   "(task `voc_det`; `voc_det_supervised_msra` for `supervised (MSRA R-50.pkl)`); `mIoU` = VOC12 "
                   "semantic segmentation (task `voc_seg`). A row joins the three evaluations of one pretraining "
                   "(method, pretraining config and protocol, data), each cell from its own records and trials "
                   "(`n`); MoCo reports detection and segmentation as the mean of 5 trials. `MoCo v1 (CO2's impl.)`: "
                   "the MoCo baseline CO2's authors trained; `MoCo v1 (reported by MoCo)`: MoCo's own numbers; "
                   "`MoCo v2 (mmselfsup)`: mmselfsup's MoCo v2 and SVM benchmark. CO2's supervised row is `supervised` "
                   "(classification, segmentation) with MoCo's `supervised (MSRA R-50.pkl)` detection numbers; ours: "
                   "`supervised` = torchvision weights."),
    TableSpec("coco", "COCO detection and instance segmentation: box and mask AP",
              ("coco_det", "coco_mask", "coco_det_c4", "coco_mask_c4", "coco_det_c4_2x", "coco_mask_c4_2x"),
              _cols("box ", "bb", "bbox") + _cols("mask ", "mk", "segm"), setting="task", setting_label="task",
              note="task: `coco_det`/`coco_mask` = Faster/Mask R-CNN R50-FPN, `_c4` = R50-C4; 1x schedule (90k "
                   "iterations) unless `_2x` (180k, steps 120k/160k: MoCo's COCO setting, "
                   "facebookresearch/moco@132aea9 detection/configs/coco_R_50_C4_2x_moco.yaml)."),
    TableSpec("coco_kp", "COCO keypoint detection (Keypoint R-CNN R50-FPN): keypoint AP", ("coco_kp", "coco_kp_2x"),
              _cols("kp ", "kp", "keypoints"), setting="schedule", setting_label="schedule",
              note="schedule: `1x` (task `coco_kp`, 90k iterations, the schedule JCL reports) or `2x` (task "
                   "`coco_kp_2x`, 180k, steps 120k/160k: MoCo's keypoint result, paper Table 6; "
                   "open-mmlab/OpenSelfSup@1db69ec benchmarks/detection/configs/keypoint_rcnn_R_50_FPN_2x_moco.yaml)."),
)

def method_label(method: str, tasks: Iterable[str], variant: str = "") -> str:
    """The method column: its name, with the weights a task names (``supervised (MSRA R-50.pkl)``) and a reported
    row's ``variant`` (``MoCo v1 (CO2's impl.)``)."""
    variants = sorted({TASK_VARIANTS[t] for t in tasks if t in TASK_VARIANTS}) + ([variant] if variant else [])
    return method_name(method) + (f" ({', '.join(variants)})" if variants else "")


def _weights(tasks: pd.Series) -> list[str]:
    """Per frame row the weights its task names (``TASK_VARIANTS``; empty for most): part of a row's identity, so a
    row never joins the runs of two kinds of weights (torchvision and MSRA supervised)."""
    return [TASK_VARIANTS.get(t, "") for t in tasks]


def _select(g: pd.DataFrame, col: Column) -> pd.DataFrame:
    sel = g[g["metric"] == col.metric]
    return sel[sel["task"].isin(col.tasks)] if col.task is not None else sel


def _size_or_schedule(deviation: str) -> bool:
    """A deviation that changes a number of the recipe (``200 -> 2 epochs``, ``batch 256 -> 32``,
    ``data.image_size 224 -> 64``): what a toy preset shrinks. Swaps such as ``naiveSyncBN -> BN`` are not."""
    before, arrow, after = deviation.partition(" -> ")
    return bool(arrow) and any(c.isdigit() for c in before) and any(c.isdigit() for c in after)


def protocol_text(deviations: list[str] | None, short: bool = True) -> str:
    """A protocol column's text: ``as published`` (no deviation), ``unrecorded`` (``None``), else the deviations
    joined by ``; ``; ``short``: at toy scale the size and schedule changes are counted, not listed."""
    if deviations is None:
        return "unrecorded"
    if not deviations:
        return "as published"
    items = list(deviations)
    if short and TOY in items:
        rest = [d for d in items if d != TOY]
        kept = [d for d in rest if not _size_or_schedule(d)]
        n = len(rest) - len(kept)
        items = [TOY + (f" (+{n} size/schedule change{'s' if n > 1 else ''})" if n else ""), *kept]
    return "; ".join(items)


def _deviations_json(text: str) -> list[str] | None:
    return json.loads(text) if text else None


def pretraining_text(values: Iterable[str], short: bool = True) -> str:
    """The pretraining column of a row from its ``pre_protocol`` values (empty: a baseline, no pretraining)."""
    texts = sorted({protocol_text(_deviations_json(v), short) if v else NO_PRETRAINING for v in values})
    return " / ".join(texts)


def per_task_text(per_task: dict[str, str], order: Iterable[str]) -> str:
    """One text when the row's tasks agree, else ``1 %: ... / 10 %: ...`` (``cls: ... / det: ... / seg: ...``) in
    the table's task order."""
    order = list(order)
    if len(set(per_task.values())) <= 1:
        return next(iter(per_task.values()), "")
    tasks = sorted(per_task, key=lambda t: (order.index(t) if t in order else len(order), t))
    return " / ".join(f"{TASK_SHORT.get(t, t)}: {per_task[t]}" for t in tasks)


def evaluation_text(g: pd.DataFrame, order: Iterable[str], short: bool = True) -> str:
    """The evaluation column of a row: one text, or one per task where the row's tasks differ."""
    per_task = {}
    for task, tg in g.groupby("task", sort=True):
        if task == "pretrain":  # the pretraining's own numbers: no evaluation (its protocol is the other column)
            continue
        per_task[task] = " / ".join(sorted({protocol_text(_deviations_json(v) if v else None, short)
                                            for v in tg["eval_protocol"]}))
    return per_task_text(per_task, order) if per_task else NO_PRETRAINING


def schedule_label(schedule: str, task: str) -> str:
    s = schedule or TASK_SCHEDULE.get(task, "")
    return SCHEDULES.get(s, s)


def _cell(values: pd.DataFrame) -> Cell:
    v = values.sort_values(["record", "record_id"])
    xs = [float(x) for x in v["value"]]
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return Cell(mean, std, n, tuple(v["record_id"]), tuple(v["record"]))


def _split_configs(g: pd.DataFrame) -> list[pd.DataFrame]:
    """A row of several tasks (semi-supervised 1 % and 10 %) holds one evaluation config per task; where a task ran
    with several, each (task, config) gets a row of its own rather than being averaged with another config."""
    if (g.groupby("task")["egroup"].nunique() <= 1).all():
        return [g]
    return [part for _, part in g.groupby(["task", "egroup"], sort=True)]


def _task_rank(spec: TableSpec, task: object) -> int:
    return spec.tasks.index(task) if task in spec.tasks else len(spec.tasks)


def _reproduced_rows(spec: TableSpec, df: pd.DataFrame) -> list[Row]:
    sub = df[df["task"].isin(spec.tasks) & (df["sweep"] == "")
             & ((df["kind"] != "pretrain") | ("pretrain" in spec.tasks))]
    sub = sub.assign(weights=_weights(sub["task"]))
    keys = ["method", "pgroup", "data", "weights"] + ([] if spec.per_column else ["task", "egroup"]) \
        + (["protocol"] if spec.setting == "protocol" else []) + (["schedule"] if spec.setting == "schedule" else [])
    rows = []
    for ident, group in sub.groupby(keys, sort=True, dropna=False):
        ident = dict(zip(keys, ident if isinstance(ident, tuple) else (ident,)))
        for g in _split_configs(group) if spec.per_column else [group]:
            cells = []
            for col in spec.columns:
                sel = _select(g, col)
                cells.append(_cell(sel) if len(sel) else Cell())
            if not any(c.n for c in cells):
                continue
            epochs = sorted({fmt_epochs(e) for e in g["epochs"]})
            runs = sorted(set(g["run"]))
            setting = ""
            if spec.setting == "schedule":
                setting = schedule_label(str(ident["schedule"]), str(ident["task"]))
            elif spec.setting:
                setting = str(ident.get(spec.setting, ""))
            pre, ev = pretraining_text(g["pre_protocol"]), evaluation_text(g, spec.tasks)
            full = {"pretraining": pretraining_text(g["pre_protocol"], short=False),
                    "evaluation": evaluation_text(g, spec.tasks, short=False)}
            fields = {"method": method_label(ident["method"], set(g["task"])), "run": ", ".join(runs),
                      "epochs": "/".join(epochs), "source": "ours", "data": ident["data"], "setting": setting,
                      "pretraining": pre, "evaluation": ev}
            sort_key = (method_rank(ident["method"]), 1, fields["method"], ident["data"] != "real", ident["data"],
                        _task_rank(spec, ident.get("task")), setting, ", ".join(runs), "/".join(epochs),
                        full["pretraining"], full["evaluation"], ident["pgroup"], ",".join(sorted(set(g["egroup"]))))
            rows.append(Row(ident["method"], fields, cells, False, sort_key, full))
    return rows


def _reported_rows(spec: TableSpec, reported: pd.DataFrame) -> list[Row]:
    sub = reported[reported["task"].isin(spec.tasks)]
    sub = sub.assign(weights=_weights(sub["task"]))
    # a per-column table joins a method's (and variant's) numbers of every task in one row, each with its protocol
    keys = ["method", "variant", "epochs", "weights"] + ([] if spec.per_column else ["protocol", "task"])
    rows = []
    for ident, g in sub.groupby(keys, sort=True, dropna=False):
        ident = dict(zip(keys, ident))
        cells = []
        for col in spec.columns:
            sel = _select(g, col)
            if len(sel):
                r = sel.iloc[0]
                cells.append(Cell(float(r["value"]), source=_source_text(r)))
            else:
                cells.append(Cell())
        epochs = fmt_epochs(ident["epochs"])
        setting = {"task": str(ident.get("task", "")), "protocol": "standard",
                   "schedule": schedule_label("", str(ident.get("task", ""))), None: ""}[spec.setting]
        label = method_label(ident["method"], set(g["task"]), str(ident["variant"]))
        protocols = {t: " / ".join(sorted({str(p) or "as published" for p in tg["protocol"]}))
                     for t, tg in g.groupby("task", sort=True)}
        evaluation = per_task_text(protocols, spec.tasks)
        fields = {"method": label, "run": "", "epochs": epochs, "source": "paper", "data": "real",
                  "setting": setting, "pretraining": "as published" if epochs else NO_PRETRAINING,
                  "evaluation": evaluation}
        rows.append(Row(ident["method"], fields, cells, True,
                        (method_rank(ident["method"]), 0, label, _task_rank(spec, ident.get("task")), setting, epochs,
                         evaluation)))
    return rows


def _source_text(r: pd.Series) -> str:
    parts = [str(r["source"])]
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
    notes = [spec.note, PROTOCOL_LEGEND if rows else "",
             TOY_LEGEND if any(r.fields["data"] != "real" for r in rows) else ""]
    return Table(spec.key, spec.title, fields, list(spec.columns), rows, [n for n in notes if n],
                 trailing=["pretraining", "evaluation"])


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
        for (pgroup, data), group in g.groupby(["pgroup", "data"], sort=True):
            pre, evals = group[group["kind"] == "pretrain"], group[group["kind"] != "pretrain"]
            for part in _split_configs(evals) if len(evals) else [evals]:
                rg = pd.concat([pre, part])
                swept = json.loads(rg["swept"].iloc[0])
                cells = []
                for col in columns:
                    sel = rg[(rg["task"] == col.task) & (rg["metric"] == col.metric)]
                    cells.append(_cell(sel) if len(sel) else Cell())
                method = rg["method"].iloc[0]
                full = {"pretraining": pretraining_text(rg["pre_protocol"], short=False),
                        "evaluation": evaluation_text(part, tasks, short=False) if len(part) else ""}
                fields = {"method": method_name(method), **{k: _fmt_value(swept.get(k)) for k in keys},
                          "epochs": "/".join(sorted({fmt_epochs(e) for e in rg["epochs"]})), "source": "ours",
                          "data": data, "pretraining": pretraining_text(rg["pre_protocol"]),
                          "evaluation": evaluation_text(part, tasks) if len(part) else ""}
                sort_key = (method_rank(method), tuple(_sortable(swept.get(k)) for k in keys), data,
                            full["pretraining"], full["evaluation"], pgroup, ",".join(sorted(set(part["egroup"]))))
                rows.append(Row(method, fields, cells, False, sort_key, full))
        rows.sort(key=lambda r: r.sort_key)
        title = f"Ablation `{sweep}`: {', '.join(method_name(m) for m in methods)} over {', '.join(keys)}"
        t = Table(f"ablation_{sweep}", title, ["method", *keys, "epochs", "source", "data"], columns, rows,
                  [PROTOCOL_LEGEND], trailing=["pretraining", "evaluation"])
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
    p.add_argument("--zoom", action="store_true",
                   help="plots: y axes fit the data (default: from 0, with chance and random init drawn)")
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

        written += write_plots(records, df, args.records, args.out / "plots", zoom=args.zoom)
    n_cells = sum(c.n > 0 and not r.reported for t in tables for r in t.rows for c in r.cells)
    print(f"{len(records)} records -> {len(tables)} tables ({n_cells} reproduced cells), {len(written)} files in "
          f"{args.out}", flush=True)
    if args.print:
        print(main_tables_text(tables[:len(MAIN_TABLES)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
