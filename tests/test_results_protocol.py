"""A table row is one protocol: trials differ only in seeds and paths; any other config difference, and any
difference in the evaluation's or the pretraining's ``protocol.deviations``, is another row; every row prints its
protocol. Semi-supervised 1 % / 10 % side by side; the C4 2x, keypoint 2x and MSRA supervised rows
(fixtures: tests/fixtures/records, see make_records.py)."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import pytest

from ctbench.records import iter_records, load_record
from results import reported as rep
from results import tables
from results.collect import results_frame

FIXTURES = Path(__file__).parent / "fixtures" / "records"
REPORTED = rep.load_reported()


def _variant(rec: dict, rel: str, *, rid: str, seed: int | None = None, config: dict | None = None,
             deviations: list[str] | None | str = "keep") -> dict:
    """A copy of ``rec`` as if written at ``rel`` (below the fixtures root) with another id, seed, config entries or
    deviations (``None``: no protocol entry)."""
    out = copy.deepcopy(rec)
    out["_path"] = str(FIXTURES / rel / "record.json")
    out["id"] = rid
    if seed is not None:
        out["seed"] = seed
        out["config"]["seed"] = seed
    for key, value in (config or {}).items():
        node = out["config"]
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    if deviations is None:
        out.pop("protocol", None)
    elif deviations != "keep":
        out["protocol"] = {**out.get("protocol", {"recipe": "r"}), "deviations": list(deviations)}
    return out


def _table(key: str, records: list[dict]) -> tables.Table:
    spec = next(s for s in tables.MAIN_TABLES if s.key == key)
    return tables.build_table(spec, results_frame(FIXTURES, records), REPORTED)


def _ours(t: tables.Table, method: str) -> list[tables.Row]:
    return [r for r in t.rows if r.method == method and not r.reported]


def test_cache_views_and_deviations_are_rows_seeds_are_trials():
    base = load_record(FIXTURES / "linear" / "moco_v2")
    assert base["config"]["cache"]["views"] == 0
    seed1 = _variant(base, "x/seed1", rid="x1", seed=1)  # a trial: only the seed (and the path) differ
    views = _variant(base, "x/views10", rid="x2", config={"cache.views": 10},
                     deviations=["toy scale", "cached features: 10 views", "+bn head", "100 -> 10 epochs"])
    views_same_text = _variant(base, "x/views10b", rid="x3", config={"cache.views": 10})  # config alone differs
    dtype = _variant(base, "x/fp16", rid="x4", config={"cache.dtype": "float16"})
    bf16 = _variant(base, "x/bf16", rid="x5", deviations=[*base["protocol"]["deviations"], "bf16 autocast"])
    t = _table("linear", [base, seed1, views, views_same_text, dtype, bf16])
    rows = _ours(t, "moco_v2")
    assert len(rows) == 5
    by_ids = {r.cells[0].record_ids: r for r in rows}
    assert by_ids[(base["id"], "x1")].cells[0].n == 2  # the seeds: one row, n = 2
    assert {ids for ids in by_ids} == {(base["id"], "x1"), ("x2",), ("x3",), ("x4",), ("x5",)}
    assert "cached features: 10 views" in by_ids[("x2",)].fields["evaluation"]
    assert by_ids[("x5",)].fields["evaluation"].endswith("bf16 autocast")


def test_pretraining_protocol_splits_the_rows_built_on_it():
    """A transfer row on an 8-GPU fp32 pretraining and one on a 1-GPU bf16 pretraining of the same config."""
    voc = load_record(FIXTURES / "transfer" / "voc_det" / "jcl")
    pre = voc["inputs"][0]["inputs"][0]
    assert pre["kind"] == "pretrain"
    runs = []
    for i, devs in enumerate(([], ["bf16 autocast", "1 process (recipe: 8 GPUs)"])):
        rec = _variant(voc, f"x/jcl{i}", rid=f"j{i}")
        rec["inputs"][0]["inputs"][0]["protocol"] = {"recipe": "r", "deviations": devs}
        runs.append(rec)
    trial = _variant(runs[1], "x/jcl1_seed1", rid="j2", seed=1)
    trial["config"]["SEED"] = 1
    t = _table("voc", [*runs, trial])
    rows = sorted(_ours(t, "jcl"), key=lambda r: r.cells[0].n)
    assert [r.cells[0].n for r in rows] == [1, 2]
    assert rows[0].fields["pretraining"] == "as published"
    assert rows[1].fields["pretraining"] == "bf16 autocast; 1 process (recipe: 8 GPUs)"
    md = tables.render_markdown(t)
    assert "| as published |" in md and "| bf16 autocast; 1 process (recipe: 8 GPUs) |" in md


def test_protocol_text():
    assert tables.protocol_text(None) == "unrecorded"
    assert tables.protocol_text([]) == "as published"
    devs = ["toy scale", "1 process (recipe: 8 GPUs)", "CPU (recipe: GPUs)", "naiveSyncBN -> BN (MODEL.RESNETS.NORM)",
            "24k -> 8 iters", "batch 256 -> 32", "data.crop_scale [0.2, 1] -> [0.08, 1]", "model.head mlp -> linear"]
    assert tables.protocol_text(devs) == ("toy scale (+3 size/schedule changes); 1 process (recipe: 8 GPUs); "
                                          "CPU (recipe: GPUs); naiveSyncBN -> BN (MODEL.RESNETS.NORM); "
                                          "model.head mlp -> linear")
    assert tables.protocol_text(devs, short=False) == "; ".join(devs)
    full = ["bf16 autocast", "100 -> 10 epochs"]  # not toy scale: nothing is abbreviated
    assert tables.protocol_text(full) == "bf16 autocast; 100 -> 10 epochs"


def test_every_row_shows_its_protocol_in_markdown_and_csv():
    built = {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}
    for t in built.values():
        assert t.trailing == ["pretraining", "evaluation"]
        for r in t.rows:
            assert r.fields["pretraining"] and r.fields["evaluation"], (t.key, r.fields)
    lin = built["linear"]
    md = tables.render_markdown(lin)
    row = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith("| MoCo v2 |")}
    # 1 GPU bf16 vs 8 GPUs fp32, told apart in the table itself
    assert "| bf16 autocast; 1 process (recipe: 8 GPUs); 1 process: split-BN" in row["moco_v2_in1k"]
    assert "| 200 -> 4 epochs | as published |" in row["moco_v2_in1k_8gpu"]
    assert "| toy scale (+4 size/schedule changes); 1 process (recipe: 8 GPUs);" in row["moco_v2"]
    random = next(ln for ln in md.splitlines() if ln.startswith("| random init |"))
    assert "| – | unrecorded |" in random  # no pretraining; a record without a protocol entry
    # paper rows: the protocol reported.csv gives
    simo = next(r for r in lin.rows if r.method == "simo" and r.reported)
    assert simo.fields["evaluation"] == "SelfSup linear eval: lr 30, batch 256, 90 ep, steps 60/80"
    moco = next(r for r in lin.rows if r.method == "moco_v2" and r.reported)
    assert "main_lincls" in moco.fields["evaluation"] and "100 ep" in moco.fields["evaluation"]
    assert tables.PROTOCOL_LEGEND in md
    # the CSV lists every deviation (nothing abbreviated)
    lines = list(csv.DictReader(io.StringIO(tables.render_csv(lin))))
    toy = next(ln for ln in lines if ln["run"] == "moco_v2")
    assert toy["pretraining"].startswith("toy scale; 1 process (recipe: 8 GPUs);") and "200 -> 4 epochs" in toy[
        "pretraining"]
    assert toy["evaluation"] == ("toy scale; cached features: centre crop; +bn head; 100 -> 10 epochs; "
                                 "lr 30 -> 0.01; data.image_size 224 -> 64")
    assert r"\to" in tables.render_latex(built["voc"])  # '->' typeset as an arrow


def test_semisup_one_row_per_method_with_both_percentages():
    t = {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}["semisup"]
    for method in ("random", "moco_v2", "co2"):
        rows = _ours(t, method)
        assert len(rows) == 1, method
        assert [c.n for c in rows[0].cells] == [1, 1, 1, 1]
    moco = _ours(t, "moco_v2")[0]
    assert [c.mean for c in moco.cells] == [20.1, 48.0, 25.3, 60.2]
    # the 1 % and 10 % runs have their own configs and deviations: the evaluation column says each
    assert moco.fields["evaluation"] == ("1 %: toy scale (+2 size/schedule changes); subset: generated (seed 0) / "
                                         "10 %: toy scale (+3 size/schedule changes); subset: generated (seed 0)")
    assert _ours(t, "random")[0].fields["evaluation"] == "unrecorded"


def test_semisup_runs_of_another_config_or_list_are_not_averaged():
    recs = [r for r in iter_records(FIXTURES) if r["kind"] == "semisup" and r["name"] == "moco_v2"]
    one = next(r for r in recs if r["config"]["pct"] == 1)
    lr = _variant(one, "x/lr", rid="s1", config={"lr": 0.1})
    seed = _variant(one, "x/seed", rid="s2", seed=3)
    given = [_variant(one, f"x/given{i}", rid=f"g{i}", config={"subset.file": f"/lists/{i}/1percent.txt"}) for i in
             range(2)]
    for i, g in enumerate(given):  # the same file name in two places, two different lists
        g["subset"] = {"source": "given", "given_sha256": f"{i}" * 64, "sha256": f"{i}" * 64}
    same_list = _variant(given[0], "x/given0b", rid="g2", config={"subset.file": "/elsewhere/1percent.txt"})
    t = _table("semisup", [*recs, lr, seed, *given, same_list])
    rows = _ours(t, "moco_v2")
    cells_1pct = sorted(r.cells[0].record_ids for r in rows if r.cells[0].n)
    assert cells_1pct == sorted([(one["id"], "s2"), ("s1",), ("g0", "g2"), ("g1",)])
    # four 1 % configs and one 10 % config: which 1 % run goes with the 10 % one is not known, so each is a row
    assert len(rows) == 5 and [[c.n for c in r.cells] for r in rows].count([0, 0, 1, 1]) == 1


def test_c4_2x_tasks_reach_their_tables():
    built = {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}
    coco = built["coco"]
    assert [r.fields["task"] for r in _ours(coco, "moco_v2")] == ["coco_mask", "coco_det_c4_2x", "coco_mask_c4_2x"]
    c4 = next(r for r in coco.rows if r.fields["task"] == "coco_mask_c4_2x")
    assert c4.cells[0].mean == 6.3 and c4.cells[3].mean == 5.2
    for task in ("coco_det_c4_2x", "coco_mask_c4_2x", "coco_kp_2x"):
        assert task in tables.HEADLINE
    kp = built["coco_kp"]
    assert [(r.fields["schedule"], r.cells[0].mean) for r in kp.rows] == [("1x (90k)", 1.2), ("2x (180k)", 2.4)]
    assert "| 2x (180k) |" in tables.render_markdown(kp)


def test_c4_2x_in_an_ablation():
    recs = list(iter_records(FIXTURES))
    sweep_pre = next(r for r in recs if r["kind"] == "pretrain" and r["name"] == "jcl_m/data.num_keys=3")
    det = load_record(FIXTURES / "transfer" / "coco_det_c4_2x" / "moco_v2")
    det = _variant(det, "x/sweep_c4_2x", rid="c1")
    det["inputs"][0]["inputs"] = [{k: v for k, v in sweep_pre.items() if k != "_path"}]
    abl = tables.build_ablations(results_frame(FIXTURES, [*recs, det]))[0]
    assert "coco_det_c4_2x bbox/AP" in [c.label for c in abl.columns]


def test_supervised_voc_row_is_msra():
    csv_text = rep.REPORTED_CSV.read_text()
    assert "torchvision" not in csv_text
    sup = REPORTED[(REPORTED.method == "supervised") & REPORTED.task.str.contains("det")]  # CO2's Table 3 adds
    assert set(sup["task"]) == {tables.SUPERVISED_MSRA_TASK}  # supervised classification / segmentation rows
    assert all("MSRA R-50.pkl" in p and "BGR" in p for p in sup["protocol"])
    voc = {t.key: t for t in tables.build_tables(results_frame(FIXTURES), REPORTED)}["voc"]
    rows = [r for r in voc.rows if r.method == "supervised"]
    assert [(r.reported, r.fields["method"]) for r in rows] == [(True, "supervised (MSRA R-50.pkl)"),
                                                                (False, "supervised (MSRA R-50.pkl)")]
    assert [c.mean for c in rows[0].cells] == [81.3, 53.5, 58.8]
    assert rows[1].cells[0].record_ids and rows[1].fields["pretraining"] == tables.NO_PRETRAINING


@pytest.mark.parametrize("method,expect", [("moco_v2", "main_lincls"), ("simo", "90 ep"), ("co2", "CO2's slides")])
def test_reported_protocol_texts(method, expect):
    r = REPORTED[(REPORTED.method == method) & (REPORTED.task == "linear")]
    assert len(r) == 1 and expect in r["protocol"].iloc[0]
    assert (REPORTED["protocol"].str.len() > 0).all()
