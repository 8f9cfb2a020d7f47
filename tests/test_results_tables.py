"""Tables from run records: reported numbers validated, byte-identical regeneration, mean ± std over trials, toy
numbers marked, every cell traceable to its records (fixtures: tests/fixtures/records, see make_records.py)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from ctbench.errors import UserError
from ctbench.records import load_record
from results import reported as rep
from results import tables
from results.collect import data_label, parse_sweep_name, pretrain_costs, results_frame

FIXTURES = Path(__file__).parent / "fixtures" / "records"


@pytest.fixture(scope="module")
def built():
    df = results_frame(FIXTURES)
    return {t.key: t for t in tables.build_tables(df, rep.load_reported())}


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_reported_csv_holds_the_verified_numbers():
    df = rep.load_reported()
    def value(method, task, metric):
        return df[(df.method == method) & (df.task == task) & (df.metric == metric)]["value"].tolist()
    assert value("moco_v2", "linear", "top1") == [67.5]
    assert value("simo", "linear", "top1") == [68.1]
    assert value("moco_v2", "voc_det", "bbox/AP50") == [82.4]
    assert value("supervised", "voc_det_supervised_msra", "bbox/AP75") == [58.8]  # MoCo's MSRA R-50.pkl row
    assert value("co2_moco_v1", "semisup_1pct", "top5") == [66.2]
    assert (df["source"].str.len() > 0).all()
    # JCL and EqCo detection numbers were not verified: they must not be there
    assert df[df.method.isin(["jcl", "eqco"]) & df.task.str.contains("det")].empty


def test_reported_row_without_source_is_rejected(tmp_path):
    good = pd.read_csv(rep.REPORTED_CSV, dtype=str, keep_default_na=False)
    bad = good.copy()
    bad.loc[3, "source"] = "  "
    with pytest.raises(UserError, match="row 5: empty 'source'"):
        rep.validate_reported(bad)
    path = tmp_path / "reported.csv"
    bad.to_csv(path, index=False)
    assert rep.main([str(path)]) == 2  # the CLI: one line, exit code 2
    assert tables.main(["--records", str(FIXTURES), "--out", str(tmp_path / "o"), "--reported", str(path)]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("column,value,match", [("value", "n/a", "not a finite number"),
                                                ("epochs", "2.5", "positive integer"),
                                                ("method", "", "empty 'method'")])
def test_reported_bad_values_are_rejected(column, value, match):
    bad = pd.read_csv(rep.REPORTED_CSV, dtype=str, keep_default_na=False)
    bad.loc[0, column] = value
    with pytest.raises(UserError, match=match):
        rep.validate_reported(bad)


def test_reported_duplicate_is_rejected():
    df = pd.read_csv(rep.REPORTED_CSV, dtype=str, keep_default_na=False)
    with pytest.raises(UserError, match="two rows for"):
        rep.validate_reported(pd.concat([df, df.iloc[[2]]]))


def test_tables_regenerate_byte_identically(tmp_path):
    # generated twice, the second time from a copy of the records elsewhere: not a byte may differ
    copy = tmp_path / "elsewhere" / "records"
    shutil.copytree(FIXTURES, copy)
    for out, src in ((tmp_path / "a", FIXTURES), (tmp_path / "b", copy)):
        assert tables.main(["--records", str(src), "--out", str(out)]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    for key in ("linear", "semisup", "voc", "voc_transfer", "coco", "coco_kp", "ablation_jcl_m"):
        assert {f"{key}.md", f"{key}.csv", f"{key}.tex"} <= set(a)
    assert {"plots/loss_curves.png", "plots/loss_curves.svg", "plots/ablation_jcl_m.svg",
            "plots/throughput_cpu_compute.png"} <= set(a)
    text = a["tables.md"].decode()
    assert "2025-01-01" not in text  # the records' start/end times never reach a table


def test_two_trials_give_mean_and_std(built):
    row = next(r for r in built["voc"].rows if r.method == "moco_v2" and not r.reported)
    ap50 = row.cells[0]
    assert ap50.n == 2
    assert ap50.mean == pytest.approx(statistics.mean([10.4, 11.0]))
    assert ap50.std == pytest.approx(statistics.stdev([10.4, 11.0]))
    md = tables.render_markdown(built["voc"])
    assert "| MoCo v2 | 4 | ours | toy † | 2 | 10.7 ± 0.4 | 3.3 ± 0.3 | 2.1 ± 0.3 |" in md
    # a single trial shows no ±
    jcl = next(r for r in built["voc"].rows if r.method == "jcl")
    assert jcl.cells[0].std is None and "± " not in tables.render_markdown(built["voc"]).split("JCL")[1].split("\n")[0]


def test_reported_and_reproduced_side_by_side(built):
    voc = built["voc"]
    moco = [r for r in voc.rows if r.method == "moco_v2"]
    assert [r.reported for r in moco] == [True, False]  # the paper's row first, ours below it
    assert moco[0].fields["source"] == "paper" and moco[0].cells[1].mean == 57.0
    assert "MoCo detection README" in moco[0].cells[1].source


def test_toy_numbers_are_marked(built):
    for t in built.values():
        for r in t.rows:
            if not r.reported:
                expected = "real" if r.fields.get("run", "").startswith("moco_v2_in1k") else "toy"
                assert r.fields["data"] == expected, (t.key, r.fields)
    md = tables.render_markdown(built["linear"])
    lines = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith("| MoCo v2 |")}
    assert "| toy † |" in lines["moco_v2"] and "| real |" in lines["moco_v2_in1k"]
    assert tables.TOY_LEGEND in md and "not comparable" in md
    assert r"toy $^\dagger$" in tables.render_latex(built["linear"])


def test_every_cell_maps_to_its_records(tmp_path):
    assert tables.main(["--records", str(FIXTURES), "--out", str(tmp_path), "--no-plots"]) == 0
    with open(tmp_path / "sources.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert cells
    metric_of = {c.label: c.metric for spec in tables.MAIN_TABLES for c in spec.columns}
    for cell in cells:
        if cell["origin"] == "reported":
            assert cell["source"] and not cell["record_ids"]
            continue
        ids, paths = cell["record_ids"].split(), cell["records"].split()
        assert len(ids) == len(paths) == int(cell["n"]) >= 1
        values = []
        for rid, rel in zip(ids, paths):
            rec = load_record(FIXTURES / rel)
            assert rec["id"] == rid
            metric = metric_of.get(cell["column"], cell["column"].split(" ")[-1])
            derived = pretrain_costs(rec) if rec["kind"] == "pretrain" else {}  # train_h, gpu_hours: from its fields
            values.append({**rec["metrics"], **derived}[metric])
        assert float(cell["value"]) == pytest.approx(statistics.mean(values), abs=1e-3)
    # the Markdown footnotes resolve each row's refs to record paths and ids
    md = (tmp_path / "voc.md").read_text()
    assert "[3] transfer/voc_det/moco_v2/trial0/record.json (id fx" in md  # [1]: the MSRA supervised row, [2]: random


def test_sweep_runs_feed_the_ablation_table_only(built):
    assert all("jcl_m" not in r.fields.get("run", "") for r in built["linear"].rows)
    abl = built["ablation_jcl_m"]
    assert [r.fields["data.num_keys"] for r in abl.rows] == ["1", "3"]
    assert [c.label for c in abl.columns] == ["linear top1", "linear top5", "loss_final"]
    assert [r.cells[0].mean for r in abl.rows] == [30.5, 32.0]


def test_sweep_names_and_data_labels():
    assert parse_sweep_name("jcl_m/data.num_keys=3") == ("jcl_m", {"data.num_keys": "3"})
    assert parse_sweep_name("co2_grid/loss.con_weight=0.5__loss.tau_con=0.1/seed=1") == (
        "co2_grid", {"loss.con_weight": "0.5", "loss.tau_con": "0.1"})
    assert parse_sweep_name("moco_v2") is None and parse_sweep_name("a/b") is None
    assert data_label(True, True) == "toy" and data_label(False, False) == "real"
    assert data_label(True, False) == "mixed" and data_label(None, False) == "unknown"
    assert data_label(True) == "toy" and data_label(None, True) == "mixed"


def test_missing_records_dir_is_a_user_error(tmp_path, capsys):
    assert tables.main(["--records", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_fixture_records_have_the_record_shape():
    for p in sorted(FIXTURES.rglob("record.json")):
        rec = json.loads(p.read_text())
        assert {"schema", "id", "kind", "name", "metrics", "config", "dataset", "inputs", "seed"} <= set(rec)


def test_trial_summary_counts_once(tmp_path):
    # transfer.detection --trials 2 writes trial0/, trial1/ and a summary record above them: the table uses the
    # trials (n = 2); with the trial records gone, the summary alone is one row of n = 1
    copy = tmp_path / "records"
    shutil.copytree(FIXTURES, copy)
    df = results_frame(copy)
    voc = df[(df.task == "voc_det") & (df.method == "moco_v2") & (df.metric == "bbox/AP50")]
    assert sorted(voc["record"]) == ["transfer/voc_det/moco_v2/trial0/record.json",
                                     "transfer/voc_det/moco_v2/trial1/record.json"]
    for t in ("trial0", "trial1"):
        shutil.rmtree(copy / "transfer" / "voc_det" / "moco_v2" / t)
    df = results_frame(copy)
    voc = df[(df.task == "voc_det") & (df.method == "moco_v2") & (df.metric == "bbox/AP50")]
    assert voc["record"].tolist() == ["transfer/voc_det/moco_v2/record.json"] and voc["value"].tolist() == [10.7]
