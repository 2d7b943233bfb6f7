"""Side-by-side timing and peak-memory measurement of ours vs a baseline, in one process.

Each benchmark module ``benchmarks/bench_*.py`` defines ``cases(device, quick) -> list[Case]``.
Ours and the baseline run alternately on the same input (which goes first alternates too),
``repeats`` times each; we report medians and their ratio, which is robust to the noise of a
shared machine.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
On CPU, torch has no allocator statistics: Linux's resident-set high-water mark (``VmHWM``) is reset
before the call (``/proc/self/clear_refs``) and read after it, and we report it above the resident
size before the call. Large tensors are ``mmap``-ed and returned to the OS when freed, so this
tracks tensor memory well. Where the reset is not allowed, a thread samples the resident size every
millisecond instead — a thread that also competes with torch's two worker threads on a 2-core
machine and slowed the measured calls by up to 4×, which is why it is only the fallback.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Case:
    name: str
    ours: Callable[[Any], Any]
    baseline: Callable[[Any], Any]
    baseline_name: str
    make_input: Callable[[], Any]
    input_desc: str
    repeats: int = 3
    notes: str = ""
    check: Callable[[Any, Any], str] | None = None  # compares results; returns a short note
    check_medians: bool = False  # call `check` with the median seconds instead of the results
    extra: dict = field(default_factory=dict)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _high_water_mark() is not None


class _PeakRSS:
    def __enter__(self):
        gc.collect()
        self.start = _rss()
        self.peak = self.start
        self._thread = None
        if not _reset_high_water_mark():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _high_water_mark() or 0)
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure(fn: Callable[[Any], Any], data: Any, device: torch.device) -> tuple[float, int, Any]:
    """Seconds, extra peak bytes and result of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        result = fn(data)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return seconds, torch.cuda.max_memory_allocated(device) - before, result
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        result = fn(data)
        seconds = time.perf_counter() - t0
    return seconds, mem.extra, result


def run_case(case: Case, device: torch.device) -> dict:
    data = case.make_input()
    # Warm-up (library loading, allocator, kernels), then alternate to share the machine's noise.
    measure(case.ours, data, device)
    measure(case.baseline, data, device)
    ours_t, base_t, ours_m, base_m = [], [], [], []
    ours_result = base_result = None
    for i in range(case.repeats):
        # Alternate which goes first, so neither always runs on a freshly disturbed machine.
        for which in ("ours", "base") if i % 2 == 0 else ("base", "ours"):
            if which == "ours":
                t, m, ours_result = measure(case.ours, data, device)
                ours_t.append(t)
                ours_m.append(m)
            else:
                t, m, base_result = measure(case.baseline, data, device)
                base_t.append(t)
                base_m.append(m)
    ours_s, base_s = statistics.median(ours_t), statistics.median(base_t)
    row = {
        "benchmark": case.name,
        "input": case.input_desc,
        "baseline": case.baseline_name,
        "device": str(device),
        "ours_s": ours_s,
        "baseline_s": base_s,
        "speedup": base_s / ours_s if ours_s > 0 else float("inf"),
        "ours_peak_mib": max(ours_m) / 2**20,
        "baseline_peak_mib": max(base_m) / 2**20,
        "repeats": case.repeats,
        "notes": case.notes,
    }
    if case.check is not None:
        row["agreement"] = case.check(ours_s, base_s) if case.check_medians else case.check(ours_result, base_result)
    row.update(case.extra)
    del data
    gc.collect()
    return row


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| benchmark | input | baseline | ours (s) | baseline (s) | speed-up | ours peak (MiB)"
        " | baseline peak (MiB) | agreement |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['input']} | {r['baseline']} | {r['ours_s']:.3f} | {r['baseline_s']:.3f}"
            f" | {r['speedup']:.2f}× | {r['ours_peak_mib']:.1f} | {r['baseline_peak_mib']:.1f}"
            f" | {r.get('agreement', '')} |"
        )
    return "\n".join(lines)
