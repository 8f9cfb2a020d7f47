"""The stage runner behind `make demo` / `make sweep` (skip, force, failure, blocked dependants, exit code), the
demo's plan, and sweep specs -> run names the ablation tables parse back."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ctbench.errors import UserError
from ctbench.records import write_record
from orchestrate import demo, sweep
from results.collect import parse_sweep_name

REPO = Path(__file__).resolve().parent.parent


def _writer(path: Path, rc: int = 0) -> list[str]:
    """A stage command that exits with ``rc``, writing ``path`` (its 'record') only on success."""
    write = f"pathlib.Path({str(path)!r}).write_text('x'); " if rc == 0 else ""
    code = f"import pathlib, sys; print('working'); {write}sys.exit({rc})"
    return [sys.executable, "-c", code]


def _stages(tmp: Path) -> list[demo.Stage]:
    def s(key, rc=0, needs=(), write=True):
        target = tmp / "rec" / (key + ".done")
        argv = _writer(target, rc) if write else [sys.executable, "-c", "print('no record')"]
        return demo.Stage(key, "linear", argv, done=target.is_file, needs=needs)
    return [s("a"), s("b", rc=3), s("c", needs=("b",)), s("d", needs=("a",)), s("e", write=False)]


def _tables(tmp: Path) -> demo.Stage:
    """A final stage like the demo's tables: no dependencies, regenerated every time."""
    return demo.Stage("tables", "tables", _writer(tmp / "rec" / "tables.done"), always=True, final=True)


def _run(tmp: Path, stages, **kw) -> tuple[dict, list[str], int]:
    lines: list[str] = []
    runner = demo.Runner(stages, tmp / "logs", tmp / "timings.json", out=lines.append, **kw)
    outcomes = runner.run()
    rc, _ = runner.summary()
    return {k: o.status for k, o in outcomes.items()}, lines, rc


def test_runner_skips_fails_blocks_and_reruns(tmp_path):
    (tmp_path / "rec").mkdir()
    status, lines, rc = _run(tmp_path, _stages(tmp_path))
    assert status == {"a": "ok", "b": "failed", "c": "blocked", "d": "ok", "e": "failed"}
    assert rc == 1
    text = "\n".join(lines)
    assert "exit code 3" in text and "last " in text and "working" in text  # the failed stage's log tail
    assert "no run record was written" in text  # exit 0 without a record is a failure too
    assert all("elapsed" in ln and "ETA" in ln for ln in lines if ln.startswith("["))
    assert (tmp_path / "logs" / "a.log").read_text().startswith("$ ")
    assert set((tmp_path / "timings.json").read_text().split('"')) >= {"a", "d"}

    # second run: finished stages are skipped, the failed one is tried again
    status, _, _ = _run(tmp_path, _stages(tmp_path))
    assert status["a"] == status["d"] == "skipped" and status["b"] == "failed"

    # --force reruns everything
    status, _, _ = _run(tmp_path, _stages(tmp_path), force=True)
    assert status["a"] == status["d"] == "ok"


def test_runner_reruns_dependants_of_a_stage_that_ran(tmp_path):
    (tmp_path / "rec").mkdir()
    stages = _stages(tmp_path)
    a, d = stages[0], stages[3]
    (tmp_path / "rec" / "d.done").write_text("old")  # d's record exists, a's does not: a runs, so d must too
    status, _, _ = _run(tmp_path, [a, d])
    assert status == {"a": "ok", "d": "ok"}


def test_runner_runs_stages_in_parallel(tmp_path):
    (tmp_path / "rec").mkdir()
    status, lines, rc = _run(tmp_path, [_tables(tmp_path), *_stages(tmp_path)], jobs=2)
    assert status == {"a": "ok", "b": "failed", "c": "blocked", "d": "ok", "e": "failed", "tables": "ok"} and rc == 1
    ends = [ln.split()[2] for ln in lines if re.search(r"\] (done|FAILED|blocked) ", ln)]
    assert ends[-1] == "tables" and len(ends) == 6  # built from what exists once the rest has ended


