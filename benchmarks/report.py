"""The Markdown report of one benchmark run, and the check of the issue's speed goals against its numbers."""

from __future__ import annotations

from collections.abc import Mapping


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def evaluate_goals(results: Mapping[str, list[dict]], settings: Mapping, device_name: str) -> list[dict]:
    """The goals of issue 7 that this run's numbers can decide; ``met`` is None where the run cannot decide it."""
    goals = []
    compute = results.get("compute", [])
    pipeline = results.get("pipeline", [])
    data = results.get("data", [])
    h100 = "H100" in device_name and settings.get("image_size") == 224 and settings.get("batch") == 256
    on_gpu = settings.get("device") == "cuda"

    def add(goal: str, target: str, measured: float | None, ok: bool | None, applies: bool, unit: str = "",
            spread: dict | None = None) -> None:
        goals.append({"goal": goal, "target": target, "measured": measured, "unit": unit,
                      "met": ok if applies and measured is not None else None, "applies": applies,
                      **({"spread": spread} if spread else {})})

    ours_c = _find(compute, impl="ours", method="moco_v2")
    jcl_c = _find(compute, impl="ours", method="jcl")
    ours_p = _find(pipeline, name="ours moco_v2")
    dev_d = _find(data, pipeline="device", augmentation="moco_v2", views=2)
    if ours_p:
        add("end-to-end MoCo v2 img/s (one H100, 224 px, batch 256)", ">= 3,000", ours_p["items_per_s"],
            ours_p["items_per_s"] >= 3000, h100, "img/s")
    if ours_c:
        spread = ours_c.get("ratio_windows")
        add("step speed vs the reference step (one H100)", ">= 2.5x", ours_c["ratio_vs_reference"],
            ours_c["ratio_vs_reference"] >= 2.5, h100, "x", spread)
        cpu_goal = settings.get("device") == "cpu" and settings.get("image_size") == 64 and settings.get("batch") == 32
        add("step speed vs the reference step, equal semantics: split-BN in both (CPU, 64 px, batch 32)", ">= 1.0x",
            ours_c["ratio_vs_reference"], ours_c["ratio_vs_reference"] >= 1.0, cpu_goal, "x", spread)
    if ours_c and jcl_c:
        rel = jcl_c.get("time_per_image_vs_moco_v2")
        if rel is None:
            rel = (jcl_c["s_per_step"] / jcl_c["items_per_step"]) / (ours_c["s_per_step"] / ours_c["items_per_step"])
        add(f"JCL (M = {jcl_c['views'] - 1}) time per image vs MoCo v2", "<= 2.1x", rel, rel <= 2.1,
            jcl_c["views"] == 6 and not settings.get("quick"), "x", jcl_c.get("time_per_image_vs_moco_v2_windows"))
    if dev_d:
        add("data pipeline, MoCo v2 pairs/s (GPU aug)", ">= 6,000", dev_d["items_per_s"],
            dev_d["items_per_s"] >= 6000, h100, "pairs/s")
    lin = _find(results.get("transfer", []), kind="linear_speedup")
    if lin and lin.get("speedup") is not None:
        add("cached linear probe vs standard, per epoch", ">= 50x", lin["speedup"], lin["speedup"] >= 50, on_gpu, "x")
    return goals


