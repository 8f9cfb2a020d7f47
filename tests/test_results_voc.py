"""The PASCAL VOC transfer table (CO2's Table 3): VOC07 SVM classification | VOC07+12 detection | VOC12 segmentation,
one row per pretraining joining the three evaluations, CO2's reported rows with their sources, the two reported
MoCo v1 rows told apart (fixtures: tests/fixtures/records, see make_records.py)."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import pandas as pd
import pytest

from ctbench.errors import UserError
from ctbench.records import iter_records, load_record
from results import reported as rep
from results import tables
from results.collect import results_frame

FIXTURES = Path(__file__).parent / "fixtures" / "records"
REPORTED = rep.load_reported()
T3 = "Table 3 (transfer learning performance on PASCAL VOC)"
MOCO_DET = "MoCo detection README"
# CO2's Table 3 as its slides give it (cls mAP, AP50, AP, AP75, mIoU; None: not in the table) and where each group
# of a row comes from: CO2's slides, or MoCo's detection README for the numbers MoCo published
TABLE3 = {
    "supervised": ((88.0, None, None, None, 74.4), (T3, None, T3)),
    "supervised (MSRA R-50.pkl)": ((None, 81.3, 53.5, 58.8, None), (None, MOCO_DET, None)),
    "MoCo v1 (reported by MoCo)": ((None, 81.5, 55.9, 62.6, 72.5), (None, MOCO_DET, T3)),
    "MoCo v1 (CO2's impl.)": ((79.7, 81.6, 56.2, 62.4, 72.6), (T3, T3, T3)),
    "CO2 (MoCo v1)": ((82.6, 81.9, 56.0, 62.6, 73.3), (T3, T3, T3)),
    "MoCo v2": ((85.0, 82.4, 57.0, 63.6, 74.2), (T3, MOCO_DET, T3)),
    "CO2 (MoCo v2)": ((85.2, 82.7, 57.2, 64.1, 74.7), (T3, T3, T3)),
}


@pytest.fixture(scope="module")
def voc() -> tables.Table:
    return {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}["voc_transfer"]


def _table(records: list[dict]) -> tables.Table:
    spec = next(s for s in tables.MAIN_TABLES if s.key == "voc_transfer")
    return tables.build_table(spec, results_frame(FIXTURES, records), REPORTED)


def _ours(t: tables.Table, method: str) -> list[tables.Row]:
    return [r for r in t.rows if r.method == method and not r.reported]


def _rel(rec: dict) -> str:
    return Path(rec["_path"]).relative_to(FIXTURES).as_posix()


def test_columns_are_co2s_groups(voc):
    assert [c.label for c in voc.columns] == ["cls mAP", "AP50", "AP", "AP75", "mIoU"]
    assert [c.metric for c in voc.columns] == ["cls/mAP", "bbox/AP50", "bbox/AP", "bbox/AP75", "sem_seg/mIoU"]
    assert [c.group for c in voc.columns] == ["classification"] + ["detection"] * 3 + ["segmentation"]
    assert voc.trailing == ["pretraining", "evaluation"]
    tex = tables.render_latex(voc)
    assert (r"\multicolumn{1}{c}{classification} & \multicolumn{3}{c}{detection} & "
            r"\multicolumn{1}{c}{segmentation}") in tex
    assert r"\cmidrule(lr){6-6} \cmidrule(lr){7-9} \cmidrule(lr){10-10}" in tex
    for t in tables.build_tables(results_frame(FIXTURES), REPORTED):  # tables without groups: no group line
        if t.key != "voc_transfer":
            assert r"\multicolumn" not in tables.render_latex(t), t.key


def test_reported_rows_are_co2s_table3_with_their_sources(voc):
    paper = {r.fields["method"]: r for r in voc.rows if r.reported}
    assert set(TABLE3) <= set(paper)
    for label, (values, sources) in TABLE3.items():
        row = paper[label]
        assert tuple(c.mean for c in row.cells) == values, label
        groups = (row.cells[0], row.cells[1], row.cells[4])  # a cell of each group: cls, det (AP50), seg
        for cell, source in zip(groups, sources):
            assert (source is None) == (cell.mean is None), label
            if source is not None:
                assert source in cell.source, (label, cell.source)
        assert all(c.source for c in row.cells if c.mean is not None) and not any(c.record_ids for c in row.cells)
        assert row.fields["source"] == "paper" and row.fields["data"] == "real"
    # CO2's numbers cite CO2's slides; the detection numbers MoCo published cite MoCo's README
    assert "CO2 (Wei et al. 2021, arXiv:2010.02217)" in paper["MoCo v1 (CO2's impl.)"].cells[0].source
    # a row of several tasks prints each task's protocol
    assert paper["MoCo v2"].fields["evaluation"].startswith("cls: VOC07 linear SVM")
    assert " / det: R50-C4 24k (MoCo pascal_voc_R_50_C4_24k_moco.yaml)" in paper["MoCo v2"].fields["evaluation"]
    # mmselfsup's SVM reference for MoCo v2 200 ep, a row of its own
    mm = paper["MoCo v2 (mmselfsup)"]
    assert mm.cells[0].mean == 84.04 and "open-mmlab/mmselfsup@db861f3" in mm.cells[0].source
    assert [c.mean for c in mm.cells[1:]] == [None] * 4


def test_reported_csv_holds_table3():
    df = REPORTED
    def value(method, task, metric, variant=""):
        sel = df[(df.method == method) & (df.task == task) & (df.metric == metric) & (df.variant == variant)]
        return sel["value"].tolist()
    assert value("moco_v1", "voc07_svm", "cls/mAP", "CO2's impl.") == [79.7]
    assert value("moco_v1", "voc_seg", "sem_seg/mIoU", "CO2's impl.") == [72.6]
    assert value("moco_v1", "voc_seg", "sem_seg/mIoU", "reported by MoCo") == [72.5]
    assert value("moco_v1", "voc_det", "bbox/AP50", "reported by MoCo") == [81.5]
    assert value("co2_moco_v1", "voc_det", "bbox/AP75") == [62.6]
    assert value("supervised", "voc07_svm", "cls/mAP") == [88.0]
    assert value("co2", "voc_seg", "sem_seg/mIoU") == [74.7]
    assert value("moco_v2", "voc07_svm", "cls/mAP", "mmselfsup") == [84.04]
    t3 = df[df.source.str.contains("Table 3", regex=False)]
    assert len(t3) == 20 and (t3["epochs"].isna() == (t3["method"] == "supervised")).all()


def test_the_two_moco_v1_rows_are_distinct(voc, tmp_path):
    rows = [r for r in voc.rows if r.method == "moco_v1" and r.reported]
    assert [r.fields["method"] for r in rows] == ["MoCo v1 (CO2's impl.)", "MoCo v1 (reported by MoCo)"]
    assert [r.cells[1].mean for r in rows] == [81.6, 81.5]
    md = tables.render_markdown(voc)
    assert "| MoCo v1 (CO2's impl.) | 200 | paper |" in md and "| MoCo v1 (reported by MoCo) | 200 | paper |" in md
    # the detection-only VOC table shows both as well
    det = {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}["voc"]
    assert {r.fields["method"] for r in det.rows if r.method == "moco_v1"} == {"MoCo v1 (CO2's impl.)",
                                                                                "MoCo v1 (reported by MoCo)"}
    # without the variant the two rows are a duplicate: rejected, naming the row
    raw = pd.read_csv(rep.REPORTED_CSV, dtype=str, keep_default_na=False)
    with pytest.raises(UserError, match=r"two rows for moco_v1 200 ep voc_det bbox/AP50"):
        rep.validate_reported(raw.assign(variant=""))
    with pytest.raises(UserError, match=r"two rows for moco_v1 \(CO2's impl.\) 200 ep voc07_svm"):
        rep.validate_reported(pd.concat([raw, raw[raw.variant == "CO2's impl."].iloc[[0]]]))
    # the column is optional: a file without it reads as before (every variant empty)
    old = raw[raw.variant == ""].drop(columns=["variant"])
    path = tmp_path / "old.csv"
    old.to_csv(path, index=False)
    loaded = rep.load_reported(path)
    assert len(loaded) == len(old) and (loaded["variant"] == "").all()


def test_one_row_per_pretraining_joins_the_three_groups(voc):
    recs = {_rel(r): r for r in iter_records(FIXTURES)}
    moco = _ours(voc, "moco_v2")
    assert len(moco) == 1
    cls, ap50, ap, ap75, miou = moco[0].cells
    assert cls.records == ("transfer/voc07_svm/moco_v2/record.json",) and cls.n == 1
    assert cls.mean == pytest.approx(recs[cls.records[0]]["metrics"]["cls/mAP"])
    assert ap50.records == tuple(f"transfer/voc_det/moco_v2/trial{t}/record.json" for t in range(2))
    # segmentation: the 3 trials, their --trials summary not counted again
    assert miou.records == tuple(f"transfer/voc_seg/moco_v2/trial{t}/record.json" for t in range(3))
    assert miou.n == 3 and miou.mean == pytest.approx((30.2 + 31.0 + 29.9) / 3)
    assert moco[0].fields["method"] == "MoCo v2" and moco[0].fields["data"] == "toy"
    assert tables.render_markdown(voc).count("| MoCo v2 | 4 | ours | toy † | 1/2/3 | 40.0 | 10.7 ± 0.4 |") == 1
    # each evaluation's protocol, in the table's group order
    ev = moco[0].fields["evaluation"]
    assert ev.index("cls: toy scale") < ev.index(" / det: toy scale") < ev.index(" / seg: toy scale")
    # random init: the three groups in one row; CO2: classification and segmentation (no detection run)
    assert [c.n for c in _ours(voc, "random")[0].cells] == [1, 1, 1, 1, 1]
    assert [c.n for c in _ours(voc, "co2")[0].cells] == [1, 0, 0, 0, 1]


def test_torchvision_and_msra_supervised_rows_stay_apart(voc):
    rows = {r.fields["method"]: r for r in _ours(voc, "supervised")}
    assert set(rows) == {"supervised", "supervised (MSRA R-50.pkl)"}
    assert [c.n for c in rows["supervised"].cells] == [1, 0, 0, 0, 1]  # torchvision weights: SVM + segmentation
    assert [c.n for c in rows["supervised (MSRA R-50.pkl)"].cells] == [0, 1, 1, 1, 0]  # voc_det_supervised_msra
    # a torchvision voc_det run joins the torchvision row, never the MSRA one
    msra = load_record(FIXTURES / "transfer" / "voc_det_supervised_msra" / "supervised")
    tv = copy.deepcopy(msra)
    tv.update(id="tv1", task="voc_det", _path=str(FIXTURES / "x" / "tv" / "record.json"))
    t = _table([*iter_records(FIXTURES), tv])
    rows = {r.fields["method"]: r for r in _ours(t, "supervised")}
    assert rows["supervised"].cells[1].record_ids == ("tv1",)
    assert rows["supervised (MSRA R-50.pkl)"].cells[1].record_ids == (msra["id"],)


def test_another_config_or_pretraining_protocol_is_another_row():
    recs = list(iter_records(FIXTURES))
    seg = load_record(FIXTURES / "transfer" / "voc_seg" / "co2")
    lr = copy.deepcopy(seg)
    lr.update(id="lr1", _path=str(FIXTURES / "x" / "seg_lr" / "record.json"))
    lr["config"]["SOLVER"]["BASE_LR"] = 0.02
    t = _table([*recs, lr])
    rows = _ours(t, "co2")
    # two segmentation configs: which goes with the classification run is not known, so each is a row of its own
    assert sorted(r.cells[4].record_ids for r in rows if r.cells[4].n) == sorted([(seg["id"],), ("lr1",)])
    assert len(rows) == 3 and all(sum(c.n for c in r.cells) == 1 for r in rows)
    # the same segmentation config on a pretraining of another protocol: a row of its own
    bf16 = copy.deepcopy(seg)
    bf16.update(id="bf1", _path=str(FIXTURES / "x" / "seg_bf16" / "record.json"))
    bf16["inputs"][0]["inputs"][0]["protocol"] = {"recipe": "r", "deviations": ["bf16 autocast"]}
    rows = _ours(_table([*recs, bf16]), "co2")
    assert [(r.fields["pretraining"], [c.n for c in r.cells]) for r in rows if r.fields["pretraining"] ==
            "bf16 autocast"] == [("bf16 autocast", [0, 0, 0, 0, 1])]
    assert len(rows) == 2


def test_voc_transfer_regenerates_byte_identically_and_traces_every_cell(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert tables.main(["--records", str(FIXTURES), "--out", str(out), "--no-plots"]) == 0
        outs.append({ext: (out / f"voc_transfer.{ext}").read_bytes() for ext in ("md", "csv", "tex")})
    assert outs[0] == outs[1]
    with open(tmp_path / "o0" / "sources.csv", newline="") as f:
        cells = [c for c in csv.DictReader(f) if c["table"] == "voc_transfer"]
    metric = {c.label: c.metric for c in tables.MAIN_TABLES[[s.key for s in tables.MAIN_TABLES].index(
        "voc_transfer")].columns}
    ours = [c for c in cells if c["origin"] == "record"]
    assert {c["column"] for c in ours} == set(metric)
    for cell in ours:
        values = [load_record(FIXTURES / p)["metrics"][metric[cell["column"]]] for p in cell["records"].split()]
        assert len(values) == int(cell["n"]) and float(cell["value"]) == pytest.approx(sum(values) / len(values),
                                                                                      abs=1e-3)
    assert all(c["source"] for c in cells if c["origin"] == "reported")
    # the CSV lists every protocol deviation, the Markdown marks toy numbers
    lines = list(csv.DictReader(io.StringIO(outs[0]["csv"].decode())))
    moco = next(ln for ln in lines if ln["method"] == "MoCo v2" and ln["source"] == "")
    assert "112 px input (pools giving the 224 px feature lengths)" in moco["evaluation"]
    assert "30k -> 8 iters" in moco["evaluation"] and moco["mIoU n"] == "3"
    assert "| toy † |" in outs[0]["md"].decode() and tables.TOY_LEGEND in outs[0]["md"].decode()


def test_headline_and_ablation_know_svm_and_segmentation():
    assert tables.HEADLINE["voc07_svm"] == ("cls/mAP",) and tables.HEADLINE["voc_seg"] == ("sem_seg/mIoU",)
    recs = list(iter_records(FIXTURES))
    sweep_pre = next(r for r in recs if r["kind"] == "pretrain" and r["name"] == "jcl_m/data.num_keys=3")
    pre = {k: v for k, v in sweep_pre.items() if k != "_path"}
    svm = copy.deepcopy(load_record(FIXTURES / "transfer" / "voc07_svm" / "co2"))
    svm.update(id="s1", name=pre["name"], inputs=[pre], _path=str(FIXTURES / "x" / "sweep_svm" / "record.json"))
    seg = copy.deepcopy(load_record(FIXTURES / "transfer" / "voc_seg" / "co2"))
    seg.update(id="s2", name=pre["name"], _path=str(FIXTURES / "x" / "sweep_seg" / "record.json"))
    seg["inputs"][0]["inputs"] = [pre]
    abl = tables.build_ablations(results_frame(FIXTURES, [*recs, svm, seg]))[0]
    labels = [c.label for c in abl.columns]
    assert labels == ["linear top1", "linear top5", "voc07_svm cls/mAP", "voc_seg sem_seg/mIoU", "loss_final"]
    row = next(r for r in abl.rows if r.fields["data.num_keys"] == "3")
    assert row.cells[2].record_ids == ("s1",) and row.cells[3].record_ids == ("s2",)