def test_parallel_runner_starts_the_longest_ready_stage_first(tmp_path):
    """With 2 jobs the two pretraining runs share the machine (estimated longest, ready after the data), not the
    plan's order (the quick evaluations of random init first, one pretraining run alone at the end)."""
    started = []
    (tmp_path / "rec").mkdir()

    def s(key, kind, needs=()):
        target = tmp_path / "rec" / (key + ".done")
        return demo.Stage(key, kind, _writer(target), done=target.is_file, needs=needs)

    stages = [s("data", "toydata"), s("knn_random", "knn", ("data",)), s("linear_random", "linear", ("data",)),
              s("pre_a", "pretrain", ("data",)), s("knn_a", "knn", ("pre_a",)), s("pre_b", "pretrain", ("data",)),
              s("sup", "supervised", ("data",)), _tables(tmp_path)]
    runner = demo.Runner(stages, tmp_path / "logs", tmp_path / "timings.json", jobs=2,
                         out=lambda ln: started.append(ln.split()[2]) if " start " in ln else None)
    runner.run()
    assert started[:4] == ["data", "pre_a", "pre_b", "sup"]
    assert set(started[4:-1]) == {"knn_random", "linear_random", "knn_a"}
    assert started[-1] == "tables"  # final: after every other stage has ended, though it needs none of them
    started.clear()
    sequential = demo.Runner(stages, tmp_path / "logs", tmp_path / "timings.json", jobs=1, force=True,
                             out=lambda ln: started.append(ln.split()[2]) if " start " in ln else None)
    sequential.run()
    assert started == [st.key for st in stages]  # one at a time: the plan's order


def test_eta_scales_by_the_long_stages_only(tmp_path):
    """A stage estimated under SCALE_MIN_S (the toy data's 3 s) running slow does not scale the trainings' ETA; a
    long stage running slow does."""
    stages = [demo.Stage("data", "toydata", []), demo.Stage("svm", "svm", []), demo.Stage("pre", "pretrain", [])]
    runner = demo.Runner(stages, tmp_path / "logs", tmp_path / "timings.json")
    pre = demo.ESTIMATE_S["pretrain"]
    assert demo.ESTIMATE_S["toydata"] < demo.SCALE_MIN_S <= demo.ESTIMATE_S["svm"]
    runner._measured(stages[0], 4 * demo.ESTIMATE_S["toydata"])
    assert runner.estimate(stages[2]) == pre
    runner._measured(stages[1], 2 * demo.ESTIMATE_S["svm"])
    assert runner.estimate(stages[2]) == pytest.approx(2 * pre)


def _plan_lines(capsys, *args: str) -> dict[str, str]:
    assert demo.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    return {re.match(r"\[\d+/\d+\] (.+?) +(?:run|skip) ", ln).group(1): ln for ln in out}


