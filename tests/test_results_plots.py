"""Plots that tell the truth (issue 19.7): points as well as lines, a one-point run drawn and said so, no spike from
the engine's partial log window at an epoch end, ablation axes from 0 with the chance level, the random-init floor,
each point's n and ± std error bars, and the kNN learning curves with random init and chance as lines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from results import plots, tables
from results.collect import results_frame

FIXTURES = Path(__file__).parent / "fixtures" / "records"


def _toy_run(tmp_path: Path, name: str, rows: list[dict], method: str = "moco_v2", log_every: int = 5,
             **metrics) -> dict:
    """A pretraining record (as ``iter_records`` loads it) with its ``metrics.jsonl``."""
    d = tmp_path / "pretrain" / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {"schema": "ctbench.record/1", "id": f"t-{name}", "inputs": [], "kind": "pretrain", "name": name,
           "config": {"method": method, "train": {"log_every": log_every}},
           "dataset": {"toy": True}, "outputs": {"metrics": "metrics.jsonl"}, "metrics": metrics,
           "_path": str(d / "record.json")}
    (d / "record.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "_path"}))
    return rec


def _engine_rows(losses: list[float], steps_per_epoch: int = 31, log_every: int = 5) -> list[dict]:
    """What pretrain.engine logs: a loss line every log_every steps and at each epoch end (mean since the last
    line), the epoch summary line after it."""
    rows, window = [], []
    for i, loss in enumerate(losses):
        step = i + 1
        window.append(loss)
        epoch_done = step % steps_per_epoch == 0
        if step % log_every == 0 or epoch_done or step == len(losses):
            rows.append({"step": step, "epoch": i // steps_per_epoch, "loss": sum(window) / len(window)})
            window = []
        if epoch_done:
            rows.append({"step": step, "epoch": i // steps_per_epoch, "epoch_end": 1, "loss_epoch": 0.0})
    return rows


def test_the_epoch_end_partial_window_is_merged_not_plotted_alone():
    # 62 steps (2 toy epochs of 31): the engine's line at step 31 is the mean of ONE step; that step is an outlier
    losses = [6.0 - 0.01 * i for i in range(62)]
    losses[30] = 9.0
    rows = _engine_rows(losses)
    assert [r["step"] for r in rows if "loss" in r][:8] == [5, 10, 15, 20, 25, 30, 31, 35]  # the 1-step window
    windows = plots.loss_windows(rows, log_every=5)
    assert 31 not in [w["step"] for w in windows]
    assert all(w["n"] >= 5 for w in windows)
    assert sum(w["n"] for w in windows) == 62
    # a mean weighted by steps: the same total as the steps themselves
    assert sum(w["n"] * w["loss"] for w in windows) == pytest.approx(sum(losses))
    merged = next(w for w in windows if w["step"] == 35)  # steps 31..35
    assert merged["n"] == 5 and merged["loss"] == pytest.approx(sum(losses[30:35]) / 5)
    # the curve drawn has no point above its neighbours by the outlier's 3.0: the biggest jump is the merged one's
    ys = [w["loss"] for w in windows]
    assert max(abs(a - b) for a, b in zip(ys, ys[1:])) < 0.75
    # without a record's log_every the most common window size is used; a count given by the line wins
    assert plots.loss_windows(rows) == windows
    counted = [{"step": 10, "loss": 1.0, "steps_in_window": 2}, {"step": 12, "loss": 3.0, "steps_in_window": 2}]
    assert plots.loss_windows(counted, log_every=4) == [{"step": 12, "loss": 2.0, "n": 4}]


def test_a_trailing_partial_window_and_a_resumed_run():
    rows = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0}, {"step": 10, "loss": 1.0}, {"step": 11, "loss": 4.0}]
    # step 10 twice (a resume redid it) counts once; the trailing 1-step window joins the one before
    assert plots.loss_windows(rows, log_every=5) == [{"step": 5, "loss": 2.0, "n": 5},
                                                     {"step": 11, "loss": pytest.approx(9.0 / 6), "n": 6}]


def test_loss_curves_draw_points_and_a_one_point_run(tmp_path):
    full = _toy_run(tmp_path, "moco_v2", _engine_rows([6.0 - 0.01 * i for i in range(62)]))
    short = _toy_run(tmp_path, "simo_3steps", [{"step": 3, "epoch": 0, "loss": 5.5}], method="simo")
    fig = plots.loss_figure([full, short])
    ax_full, ax_short = fig.axes[0], fig.axes[1]
    line = ax_full.lines[0]
    assert line.get_marker() == "o"  # points as well as the line
    assert 31 not in list(line.get_xdata())
    one = ax_short.lines[0]
    assert one.get_marker() == "o" and list(one.get_xdata()) == [3] and list(one.get_ydata()) == [5.5]
    assert any("one point" in t.get_text() for t in ax_short.texts)
    assert ax_short.get_xlim()[0] <= 3 <= ax_short.get_xlim()[1]
    paths = plots.loss_curves([full, short], tmp_path / "plots")
    assert {p.name for p in paths} == {"loss_curves.png", "loss_curves.svg"}


def _sweep_frame() -> pd.DataFrame:
    return results_frame(FIXTURES)


def test_ablation_axis_from_zero_with_chance_random_floor_and_n():
    df = _sweep_frame()
    g = df[df["sweep"] == "jcl_m"]
    fig = plots.ablation_figure("jcl_m", g, df[df["method"] == "random"], {"linear": 10})
    top1 = next(ax for ax in fig.axes if ax.get_ylabel() == "linear top1")
    assert top1.get_ylim()[0] == 0
    labels = [ln.get_label() for ln in top1.lines]
    assert "chance 10 (10 classes)" in labels
    random = df[(df["method"] == "random") & (df["task"] == "linear") & (df["metric"] == "top1")]
    assert any(lb.startswith(f"random init {random['value'].mean():.3g}") for lb in labels)
    assert [t.get_text() for t in top1.texts] == ["n=1", "n=1"]
    assert "n=1 trial per point: no error bars" in fig._suptitle.get_text()
    assert [ln.get_marker() for ln in top1.lines if ln.get_label().startswith("_")][:1] == ["o"]
    # --zoom: the axis fits the data
    zoomed = plots.ablation_figure("jcl_m", g, None, None, zoom=True)
    assert next(ax for ax in zoomed.axes if ax.get_ylabel() == "linear top1").get_ylim()[0] > 20


def test_ablation_error_bars_are_the_std_over_trials():
    df = _sweep_frame()
    g = df[df["sweep"] == "jcl_m"]
    extra = g[(g["task"] == "linear") & (g["metric"] == "top1")].copy()
    extra["value"] += 2.0
    extra["seed"] = 1
    fig = plots.ablation_figure("jcl_m", pd.concat([g, extra]), None, None)
    top1 = next(ax for ax in fig.axes if ax.get_ylabel() == "linear top1")
    bars = [c for c in top1.containers if isinstance(c, ErrorbarContainer)][0]
    segs = bars.lines[2][0].get_segments()
    assert [round(float(s[1][1] - s[0][1]), 4) for s in segs] == [round(2 * 2 ** 0.5, 4)] * 2  # 2 x std of (v, v+2)
    assert [t.get_text() for t in top1.texts] == ["n=2", "n=2"]
    assert "error bars: ± std over n trials" in fig._suptitle.get_text()


def test_chance_levels_come_from_the_class_folders(tmp_path):
    root = tmp_path / "imagenet"
    for c in range(4):
        (root / "train" / f"n{c:08d}").mkdir(parents=True)
    rec = {"kind": "linear", "config": {"mode": "cached"}, "dataset": {"path": str(root)}}
    assert plots.count_classes(rec) == 4
    assert plots.count_classes({"dataset": {"path": str(root / "train")}}) == 4
    assert plots.count_classes({"dataset": {"path": str(tmp_path / "gone")}}) is None
    assert plots.chance_levels([rec]) == {"linear": 4}
    assert plots.chance("top1", 4) == 25.0 and plots.chance("top5", 4) == 100.0 and plots.chance("loss", 4) is None


def test_learning_curves_knn_against_step_with_random_init(tmp_path):
    root = tmp_path / "imagenet"
    for c in range(10):
        (root / "train" / f"n{c:08d}").mkdir(parents=True)
    rows = _engine_rows([6.0] * 62) + [{"step": 31, "epoch": 0, "knn_top1": 21.0},
                                        {"step": 62, "epoch": 1, "knn_top1": 26.5}]
    moco = _toy_run(tmp_path, "moco_v2", rows, steps=62)
    simo = _toy_run(tmp_path, "simo", [{"step": 5, "loss": 5.0}], method="simo", steps=62, epochs=2.0,
                    knn_top1=18.0, knn_epoch=2)  # no history in metrics.jsonl: the record's last value
    knn_random = {"kind": "knn", "name": "random", "inputs": [], "metrics": {"top1": 14.5},
                  "dataset": {"path": str(root)}}
    knn_final = {"kind": "knn", "name": "moco_v2", "inputs": [moco], "metrics": {"top1": 27.0},
                 "dataset": {"path": str(root)}}
    fig = plots.learning_figure([moco, simo, knn_random, knn_final])
    ax = fig.axes[0]
    by_label = {ln.get_label(): ln for ln in ax.lines}
    assert list(by_label["MoCo v2"].get_xdata()) == [31, 62]
    assert list(by_label["MoCo v2"].get_ydata()) == [21.0, 26.5]
    assert by_label["MoCo v2"].get_marker() == "o"
    assert list(by_label["SiMo (one point)"].get_xdata()) == [62]
    assert list(by_label["* = pretrain.knn of the final checkpoint"].get_ydata()) == [27.0]
    assert list(by_label["random init 14.5 (n=1)"].get_ydata()) == [14.5, 14.5]
    assert list(by_label["chance 10 (10 classes)"].get_ydata()) == [10.0, 10.0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "kNN top-1 (%)"
    assert plots.learning_figure([simo | {"metrics": {}}]) is None  # nothing to draw: no file


def test_tables_write_the_learning_curves_into_their_plots(tmp_path):
    rec_root = tmp_path / "records"
    rows = _engine_rows([6.0] * 10, steps_per_epoch=5) + [{"step": 5, "knn_top1": 12.0}, {"step": 10, "knn_top1": 15.0}]
    _toy_run(rec_root, "moco_v2", rows, steps=10)
    assert tables.main(["--records", str(rec_root), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "plots" / "knn_curves.png").is_file()