def render(meta: Mapping, settings: Mapping, results: Mapping[str, list[dict]], goals: list[dict],
           records: Mapping[str, str]) -> str:
    lines = [f"# Benchmark report — {meta['device_name']}", ""]
    git = meta.get("git", {})
    lines += [
        f"- date: {meta['date']}; commit `{git.get('commit')}`{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- device: {meta['device_name']} ({meta['device']}); host CPU: {meta['cpu']}, {meta['cpu_count']} cores, "
        f"torch threads {meta['threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- settings: {settings['image_size']} px crops, batch {settings['batch']}, queue {settings['queue_size']}, "
        f"JCL M = {settings['jcl_keys']}, {settings['steps']} timed steps x {settings['repeats']} window(s) after "
        f"{settings['warmup']} warm-up, {settings['workers']} loader workers, synthetic JPEGs "
        f"{settings['source_size'][0]}x{settings['source_size'][1]}" + (" — QUICK smoke run, not a measurement"
                                                                        if settings.get("quick") else ""),
        f"- load average (1 min) at start / end: {meta['load_start']} / {meta['load_end']}",
    ]
    if meta.get("other_processes"):
        lines.append("- other busy processes at start: " + "; ".join(f"`{p}`" for p in meta["other_processes"]))
    lines += ["- command: `" + meta["command"] + "`", ""]
    lines += ["Ratios are speed ratios measured side by side in this run: (reference time per image) / (this time "
              "per image); > 1 means faster than the reference MoCo v2 (benchmarks/reference_moco.py).", ""]

    if goals:
        lines += ["## Goals (issue 7)", ""]
        lines += _table(["goal", "target", "measured (median)", "min-max over windows", "met"],
                        [[g["goal"], g["target"], f"{_f(g['measured'], 2)} {g['unit']}",
                          (f"{_f(g['spread']['min'], 2)}-{_f(g['spread']['max'], 2)} ({g['spread']['windows']} windows)"
                           if g.get("spread") else "–"),
                          "n/a here" if g["met"] is None else ("yes" if g["met"] else "**no**")] for g in goals])

    if "compute" in results:
        lines += ["## Pretraining step, model compute (batch already on the device)", ""]
        lines += ["The reference is MoCo v2's step with MoCo's one-process split-BN (its notebook's `SplitBatchNorm`, "
                  "8 sub-batches) — the engine's semantics; the one-BN-group reference is MoCo on one GPU. "
                  "Reference, plain reference, ours MoCo v2 and ours JCL ran in alternating windows; min-max = the "
                  "ratio window by window.", ""]

        def spread(r: dict) -> str:
            w = r.get("ratio_windows")
            return f"{_f(w['min'], 2)}-{_f(w['max'], 2)}" if w else "–"

        lines += _table(["run", "views", "BN", "img/s", "s/step", "peak MB", "x reference", "min-max"],
                        [[r["name"], str(r["views"]), r.get("bn", "split-BN (engine)"), _f(r["items_per_s"]),
                          _f(r["s_per_step"], 3), _f(r["peak_mb"], 0), _f(r["ratio_vs_reference"], 2), spread(r)]
                         for r in results["compute"]])
        ours = _find(results["compute"], impl="ours", method="moco_v2")
        if ours:
            lines += [f"Ours: {ours['switches']} (every switch is in `make pretrain`; the switch table names its "
                      "config key).", ""]

    if "switches" in results:
        lines += ["## Fast-path switches (ours, MoCo v2, compute only)", "",
                  "Each row flips one switch of ours; speed-up = time per step without / with the switch.", ""]
        lines += _table(["switch", "in ours here", "make pretrain key", "img/s on", "img/s off", "speed-up",
                         "x ref on", "x ref off", "peak MB on / off"],
                        [[r["switch"], "on" if r["in_ours"] else "off",
                          f"`{r['engine_key']}`" if r.get("engine_key", "always") != "always" else "always",
                          _f(r["img_per_s_on"]),
                          _f(r["img_per_s_off"]), _f(r["speedup_on_vs_off"], 2), _f(r["ratio_on_vs_reference"], 2),
                          _f(r["ratio_off_vs_reference"], 2), f"{_f(r['peak_mb_on'], 0)} / {_f(r['peak_mb_off'], 0)}"]
                         for r in results["switches"]])

    if "pipeline" in results:
        lines += ["## End to end: data loader + step", "",
                  "Ours = the engine's loader (`pretrain.engine.build_pipeline`): `pil` = `data.aug_device=cpu`, "
                  "`device` = `data.aug_device=gpu` (on a CPU run: the batched augmentation on CPU tensors in the "
                  "main process). The reference: MoCo's loader + its split-BN step.", ""]
        lines += _table(["run", "pipeline", "img/s", "s/step", "peak MB", "x reference"],
                        [[r["name"], r["pipeline"], _f(r["items_per_s"]), _f(r["s_per_step"], 3),
                          _f(r["peak_mb"], 0), _f(r["ratio_vs_reference"], 2)] for r in results["pipeline"]])

    if "data" in results:
        lines += ["## Data pipeline alone (batches delivered on the device)", "",
                  "samples/s: images per second, each with `views` augmented crops (pairs/s for 2 views). "
                  "`device`: decode + crop in workers, jitter/grayscale/blur/flip batched on the device "
                  "(on a CPU run that is the main process).", ""]
        lines += _table(["pipeline", "augmentation", "views", "samples/s", "x reference"],
                        [[r["pipeline"], r["augmentation"], str(r["views"]), _f(r["items_per_s"]),
                          _f(r["ratio_vs_reference"], 2)] for r in results["data"]])

    if "transfer" in results:
        lines += ["## Transfer stages", ""]
        lines += _table(["what", "measured", "reference", "x reference", "note"],
                        [[r["name"], r.get("measured_text", ""), r.get("reference_text", "–"),
                          _f(r.get("ratio_vs_reference"), 2), r.get("note", "")] for r in results["transfer"]])

    if "profile" in results:
        lines += ["## Profile: ours, MoCo v2 step (top operators by self time)", ""]
        lines += _table(["operator", "ms per step", "share", "calls per step"],
                        [[f"`{r['op'][:70]}`", _f(r["self_ms_per_step"], 2), f"{100 * r['share']:.1f}%",
                          _f(r["calls_per_step"], 0)] for r in results["profile"]])

    lines += ["## Records", ""] + [f"- {k}: `{v}`" for k, v in records.items()] + [""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)
