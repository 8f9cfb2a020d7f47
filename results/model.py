"""The table model of ``results/``: what a built table is (``Table`` of ``Row``s of ``Cell``s under ``Column``s), the
methods' names and order, the headline numbers of each evaluation. The bottom of the package: the table builder
(``results.tables``), the renderers (``results.render``) and the plots (``results.plots``) sit on it; it imports none
of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

METHOD_ORDER = ("supervised", "random", "moco_v1", "co2_moco_v1", "moco_v2", "jcl", "jcl_official", "eqco", "simo",
                "co2")
METHOD_NAMES = {"supervised": "supervised", "random": "random init", "moco_v1": "MoCo v1",
                "co2_moco_v1": "CO2 (MoCo v1)", "moco_v2": "MoCo v2", "jcl": "JCL", "jcl_official": "JCL (official)",
                "eqco": "EqCo", "simo": "SiMo", "co2": "CO2 (MoCo v2)"}


@dataclass(frozen=True)
class Column:
    label: str  # Markdown / CSV header
    latex: str  # LaTeX header
    metric: str  # the record's metric key
    task: str | tuple[str, ...] | None = None  # None: the row's own task (tables with a task per row); a tuple: any
    # of these tasks (a row holds one of them: VOC detection from torchvision or MSRA weights)
    digits: int = 1  # decimals printed (papers print AP and top-1 with one)
    group: str = ""  # LaTeX: a header spanning the adjacent columns of the same group (CO2's column groups)

    @property
    def tasks(self) -> tuple[str, ...]:
        return () if self.task is None else (self.task,) if isinstance(self.task, str) else tuple(self.task)


# The numbers an ablation table (and its plot) shows for each evaluation a sweep ran, in this order.
HEADLINE = {"knn": ("top1",), "linear": ("top1", "top5"), "semisup_1pct": ("top1", "top5"),
            "semisup_10pct": ("top1", "top5"),
            "voc07_svm": ("cls/mAP",), "voc_det": ("bbox/AP50", "bbox/AP", "bbox/AP75"), "voc_seg": ("sem_seg/mIoU",),
            "coco_det": ("bbox/AP",), "coco_det_c4": ("bbox/AP",),
            "coco_det_c4_2x": ("bbox/AP",), "coco_mask": ("bbox/AP", "segm/AP"),
            "coco_mask_c4": ("bbox/AP", "segm/AP"), "coco_mask_c4_2x": ("bbox/AP", "segm/AP"),
            "coco_kp": ("keypoints/AP",), "coco_kp_2x": ("keypoints/AP",), "pretrain": ("loss_final",)}


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
    fields: dict[str, str]  # identity columns, by name (the protocol columns abbreviated at toy scale)
    cells: list[Cell]  # one per table column
    reported: bool  # a published number (True) or ours
    sort_key: tuple
    full: dict[str, str] = field(default_factory=dict)  # the CSV's text of a field where it differs (unabbreviated)


@dataclass
class Table:
    key: str
    title: str
    fields: list[str]  # identity columns shown before the numbers
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)  # identity columns shown after the numbers (the protocol)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def fmt_epochs(e: object) -> str:
    if e is None or e is pd.NA or (isinstance(e, float) and math.isnan(e)):
        return ""
    e = float(e)
    return str(int(e)) if e == int(e) else f"{e:g}"