def test_demo_plan_and_skip_by_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.delenv("FULL", raising=False)
    root = tmp_path / "demo"
    # a finished random-init VOC run and a finished moco_v2 pretraining: both are skipped
    write_record("transfer", "random", root / "transfer" / "voc_det" / "random", {"bbox/AP": 1.0}, task="voc_det")
    pre = write_record("pretrain", "moco_v2", root / "pretrain" / "moco_v2", {"loss_final": 5.0})
    write_record("linear", "moco_v2", root / "linear" / "moco_v2", {"top1": 20.0}, inputs=[pre])
    # the default: moco_v2 and random init, 2 seeds, the supervised ceiling once; kNN + linear for each seed, the
    # rest (semi-sup 1 %, SVM, voc_det, voc_seg) for seed 0
    line = _plan_lines(capsys, "--out", str(root))
    assert len(line) == 1 + (6 + 2) + 8 + (8 + 3) + 1
    for run in ("random", "supervised", "moco_v2"):
        for stage in ("knn", "linear", "semisup pct1", "transfer voc07_svm", "transfer voc_det", "transfer voc_seg"):
            assert f"{stage} {run}" in line, (stage, run)
    for s1 in ("random_s1", "moco_v2_s1"):
        assert f"knn {s1}" in line and f"linear {s1}" in line and f"transfer voc_det {s1}" not in line
    assert not any("supervised_s1" in key for key in line)
    assert "--task voc_seg" in line["transfer voc_seg moco_v2"]
    assert "monitor.knn_every=4" in line["pretrain moco_v2"]  # 32 px and the 480 steps: the toy preset's
    assert "--knn-every 8" in line["pretrain supervised"]
    assert "--name moco_v2_s1" in line["pretrain moco_v2_s1"] and "train.seed=1" in line["pretrain moco_v2_s1"]
    assert "--ckpt random --name random --seed 1 --image-size 32" in line["knn random_s1"]
    assert "train.seed=1" in line["linear random_s1"] and "data.image_size=32" in line["linear random_s1"]
    assert "skip (record" in line["transfer voc_det random"] and "skip (record" not in line["transfer voc_seg random"]
    assert "skip (record" in line["pretrain moco_v2"] and "skip (record" in line["linear moco_v2"]
    assert "skip (record" not in line["linear moco_v2_s1"] and "skip (record" not in line["linear random_s1"]
    assert "--weights random" in line["transfer voc_seg random"]
    assert "results.tables" in line["tables"]
    assert "transfer.voc07_svm --ckpt random" in line["transfer voc07_svm random"]
    # the full grid (make demo FULL=1): every method, task and label fraction
    monkeypatch.setenv("FULL", "1")
    full = _plan_lines(capsys, "--out", str(root))
    assert len(full) == 1 + (9 + 2) + 6 * (11 + 3) + 1  # FULL: the supervised ceiling for every seed too
    assert "pretrain.supervised --seed 1" in full["pretrain supervised_s1"]
    for m in demo.METHODS:
        assert any(f"--loss {m}" in ln for k, ln in full.items() if k == f"pretrain {m}")
        for t in demo.TASKS:
            assert f"--task {t}" in full[f"transfer {t} {m}"]
    monkeypatch.delenv("FULL")
    # --force: nothing is skipped, pretraining starts over
    assert demo.main(["--dry-run", "--out", str(root), "--force"]) == 0
    forced = capsys.readouterr().out
    assert "skip (record" not in forced and "--fresh" in forced


