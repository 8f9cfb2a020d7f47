"""The benchmark sections; each returns rows (dicts) with measured times and ratios against the reference measured
in the same run on the same device.

- ``compute``: one training step per method with the batch already on the device (model compute only): the
  reference MoCo v2 step at the engine's semantics (one-process split-BN in 8 sub-batches, MoCo's notebook
  ``SplitBatchNorm``), the plain reference (one BN group), ours MoCo v2 and ours JCL in alternating windows (ratio
  min-max over the windows), then the other methods; img/s, s/step, peak memory, ratio = reference s/img / this
  s/img.
- ``switches``: ours (MoCo v2) with each fast-path switch flipped; speed-up of each switch = time without / with.
- ``pipeline``: data loader + step, end to end (reference loader + reference step vs ours, the engine's
  ``pretrain.engine.build_pipeline``), per method, and ours with ``prefetch`` / ``gpu_aug`` (``data.aug_device``)
  flipped.
- ``data``: the loaders alone (batches delivered on the device), per augmentation preset and pipeline.
- ``transfer``: detectron2 s/iter per task, linear probe cached vs standard per epoch, converter time
  (``benchmarks.transfer``).
- ``profile``: where ours' MoCo v2 step spends its time (``torch.profiler``: top operators by device time, and the
  step split into its phases timed with synchronisation).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import fastpath as fp
from benchmarks.inputs import build_pipeline, synthetic_imagefolder
from benchmarks.measure import Timing, time_calls, time_interleaved, time_iterable

METHODS = ("moco_v2", "jcl", "eqco", "simo", "co2")
SECTIONS = ("compute", "switches", "pipeline", "data", "transfer", "profile")


@dataclass
class Settings:
    device: str = "cpu"
    image_size: int = 64
    batch: int = 32
    queue_size: int = 65536
    jcl_keys: int = 5
    steps: int = 2
    warmup: int = 1
    repeats: int = 5  # windows of the alternating measurements (the ratio's min-max is over them)
    workers: int = 2
    source_size: tuple[int, int] = (96, 72)
    data_batches: int = 6
    methods: tuple[str, ...] = METHODS
    compile: bool = False
    quick: bool = False

    @staticmethod
    def for_device(device: str, quick: bool = False) -> Settings:
        """CPU: 64 px, batch 32 (the issue's CPU goal). GPU: 224 px, batch 256 (the paper's). ``quick``: tiny."""
        if quick:
            return Settings(device, image_size=32, batch=8, queue_size=64, jcl_keys=2, steps=1, warmup=1,
                            repeats=2, workers=1, source_size=(48, 36), data_batches=2, quick=True)
        if device == "cuda":
            return Settings(device, image_size=224, batch=256, steps=6, warmup=3, repeats=5,
                            workers=min(os.cpu_count() or 8, 16), source_size=(500, 375), data_batches=12)
        return Settings(device)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _images(s: Settings, views: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, views, 3, s.image_size, s.image_size, generator=g)  # N x V x 3 x S x S
    return x.to(s.torch_device)


def _row(name: str, timing: Timing, ref: Timing | None, **extra) -> dict:
    row = {"name": name, **extra, **timing.to_dict()}
    if ref is not None:
        row["ratio_vs_reference"] = (ref.s_per_step / ref.items_per_step) / (timing.s_per_step / timing.items_per_step)
    return row


def _time_step(step: fp.Step, s: Settings, images: torch.Tensor) -> Timing:
    timing = time_calls(lambda: step(images), s.torch_device, s.batch, s.steps, s.warmup, min(s.repeats, 2))
    losses = step.drain()
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss in the benchmark step: {losses}")
    return timing


def ours_compute(s: Settings, method: str, sw: fp.Switches) -> tuple[Timing, int]:
    cfg = fp.method_config(method, s.batch, s.image_size, s.queue_size, s.jcl_keys)
    step = fp.build_ours(cfg, s.torch_device, sw)
    timing = _time_step(step, s, _images(s, step.num_views))
    views = step.num_views
    del step
    _free()
    return timing, views


def _paired_ratios(ref: Timing, t: Timing) -> list[float]:
    """Speed ratio per alternating window: reference s/img / this s/img, window by window."""
    return [(r / ref.items_per_step) / (w / t.items_per_step) for r, w in zip(ref.windows_s_per_step,
                                                                             t.windows_s_per_step)]


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values), "windows": len(values)} if values else {}


def reference_splits(s: Settings) -> int:
    """The moco_v2 preset's ``model.bn_splits`` (8, the recipe's GPUs), kept to >= 2 images per sub-batch."""
    g = fp.method_config("moco_v2", s.batch, s.image_size, s.queue_size).model.bn_splits
    while g > 1 and (s.batch % g or s.batch // g < 2):
        g -= 1
    return g


def section_compute(s: Settings, log: Callable[[str], None]) -> tuple[list[dict], Timing]:
    """Reference (split-BN: the engine's semantics), the plain reference, ours MoCo v2 and ours JCL in alternating
    windows, then the other methods one after the other."""
    sw = fp.Switches.defaults(s.torch_device, s.compile)
    splits = reference_splits(s)
    jcl = "jcl" in s.methods
    steps = {"reference": fp.build_reference(s.torch_device, s.queue_size, bn_splits=splits),
             "reference_plain": fp.build_reference(s.torch_device, s.queue_size),
             "moco_v2": fp.build_ours(fp.method_config("moco_v2", s.batch, s.image_size, s.queue_size), s.torch_device,
                                      sw)}
    if jcl:
        steps["jcl"] = fp.build_ours(fp.method_config("jcl", s.batch, s.image_size, s.queue_size, s.jcl_keys),
                                     s.torch_device, sw)
    images = {k: _images(s, st.num_views) for k, st in steps.items()}
    t = time_interleaved({k: functools.partial(st, images[k]) for k, st in steps.items()}, s.torch_device,
                         {k: s.batch for k in steps}, s.steps, s.warmup, max(s.repeats, 2))
    for st in steps.values():
        losses = st.drain()
        if not all(math.isfinite(v) for v in losses):
            raise RuntimeError(f"non-finite loss in the benchmark step: {losses}")
    views = {k: st.num_views for k, st in steps.items()}
    steps.clear()
    _free()
    ref = t["reference"]
    rows = [_row("reference moco_v2", ref, ref, impl="reference", method="moco_v2", views=2,
                 bn=f"split-BN {splits} (MoCo notebook SplitBatchNorm)"),
            _row("reference moco_v2, one BN group", t["reference_plain"], ref, impl="reference_plain",
                 method="moco_v2", views=2, bn="one BN group (MoCo on one GPU)",
                 ratio_windows=_spread(_paired_ratios(ref, t["reference_plain"]))),
            _row("ours moco_v2", t["moco_v2"], ref, impl="ours", method="moco_v2", views=2, switches=sw.describe(),
                 bn=f"split-BN {splits}", ratio_windows=_spread(_paired_ratios(ref, t["moco_v2"])))]
    r = rows[-1]
    log(f"compute reference moco_v2 (split-BN {splits}): {ref.items_per_s:.1f} img/s; ours moco_v2: "
        f"{t['moco_v2'].items_per_s:.1f} img/s ({r['ratio_vs_reference']:.2f}x reference, "
        f"{r['ratio_windows']['min']:.2f}-{r['ratio_windows']['max']:.2f} over {r['ratio_windows']['windows']} "
        "alternating windows)")
    if jcl:
        per_image = [1.0 / x for x in _paired_ratios(t["moco_v2"], t["jcl"])]  # JCL s/img / MoCo v2 s/img
        rows.append(_row("ours jcl", t["jcl"], ref, impl="ours", method="jcl", views=views["jcl"],
                         switches=sw.describe(), bn=f"split-BN {splits}",
                         ratio_windows=_spread(_paired_ratios(ref, t["jcl"])),
                         time_per_image_vs_moco_v2=(t["jcl"].s_per_step / t["moco_v2"].s_per_step),
                         time_per_image_vs_moco_v2_windows=_spread(per_image)))
        r = rows[-1]
        log(f"compute ours jcl (M = {views['jcl'] - 1}): {t['jcl'].items_per_s:.1f} img/s, "
            f"{r['time_per_image_vs_moco_v2']:.2f}x MoCo v2's time per image "
            f"({r['time_per_image_vs_moco_v2_windows']['min']:.2f}-{r['time_per_image_vs_moco_v2_windows']['max']:.2f})")
    for method in s.methods:
        if method in ("moco_v2", "jcl"):
            continue
        timing, v = ours_compute(s, method, sw)
        rows.append(_row(f"ours {method}", timing, ref, impl="ours", method=method, views=v, switches=sw.describe()))
        log(f"compute ours {method}: {timing.items_per_s:.1f} img/s ({rows[-1]['ratio_vs_reference']:.2f}x reference)")
    if "moco_v2" not in s.methods:
        rows = [r for r in rows if r["name"] != "ours moco_v2"]
    return rows, ref


def section_switches(s: Settings, log: Callable[[str], None]) -> list[dict]:
    """Reference, ours (MoCo v2) and ours with each switch flipped, all resident, in alternating windows."""
    sw = fp.Switches.defaults(s.torch_device, s.compile)
    names = [n for n in fp.COMPUTE_SWITCHES if n != "compile" or s.compile or s.device == "cuda"]
    cfg = fp.method_config("moco_v2", s.batch, s.image_size, s.queue_size, s.jcl_keys)
    steps = {"reference": fp.build_reference(s.torch_device, s.queue_size, bn_splits=reference_splits(s)),
             "ours": fp.build_ours(cfg, s.torch_device, sw)}
    for name in names:
        steps[name] = fp.build_ours(cfg, s.torch_device, sw.flipped(name))
    images = _images(s, 2)
    t = time_interleaved({k: functools.partial(st, images) for k, st in steps.items()}, s.torch_device,
                         {k: s.batch for k in steps}, s.steps, s.warmup, max(s.repeats, 2))
    for st in steps.values():
        st.drain()
    steps.clear()
    _free()
    ref, ours, rows = t["reference"], t["ours"], []
    for name in names:
        on, off = (ours, t[name]) if getattr(sw, name) else (t[name], ours)
        rows.append({"switch": name, "in_ours": getattr(sw, name), "engine_key": fp.ENGINE_KEYS[name],
                     "img_per_s_on": on.items_per_s, "img_per_s_off": off.items_per_s,
                     "speedup_on_vs_off": off.s_per_step / on.s_per_step, "peak_mb_on": on.peak_mb,
                     "peak_mb_off": off.peak_mb, "ratio_on_vs_reference": ref.s_per_step / on.s_per_step,
                     "ratio_off_vs_reference": ref.s_per_step / off.s_per_step,
                     "windows_on": on.windows_s_per_step, "windows_off": off.windows_s_per_step})
        log(f"switch {name}: on {on.items_per_s:.1f} / off {off.items_per_s:.1f} img/s "
            f"(x{rows[-1]['speedup_on_vs_off']:.2f})")
    return rows


def _pipeline_timing(s: Settings, kind: str, step: fp.Step, sw: fp.Switches, root) -> Timing:
    views = step.num_views
    it_factory = lambda: build_pipeline(kind, root, s.torch_device, image_size=s.image_size,  # noqa: E731
                                        batch=s.batch, num_views=views, workers=s.workers, prefetch=sw.prefetch,
                                        out_dtype=torch.bfloat16 if sw.bf16 else torch.float32)
    timing = time_iterable(it_factory, lambda b: step(b[0]), s.torch_device, s.batch, s.steps * min(s.repeats, 3),
                           max(s.warmup, 2))  # two untimed batches: the workers' start and the first allocations
    step.drain()
    return timing


def _dataset(s: Settings):
    """One synthetic folder for the pipeline and data sections (enough images for the longest of them)."""
    batches = max(s.steps * s.repeats + s.warmup, s.data_batches + 1) + 2
    return synthetic_imagefolder(max(batches * s.batch, 16), tuple(s.source_size))


def section_pipeline(s: Settings, log: Callable[[str], None]) -> list[dict]:
    root = _dataset(s)
    sw = fp.Switches.defaults(s.torch_device, s.compile)
    ref_step = fp.build_reference(s.torch_device, s.queue_size, bn_splits=reference_splits(s))
    ref = _pipeline_timing(s, "reference", ref_step, fp.Switches(prefetch=False), root)
    del ref_step
    _free()
    log(f"pipeline reference moco_v2: {ref.items_per_s:.1f} img/s")
    rows = [_row("reference moco_v2", ref, ref, impl="reference", method="moco_v2", pipeline="reference")]
    variants = ([(m, sw) for m in s.methods] + [("moco_v2", sw.flipped(n)) for n in fp.PIPELINE_SWITCHES]
                + ([("jcl", sw.flipped("gpu_aug"))] if "jcl" in s.methods else []))
    for method, v in variants:
        cfg = fp.method_config(method, s.batch, s.image_size, s.queue_size, s.jcl_keys)
        step = fp.build_ours(cfg, s.torch_device, v)
        kind = "device" if v.gpu_aug else "pil"
        t = _pipeline_timing(s, kind, step, v, root)
        del step
        _free()
        flipped = [n for n in fp.PIPELINE_SWITCHES if getattr(v, n) != getattr(sw, n)]
        name = f"ours {method}" + (f" ({flipped[0]} {'on' if getattr(v, flipped[0]) else 'off'})" if flipped else "")
        rows.append(_row(name, t, ref, impl="ours", method=method, pipeline=kind, switches=v.describe()))
        log(f"pipeline {name}: {t.items_per_s:.1f} img/s ({rows[-1]['ratio_vs_reference']:.2f}x reference)")
    return rows


def section_data(s: Settings, log: Callable[[str], None]) -> list[dict]:
    """Loader throughput: samples (1 image, V views) per second delivered on the device."""
    root = _dataset(s)
    dev = s.torch_device
    cases = [("reference", "moco_v2", 2, "pil"), ("pil", "moco_v2", 2, "pil"), ("device", "moco_v2", 2, "pil"),
             ("device", "moco_v2", 2, "tensor"), ("pil", "moco_v1", 2, "pil"), ("device", "moco_v1", 2, "pil"),
             ("pil_decode_per_view", "moco_v2", 1 + s.jcl_keys, "pil"), ("pil", "moco_v2", 1 + s.jcl_keys, "pil"),
             ("device", "moco_v2", 1 + s.jcl_keys, "pil")]
    rows, ref = [], None

    def consume_reference(batch):  # the reference step's copy, so every pipeline delivers batches on the device
        return [v.to(dev, non_blocking=True) for v in batch[0]]

    for kind, aug, views, crop in cases:
        def make(kind=kind, aug=aug, views=views, crop=crop):
            return build_pipeline(kind, root, dev, augmentation=aug, image_size=s.image_size, batch=s.batch,
                                  num_views=views, workers=s.workers, prefetch=dev.type == "cuda", crop_backend=crop)
        t = time_iterable(make, consume_reference if kind == "reference" else (lambda b: b), dev, s.batch,
                          s.data_batches, 1)
        ref = ref or t
        label = f"{kind} {aug} x{views} views" + (" (tensor crops)" if crop == "tensor" else "")
        rows.append(_row(label, t, ref, pipeline=kind if crop == "pil" else f"{kind}+tensor_crop", augmentation=aug,
                         views=views, workers=s.workers))
        log(f"data {rows[-1]['name']}: {t.items_per_s:.1f} samples/s ({rows[-1]['ratio_vs_reference']:.2f}x)")
    return rows


def run_sections(s: Settings, only: tuple[str, ...], log: Callable[[str], None]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if "compute" in only:
        out["compute"], _ = section_compute(s, log)
    if "switches" in only:
        out["switches"] = section_switches(s, log)
    if "pipeline" in only:
        out["pipeline"] = section_pipeline(s, log)
    if "data" in only:
        out["data"] = section_data(s, log)
    if "transfer" in only:
        from benchmarks.transfer import section_transfer

        out["transfer"] = section_transfer(s, log)
    if "profile" in only:
        out["profile"] = section_profile(s, log)
    return out


def section_profile(s: Settings, log: Callable[[str], None]) -> list[dict]:
    """Ours (MoCo v2, fast-path defaults): the top operators of a few steps by self device time (CPU time on a CPU
    run), as rows ``{op, self_ms_per_step, share, calls_per_step}``."""
    from torch.profiler import ProfilerActivity, profile

    sw = fp.Switches.defaults(s.torch_device, s.compile)
    cfg = fp.method_config("moco_v2", s.batch, s.image_size, s.queue_size, s.jcl_keys)
    step = fp.build_ours(cfg, s.torch_device, sw)
    images = _images(s, step.num_views)
    for _ in range(max(s.warmup, 1)):
        step(images)
    steps = max(min(s.steps, 3), 1)
    gpu = s.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(images)
        if gpu:
            torch.cuda.synchronize()
    step.drain()
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:20]
    rows = [{"op": e.key, "self_ms_per_step": getattr(e, key) / 1000 / steps, "share": getattr(e, key) / total,
             "calls_per_step": e.count / steps} for e in top]
    log("profile: " + ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in rows[:5]))
    del step
    _free()
    return rows
