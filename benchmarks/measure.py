"""Timing and peak memory, the same way for every benchmark.

A measurement runs ``warmup`` calls, then ``repeats`` windows of ``steps`` calls; the device is synchronised only
at the edges of a window (never inside), so a step that does not sync the host is timed as it runs in training.
The reported time per step is the median over windows. Peak memory: on CUDA ``max_memory_allocated`` since the
start of the measurement; on the CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` when the kernel allows it, else the peak since the process started, which is said).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_hwm_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False when the CPU peak cannot be reset (it is then process-wide)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _read_hwm_mb()


@dataclass
class Timing:
    """``s_per_step``: median over windows; ``items_per_s`` = items_per_step / s_per_step."""

    s_per_step: float
    items_per_step: int
    steps: int
    windows_s_per_step: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    peak_scope: str = "window"  # or "process" when the CPU peak could not be reset

    @property
    def items_per_s(self) -> float:
        return self.items_per_step / self.s_per_step if self.s_per_step > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "items_per_s": self.items_per_s}


def time_calls(fn: Callable[[], object], device: torch.device, items_per_step: int, steps: int, warmup: int = 1,
               repeats: int = 1) -> Timing:
    """Time ``fn()`` (one training step, one batch, ...) as described in the module docstring."""
    scoped = reset_peak(device)
    for _ in range(warmup):
        fn()
    sync(device)
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        windows.append((time.perf_counter() - t0) / steps)
    return Timing(statistics.median(windows), items_per_step, steps * repeats, windows, peak_mb(device),
                  "window" if scoped else "process")


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, items_per_step: dict[str, int],
                     steps: int, warmup: int = 1, repeats: int = 3) -> dict[str, Timing]:
    """Like :func:`time_calls` for several functions at once, their windows alternating (a, b, a, b, ...), so a
    change of machine load during the run hits all of them alike. Peak memory: the largest of each function's
    windows (everything resident at the time counts, the other functions' models included)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    windows: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = {k: None for k in fns}
    scoped = True
    for _ in range(repeats):
        for name, fn in fns.items():
            scoped = reset_peak(device) and scoped
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            windows[name].append((time.perf_counter() - t0) / steps)
            p = peak_mb(device)
            peaks[name] = p if peaks[name] is None or (p is not None and p > peaks[name]) else peaks[name]
    return {k: Timing(statistics.median(w), items_per_step[k], steps * repeats, w, peaks[k],
                      "window" if scoped else "process") for k, w in windows.items()}


def time_iterable(make_iter: Callable[[], object], consume: Callable[[object], object], device: torch.device,
                  items_per_step: int, steps: int, warmup: int = 1) -> Timing:
    """Time a pipeline: ``consume(batch)`` for ``warmup + steps`` batches of ``iter(make_iter())``; the clock
    starts after the warm-up batches (worker start-up and the first batches are not counted)."""
    scoped = reset_peak(device)
    it = iter(make_iter())
    for _ in range(warmup):
        consume(next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        consume(next(it))
    sync(device)
    s = (time.perf_counter() - t0) / steps
    del it
    return Timing(s, items_per_step, steps, [s], peak_mb(device), "window" if scoped else "process")