def test_demo_epochs_are_other_runs_named_by_their_schedule(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.delenv("FULL", raising=False)
    root = tmp_path / "demo"
    write_record("pretrain", "moco_v2", root / "pretrain" / "moco_v2", {"loss_final": 5.0})  # a 480-step run
    line = _plan_lines(capsys, "--out", str(root), "--epochs", "48", "--methods", "moco_v2,jcl")
    for m in ("moco_v2", "jcl"):
        assert f"--loss {m} --name {m}_e48 --out {root / 'pretrain' / f'{m}_e48'}" in line[f"pretrain {m}_e48"]
        assert "train.epochs=48" in line[f"pretrain {m}_e48"] and "skip (record" not in line[f"pretrain {m}_e48"]
        assert "train.epochs=48" in line[f"pretrain {m}_e48_s1"] and "train.seed=1" in line[f"pretrain {m}_e48_s1"]
        assert f"knn {m}_e48_s1" in line and f"transfer voc_det {m}_e48" in line
    assert not any(k in line for k in ("pretrain moco_v2", "pretrain jcl", "knn moco_v2_s1"))
    assert "train.epochs" not in line["pretrain supervised"]  # the ceiling keeps its own schedule
    # the preset's own number is the preset's runs: no suffix, no override
    same = _plan_lines(capsys, "--out", str(root), "--epochs", str(demo.toy_epochs()))
    assert "skip (record" in same["pretrain moco_v2"] and "train.epochs" not in same["pretrain moco_v2_s1"]
    assert demo.main(["--dry-run", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_demo_rejects_unknown_names(capsys):
    assert demo.main(["--dry-run", "--methods", "moco_v2,jlc"]) == 2
    assert "unknown method 'jlc'" in capsys.readouterr().err
    assert demo.main(["--dry-run", "--tasks", "voc"]) == 2
    assert demo.main(["--dry-run", "--seeds", "0,x"]) == 2
    assert "--seeds takes integers" in capsys.readouterr().err


def test_sweep_spec_to_runs_and_back(tmp_path):
    spec = sweep.load_spec(REPO / "results" / "sweeps" / "jcl_m_toy.yaml")
    runs = sweep.variants(spec)
    assert [v.run for v in runs] == ["jcl_m_toy/data.num_keys=1", "jcl_m_toy/data.num_keys=2",
                                     "jcl_m_toy/data.num_keys=3"]
    for v in runs:  # the ablation tables recover the sweep and its keys from the run name
        assert parse_sweep_name(v.run) == ("jcl_m_toy", {"data.num_keys": v.run.rsplit("=", 1)[1]})
    p = tmp_path / "s.yaml"
    p.write_text("name: g\nmethod: co2\ngrid:\n  loss.con_weight: [0.5, 1]\n  loss.tau_con: [0.1]\ntrials: 2\n"
                 "evals: [linear, voc_det]\n")
    spec = sweep.load_spec(p)
    runs = sweep.variants(spec)
    assert runs[1].run == "g/loss.con_weight=0.5__loss.tau_con=0.1/seed=1"
    assert runs[1].overrides == ("loss.con_weight=0.5", "loss.tau_con=0.1", "train.seed=1")
    assert parse_sweep_name(runs[1].run) == ("g", {"loss.con_weight": "0.5", "loss.tau_con": "0.1"})
    stages = sweep.plan(spec, tmp_path)
    assert [s.kind for s in stages[:3]] == ["pretrain", "convert", "linear"]
    assert "--name" in stages[0].argv and runs[0].run in stages[0].argv


@pytest.mark.parametrize("text,match", [
    ("name: x\nmethod: jcl\ngrid: {data.num_keys: [1]}\nepochs: 3\n", "unknown key 'epochs'"),
    ("name: x\nmethod: jlc\ngrid: {data.num_keys: [1]}\n", "unknown method 'jlc'"),
    ("name: x\nmethod: jcl\ngrid: {data.num_keys: []}\n", "non-empty lists"),
    ("name: a/b\nmethod: jcl\ngrid: {data.num_keys: [1]}\n", "may not contain"),
    ("name: x\nmethod: jcl\ngrid: {data.num_keys: [1]}\nevals: [knn]\n", "unknown evaluation 'knn'"),
    ("method: jcl\ngrid: {data.num_keys: [1]}\n", "'name' is required"),
])
def test_sweep_spec_errors(tmp_path, text, match):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        sweep.load_spec(p)


def test_sweep_checks_every_config_before_running(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmethod: jcl\nscale: toy\ngrid: {data.num_keyz: [1, 2]}\n")
    assert sweep.main([str(p), "--dry-run"]) == 2
    assert "data.num_keyz" in capsys.readouterr().err
    assert sweep.main([]) == 2  # no spec: one line saying how to give one


def test_a_full_scale_sweep_on_the_toy_data_is_refused_unless_forced(toy_datasets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(toy_datasets))
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "out"))
    assert sweep.main(["results/sweeps/jcl_m.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep jcl_m: full scale on the embedded toy data" in err[0] and "--force-full" in err[0]
    assert sweep.main(["results/sweeps/jcl_m.yaml", "--dry-run", "--force-full"]) == 0
    out = capsys.readouterr().out
    assert "--force-full" in out and "--scale full" in out
