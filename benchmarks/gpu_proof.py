"""The GPU proof: one prepared command that runs the GPU tests and the GPU-scale benchmarks.

    python -m benchmarks.gpu_proof                                  # on CUDA: ≤ 8 minutes on an H100/H200
    python -m benchmarks.gpu_proof --out gpu.md --json gpu.json     # also write the table (and the rows)
    python -m benchmarks.gpu_proof --smoke --device cpu             # same code paths, tiny sizes (CI, seconds)

On the device it is given (``--device``, default ``cuda`` when available) it

1. runs the ``gpu``-marked tests (``pytest -m gpu tests``, in a subprocess with a time limit) and
   prints their summary; without CUDA it only says that they skip;
2. runs the cases below, ours and the baseline alternately on the same input in one process, with
   ``torch.cuda.synchronize`` around every timed call (``benchmarks.harness.measure``), medians of a
   few repetitions, the extra peak memory of each call (``torch.cuda.max_memory_allocated``) and a
   check of the results against each other or an exact reference;
3. prints one Markdown table with the device, torch/CUDA versions and the date, ready to paste into
   ``benchmarks/RESULTS.md`` (``--out FILE`` writes it, ``--json FILE`` the rows).

Budgets. GPU time is scarce, so every case has a wall-clock budget: after each repetition the case
stops if another would overrun it (the table says "1 of 3 (budget)"), and a case whose budget does
not fit in what is left of the whole command's limit (470 s) is skipped and listed. One call
cannot be interrupted, so a case's first repetition always completes; the cases run from the most
to the least predictable, so an overrun can only cost the cases after it. The tests get
150 s; the budgets below add up to 303 s.

Estimates. Each case's time is estimated from its work at the peaks of an **H100 SXM5**, from
NVIDIA's H100 datasheet, dense (no sparsity): FP64 tensor core 67 TFLOP/s (cuBLAS uses it for DGEMM
on sm_90; 34 without), FP32 67 TFLOP/s (torch's default float32 matmul, TF32 off), TF32 tensor core
495 TFLOP/s, BF16 tensor core 990 TFLOP/s, HBM3 3.35 TB/s. An H200 has the same compute peaks and
4.8 TB/s, so these estimates are conservative for it. Work models:

- a GEMM is 2·m·n·k flops at the peak of its dtype; the Gram update ZᵀZ of N rows is 2·N·D² (RankMe
  computes the upper triangle only from D = 512: × 0.5625 at D = 2,048);
- a symmetric eigensolver is memory-bound BLAS-2: 10·D³ flops at 5 % of the FP64 peak; the
  values-only SVD (``svdvals``) is 2·N·D² flops of QR plus 4·N·D² bytes of bidiagonalisation traffic;
- the exact kNN is 2·N²·d float32 GEMM flops, ~6 passes over N² float32 scores (writing them, ~4
  radix-select passes of ``topk``, the gather) and ~10 µs per launch (~8 per tile of
  ``reprmetrics._knn.tile_plan``, ~10 per 4 MiB refinement block); ``cdist`` + ``topk`` likewise;
- uniformity is one float32 GEMM of width d + 2 per 4,096² pair tile, ~5 passes over the N²/2 values
  (write, max, exp, sum) and ~6 launches per tile; ``pdist`` is 3·d flops and ~8 passes per pair;
- ``evaluate`` does 6 float64 D×D Gram-type updates per row (RankMe, α-ReQ, NESum, IsoScore, coding
  rate, Wasserstein uniformity), ~12 float64 passes over its input and ~1 ms of launches per
  4,096-row batch; the floor, one Gram update and ~30 µs per batch;
- a ResNet-50 training step is 3× its forward flops (counted on the meta device from the model's
  convolutions and linear layers: 8.2 GFLOP per 224-px image) at an assumed 10 % of the BF16 peak
  (eager PyTorch with BatchNorm); the monitor adds ~7 eigendecompositions per tap every 200 steps.

Full-size estimates (seconds per call of ours / of the baseline) and each case's budget:

| case | size | est. ours (s) | est. baseline (s) | budget (s) |
|---|---|---:|---:|---:|
| gram update vs GEMM peak, float64 | 20 × (B, 2,048) → 2,048², B = 256 / 4,096; 5 GEMMs 8,192³ | 0.0103 | 0.0821 | 8 |
| gram update vs GEMM peak, float32 | 20 × (B, 2,048) → 2,048², B = 256 / 4,096; 5 GEMMs 8,192³ | 0.0103 | 0.0821 | 8 |
| gram update vs GEMM peak, tf32 | 20 × (B, 2,048) → 2,048², B = 256 / 4,096; 5 GEMMs 8,192³ | 0.0014 | 0.0111 | 8 |
| rankme accuracy, near-collapsed | 32,768 × 512 float32, rank 1 + 1e-3 noise | 0.0006 | 0.0823 | 12 |
| uniformity vs pdist | 49,152 × 128 float32, t = 2 | 0.0166 | 0.0185 | 12 |
| uniformity, large N | 262,144 × 128 float32, t = 2 | 0.4633 | — | 20 |
| lid vs cdist+topk | 65,536 × 128 float32, k = 20 | 0.0909 | 0.0574 | 15 |
| evaluate (default set) | 2,000,000 × 256 float32, batches of 4,096 | 0.5274 | 0.0223 | 35 |
| monitor overhead, ResNet-50-like | batch 256 × 2 views, 224 px, bf16 autocast | 0.1279 | 0.1270 | 55 |
| rankme streaming | 262,144 × 2,048 float32, batches of 4,096 | 0.0441 | 1.3457 | 45 |
| lid, large N | 1,000,000 × 128 float32, k = 20 | 12.8235 | — | 50 |
| twonn, large N | 1,000,000 × 128 float32 | 12.3819 | — | 35 |

They are lower bounds at the assumed efficiencies, not promises: the budgets leave room for several
calls of each (the 1M-point kNN cases: one or two).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.harness import measure
from reprmetrics import RankMe, evaluate
from reprmetrics._knn import default_tile_bytes, tile_plan
from reprmetrics.evaluate import DEFAULT_BATCH_SIZE
from reprmetrics.functional import local_intrinsic_dimension, twonn_dimension, uniformity
from reprmetrics.monitor import RepresentationTracker

ROOT = Path(__file__).resolve().parent.parent

# ---- assumed peaks (H100 SXM5 datasheet, dense) and the time limits -------------------------------

ASSUMED_DEVICE = "H100 SXM5"
PEAK_FLOPS = {"float64": 67e12, "float32": 67e12, "tf32": 495e12, "bfloat16": 990e12}
BANDWIDTH = 3.35e12  # bytes/s
BLAS2_EFFICIENCY = 0.05  # eigensolvers' tridiagonalisation and SVD's bidiagonalisation
RESNET_EFFICIENCY = 0.10  # eager PyTorch ResNet-50 with BatchNorm, of the BF16 peak
EVALUATE_LAUNCH_S_PER_BATCH = 1e-3  # ~11 metrics' kernels and bookkeeping per batch
LAUNCH_S = 1e-5  # one kernel launch with its Python overhead
TOPK_PASSES = 6  # writing the scores, ~4 radix-select passes of torch.topk, the final gather

TIME_LIMIT_S = 470.0  # the whole command, under the 8 minutes the proof may take
TESTS_TIMEOUT_S = 150.0


def eigensolver_seconds(d: int) -> float:
    return 10 * d**3 / (BLAS2_EFFICIENCY * PEAK_FLOPS["float64"])


def gemm_seconds(m: int, n: int, k: int, dtype: str) -> float:
    return 2 * m * n * k / PEAK_FLOPS[dtype]


def stored_gram_fraction(d: int, block: int = 256, blocked_from: int = 512) -> float:
    """Share of ZᵀZ that RankMe's update computes (only the upper triangle, in column blocks, from D = 512)."""
    if d < blocked_from:
        return 1.0
    return sum(min(block, d - s) * (d - s) for s in range(0, d, block)) / d**2


def knn_seconds(n: int, d: int, k: int) -> float:
    """The exact kNN on CUDA: the tiles' GEMMs and top-k passes, and ~8 launches per tile and ~10 per
    refinement block (``reprmetrics._knn`` refines about 4 MiB of float64 differences at a time)."""
    rows, cols = tile_plan(n, n, 4, default_tile_bytes(torch.device("cuda")))
    tiles = math.ceil(n / rows) * math.ceil(n / cols)
    refine_blocks = math.ceil(n / max(1, 4 * 2**20 // (8 * (k + 4) * d)))
    return (
        gemm_seconds(n, n, d, "float32")
        + TOPK_PASSES * 4 * n * n / BANDWIDTH
        + (8 * tiles + 10 * refine_blocks) * LAUNCH_S
    )


# ---- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    gram_features: int
    gram_batches: tuple[int, int]
    square_gemm: int
    accuracy_rows: int
    accuracy_features: int
    rankme_rows: int
    rankme_features: int
    batch: int
    knn_fit_rows: int
    knn_rows: int
    knn_features: int
    uniformity_fit_rows: int
    uniformity_rows: int
    uniformity_features: int
    evaluate_rows: int
    evaluate_features: int
    resnet_blocks: tuple[int, int, int, int]
    resnet_width: int
    image_size: int
    monitor_batch: int
    monitor_steps_per_block: int
    repeats: int


FULL = Sizes(
    gram_features=2048, gram_batches=(256, 4096), square_gemm=8192,
    accuracy_rows=32_768, accuracy_features=512,
    rankme_rows=262_144, rankme_features=2048, batch=4096,
    knn_fit_rows=65_536, knn_rows=1_000_000, knn_features=128,
    uniformity_fit_rows=49_152, uniformity_rows=262_144, uniformity_features=128,
    evaluate_rows=2_000_000, evaluate_features=256,
    resnet_blocks=(3, 4, 6, 3), resnet_width=64, image_size=224, monitor_batch=256, monitor_steps_per_block=16,
    repeats=3,
)  # fmt: skip

SMOKE = Sizes(
    gram_features=64, gram_batches=(16, 128), square_gemm=128,
    accuracy_rows=2048, accuracy_features=64,
    rankme_rows=4096, rankme_features=128, batch=512,
    knn_fit_rows=1500, knn_rows=4000, knn_features=16,
    uniformity_fit_rows=1024, uniformity_rows=2048, uniformity_features=16,
    evaluate_rows=6_000, evaluate_features=32,
    resnet_blocks=(1, 1, 1, 1), resnet_width=4, image_size=16, monitor_batch=256, monitor_steps_per_block=2,
    repeats=2,
)  # fmt: skip

K = 20  # neighbours for LID, as LDReg and the monitor


# ---- what a case measures and how a row looks --------------------------------------------------


@dataclass
class Variant:
    """One timed function: ``fn(data)``; ``estimate_s`` is one call at the assumed peaks."""

    label: str
    fn: Callable[[Any], Any]
    estimate_s: float
    meta: dict = field(default_factory=dict)  # what a check needs to know about the variant


@dataclass
class Measured:
    """What a check sees: the variant, the input, the last results of it and the baseline, their medians."""

    variant: Variant
    data: Any
    ours: Any
    baseline: Any
    ours_s: float
    baseline_s: float


@dataclass
class TimedCase:
    """Ours (one or more variants) and a baseline, alternately on the same input, within a budget."""

    name: str
    input_desc: str
    make_input: Callable[[], Any]
    ours: list[Variant]
    baseline: Variant | None
    budget_s: float
    repeats: int
    check: Callable[[Measured], str] | None = None
    no_baseline: str = ""  # why there is no baseline at this size
    speedup: bool = True  # False where ours and the baseline do different work (the GEMM peak)
    warmup_input: Callable[[Any], Any] | None = None  # a smaller input for the untimed warm-up call
    notes: str = ""

    @property
    def estimate_ours_s(self) -> float:
        return max(v.estimate_s for v in self.ours)

    @property
    def estimate_baseline_s(self) -> float | None:
        return self.baseline.estimate_s if self.baseline else None


@dataclass
class CustomCase:
    """A case with its own measurement procedure (the monitor's overhead): ``run(budget_s) -> rows``."""

    name: str
    input_desc: str
    run: Callable[[float], list[dict]]
    estimate_ours_s: float
    estimate_baseline_s: float | None
    budget_s: float


def new_row(case: TimedCase | CustomCase, ours: str, baseline: str, device: torch.device) -> dict:
    return {
        "case": case.name, "input": case.input_desc, "device": str(device), "ours": ours, "ours_s": None,
        "est_ours_s": case.estimate_ours_s, "baseline": baseline, "baseline_s": None,
        "est_baseline_s": case.estimate_baseline_s,
        "speedup": None, "ours_peak_mib": None, "baseline_peak_mib": None, "reps": "", "result": "", "notes": "",
    }  # fmt: skip


# ---- the runner -------------------------------------------------------------------------------


def run_timed_case(
    case: TimedCase, device: torch.device, deadline: float, clock: Callable[[], float] = time.perf_counter
) -> list[dict]:
    """Rows for one case: medians over the repetitions that fit in its budget (and before ``deadline``).

    ``clock`` gives wall-clock seconds (``deadline`` is on it); a test passes a fake one.
    """
    start = clock()
    data = case.make_input()
    variants = [*case.ours, *([case.baseline] if case.baseline else [])]
    warm = case.warmup_input(data) if case.warmup_input else data
    for v in variants:  # untimed: kernels, library handles, allocator
        v.fn(warm)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    peaks: dict[str, list[int]] = {v.label: [] for v in variants}
    results: dict[str, Any] = {}
    setup_done = clock()
    reps = 0
    for rep in range(case.repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:  # alternate who goes first
            seconds, peak, results[v.label] = measure(v.fn, data, device)
            times[v.label].append(seconds)
            peaks[v.label].append(peak)
        reps += 1
        per_rep = (clock() - setup_done) / reps
        if rep + 1 < case.repeats and (clock() + per_rep > start + case.budget_s or clock() + per_rep > deadline):
            break
    reps_note = f"{reps} of {case.repeats}" + (" (budget)" if reps < case.repeats else "")
    base_s = statistics.median(times[case.baseline.label]) if case.baseline else None
    rows = []
    for v in case.ours:
        row = new_row(case, v.label, case.baseline.label if case.baseline else f"none: {case.no_baseline}", device)
        ours_s = statistics.median(times[v.label])
        row.update(
            ours_s=ours_s,
            est_ours_s=v.estimate_s,
            ours_peak_mib=max(peaks[v.label]) / 2**20,
            reps=reps_note,
            notes=case.notes,
        )
        if case.baseline:
            row.update(baseline_s=base_s, baseline_peak_mib=max(peaks[case.baseline.label]) / 2**20)
            if case.speedup:
                row["speedup"] = base_s / ours_s if ours_s > 0 else math.inf
        if case.check is not None:
            got = Measured(
                v,
                data,
                results[v.label],
                results.get(case.baseline.label) if case.baseline else None,
                ours_s,
                base_s or math.nan,
            )
            row["result"] = case.check(got)
        rows.append(row)
    del data, results
    return rows


def run_cases(
    cases: list[TimedCase | CustomCase], device: torch.device, deadline: float, log: Callable[[str], None]
) -> list[dict]:
    rows = []
    for case in cases:
        left = deadline - time.perf_counter()
        if left < case.budget_s:
            row = new_row(case, "—", "—", device)
            row["result"] = (
                f"skipped: {left:.0f} s left of the command's limit, the case's budget is {case.budget_s:.0f} s"
            )
            rows.append(row)
            log(f"skipping {case.name}: {row['result']}")
            continue
        log(f"running {case.name} on {case.input_desc} (budget {case.budget_s:.0f} s) ...")
        t0 = time.perf_counter()
        try:
            got = (
                run_timed_case(case, device, deadline)
                if isinstance(case, TimedCase)
                else case.run(min(case.budget_s, left))
            )
        except Exception as error:  # one failing case must not cost the rest of the GPU time
            row = new_row(case, "—", "—", device)
            row["result"] = f"error: {type(error).__name__}: {error}"
            got = [row]
        log(f"  ... {time.perf_counter() - t0:.1f} s")
        rows += got
        _release(device)
    return rows


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def _bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count / 2**10:,.1f} KiB"


def _flop(count: float) -> str:
    return f"{count / 1e12:,.2f} TFLOP" if count >= 1e12 else f"{count / 1e9:,.2f} GFLOP"


# ---- (b1) the Gram update against the device's GEMM peak -----------------------------------------


@contextlib.contextmanager
def matmul_precision(label: str) -> Iterator[None]:
    """float64 and float32 in IEEE precision; "tf32" lets float32 matmuls use TF32 tensor cores."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _torch_dtype(label: str) -> torch.dtype:
    return torch.float64 if label == "float64" else torch.float32


def gram_peak_cases(device: torch.device, s: Sizes) -> list[TimedCase]:
    d, n, inner = s.gram_features, s.square_gemm, 20  # calls per timed run: amortises the launch

    def make(label: str) -> Callable[[], dict]:
        def make_input() -> dict:
            g, dtype = _generator(device), _torch_dtype(label)
            return {
                "gram": torch.zeros(d, d, dtype=dtype, device=device),
                "batches": {b: torch.randn(b, d, generator=g, device=device, dtype=dtype) for b in s.gram_batches},
                "square": [torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(3)],
            }

        return make_input

    def addmm(label: str, b: int) -> Callable[[dict], None]:
        def run(data: dict) -> None:
            x = data["batches"][b]
            with matmul_precision(label):
                for _ in range(inner):
                    data["gram"].addmm_(x.T, x)

        return run

    def square(label: str) -> Callable[[dict], None]:
        def run(data: dict) -> None:
            a, b, c = data["square"]
            with matmul_precision(label):
                for _ in range(inner // 4):
                    torch.mm(a, b, out=c)

        return run

    def report(label: str) -> Callable[[Measured], str]:
        def check(m: Measured) -> str:
            batch = m.variant.meta["batch"]
            achieved = 2 * batch * d * d * inner / m.ours_s
            peak = 2 * n**3 * (inner // 4) / m.baseline_s
            return (
                f"addmm_ {achieved / 1e12:.2f} TFLOP/s = {100 * achieved / peak:.0f} % of the measured {label} peak"
                f" {peak / 1e12:.2f} TFLOP/s (assumed {PEAK_FLOPS[label] / 1e12:.0f})"
            )

        return check

    return [
        TimedCase(
            name=f"gram update vs GEMM peak, {label}",
            input_desc=f"(B, {d:,}) batches into a {d:,}² {_torch_dtype(label)} accumulator; square GEMM {n:,}³",
            make_input=make(label),
            ours=[
                Variant(
                    f"gram.addmm_(x.T, x), B = {b:,} ({inner} calls)",
                    addmm(label, b),
                    inner * gemm_seconds(d, d, b, label),
                    meta={"batch": b},
                )
                for b in s.gram_batches
            ],
            baseline=Variant(
                f"square torch.mm {n:,}³ ({inner // 4} calls)", square(label), inner // 4 * gemm_seconds(n, n, n, label)
            ),
            budget_s=8,
            repeats=s.repeats,
            check=report(label),
            speedup=False,
            notes="TF32 has no effect on a CPU" if device.type == "cpu" and label == "tf32" else "",
        )
        for label in ("float64", "float32", "tf32")
    ]


# ---- (b2) RankMe: accuracy per accumulator dtype, and streaming at scale -------------------------


def rankme_from_singular_values(sigma: torch.Tensor, eps: float = 1e-7) -> float:
    """The paper's formula on float64 singular values: the baselines' RankMe."""
    sigma = sigma.to(torch.float64)
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _streamed_rankme(batches: list[torch.Tensor], accumulate: str, float64_value: bool = False) -> float:
    """RankMe streamed with a Gram accumulator of ``accumulate`` ("tf32": float32 with TF32 matmuls).

    ``float64_value``: RankMe from the metric's float64 singular values, not the float32 value that
    ``compute()`` returns, so that an accuracy check sees the accumulator's error and not the rounding.
    """
    with matmul_precision(accumulate):
        metric = RankMe(accumulate_dtype=_torch_dtype(accumulate)).to(batches[0].device)
        for b in batches:
            metric.update(b)
        return (
            rankme_from_singular_values(metric.singular_values(), metric.eps)
            if float64_value
            else float(metric.compute())
        )


def _near_collapsed_batches(n: int, d: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = _generator(device)
    direction = torch.randn(1, d, generator=g, device=device, dtype=torch.float64)
    z = torch.randn(n, 1, generator=g, device=device, dtype=torch.float64) @ direction
    z = (z + 1e-3 * torch.randn(n, d, generator=g, device=device, dtype=torch.float64)).to(torch.float32)
    return list(z.split(batch))


def _decaying_batches(n: int, d: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = _generator(device)
    scale = torch.arange(1, d + 1, dtype=torch.float32, device=device).pow(-0.5)  # λ_k ∝ 1/k, like trained encoders
    return [torch.randn(batch, d, generator=g, device=device) * scale for _ in range(n // batch)]


def rankme_cases(device: torch.device, s: Sizes) -> list[TimedCase]:
    n, d = s.accuracy_rows, s.accuracy_features
    accuracy_gram = 2 * n * d * d * stored_gram_fraction(d)

    def svd64(batches: list[torch.Tensor]) -> float:
        return rankme_from_singular_values(torch.linalg.svdvals(torch.cat(batches).to(torch.float64)))

    def rel_err(m: Measured) -> str:
        return (
            f"RankMe {m.ours:.9f} vs float64 SVD {m.baseline:.9f}: rel. error {_rel(m.ours, m.baseline):.1e} (from"
            " its float64 singular values)"
        )

    accuracy = TimedCase(
        name="rankme accuracy, near-collapsed",
        input_desc=f"{n:,} × {d} float32, rank 1 + 1e-3 noise, batches of {s.batch:,}",
        make_input=lambda: _near_collapsed_batches(n, d, s.batch, device),
        ours=[
            Variant(
                f"RankMe(accumulate_dtype={label})" if label != "tf32" else "RankMe(accumulate_dtype=float32), TF32 on",
                lambda b, label=label: _streamed_rankme(b, label, float64_value=True),
                accuracy_gram / PEAK_FLOPS[label] + eigensolver_seconds(d),
            )
            for label in ("float64", "float32", "tf32")
        ],
        baseline=Variant(
            "torch.linalg.svdvals, float64 (reference)",
            svd64,
            2 * n * d * d / PEAK_FLOPS["float64"] + 4 * n * d * d * 8 / BANDWIDTH,
        ),
        budget_s=12,
        repeats=s.repeats,
        check=rel_err,
    )  # fmt: skip

    n, d = s.rankme_rows, s.rankme_features
    gram = 2 * n * d * d * stored_gram_fraction(d)

    def svd32(batches: list[torch.Tensor]) -> float:
        return rankme_from_singular_values(torch.linalg.svdvals(torch.cat(batches)))

    def agreement(m: Measured) -> str:
        return f"RankMe {m.ours:.4f} vs svdvals {m.baseline:.4f} (rel. diff {_rel(m.ours, m.baseline):.1e})"

    streaming = TimedCase(
        name="rankme streaming",
        input_desc=f"{n:,} × {d:,} float32 (λ_k ∝ 1/k), batches of {s.batch:,}",
        make_input=lambda: _decaying_batches(n, d, s.batch, device),
        ours=[
            Variant(
                f"RankMe(accumulate_dtype={label})",
                (lambda b, label=label: _streamed_rankme(b, label)),
                gram / PEAK_FLOPS[label] + eigensolver_seconds(d),
            )
            for label in ("float64", "float32")
        ],
        baseline=Variant(
            "torch.linalg.svdvals(torch.cat(batches)), float32",
            svd32,
            2 * n * d * d / PEAK_FLOPS["float32"] + 4 * n * d * d / BANDWIDTH,
        ),
        budget_s=45,
        repeats=s.repeats,
        check=agreement,
        warmup_input=lambda batches: batches[:2],
        notes="TF32 off (torch's default)",
    )  # fmt: skip
    return [accuracy, streaming]


# ---- (b3) LID and TwoNN: blocked exact kNN --------------------------------------------------------


def manifold_points(n: int, d: int, device: torch.device) -> torch.Tensor:
    """A curved 16-D manifold in d dimensions plus small noise: LIDs in the tens, like real embeddings."""
    g = _generator(device)
    latent = torch.randn(n, 16, generator=g, device=device)
    return torch.tanh(latent) @ torch.randn(16, d, generator=g, device=device) + 0.05 * torch.randn(
        n, d, generator=g, device=device
    )


def lid_from_distances(distances: torch.Tensor) -> torch.Tensor:
    """LDReg's MLE: −k / Σ_{i<k} log(r_i / r_k), from sorted (N, k) distances."""
    k = distances.shape[1]
    return -k / torch.log(distances[:, :-1] / distances[:, -1:]).sum(dim=1)


def cdist_topk_lid(x: torch.Tensor) -> torch.Tensor:
    """What a user would write: all pairwise distances, self excluded, the k smallest of each row."""
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(math.inf)
    nearest, _ = distances.topk(K, dim=1, largest=False)
    del distances
    return lid_from_distances(nearest.to(torch.float64))


def brute_force_lid(x: torch.Tensor, queries: torch.Tensor, k: int = K, reference_chunk: int = 131_072) -> torch.Tensor:
    """Exact LID of the rows ``queries`` of ``x``: float64 direct differences against every row, in chunks."""
    q = x[queries].to(torch.float64)
    best = torch.full((len(queries), k), math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], reference_chunk):
        block = x[start : start + reference_chunk].to(torch.float64)
        dist = torch.cdist(q, block, compute_mode="donot_use_mm_for_euclid_dist")
        own = (queries >= start) & (queries < start + len(block))
        dist[own.nonzero().flatten(), (queries[own] - start)] = math.inf  # exclude each query itself
        best = torch.cat([best, dist], dim=1).topk(k, dim=1, largest=False).values
    return lid_from_distances(best.sort(dim=1).values)


def knn_cases(device: torch.device, s: Sizes) -> list[TimedCase]:
    d = s.knn_features

    def ours_lid(x: torch.Tensor) -> torch.Tensor:
        return local_intrinsic_dimension(x, k=K)

    def versus_cdist(m: Measured) -> str:
        diff = ((m.ours.double() - m.baseline).abs() / m.baseline.abs()).cpu()
        return (
            f"max rel. diff {diff.max():.1e} (median {diff.median():.1e}); the baseline's float32 expansion errs,"
            " ours refines in float64"
        )

    def spot_check(m: Measured) -> str:
        queries = torch.linspace(0, m.data.shape[0] - 1, 256, device=m.data.device).long()
        exact = brute_force_lid(m.data, queries)
        diff = ((m.ours[queries].double() - exact).abs() / exact.abs()).max()
        return (
            f"geometric-mean LID {float(m.ours.double().log().mean().exp()):.3f}; 256 queries vs brute-force"
            f" float64: max rel. diff {float(diff):.1e}"
        )

    n_fit, n = s.knn_fit_rows, s.knn_rows
    cdist_estimate = (
        gemm_seconds(n_fit, n_fit, d, "float32") + (2 + TOPK_PASSES) * 4 * n_fit * n_fit / BANDWIDTH
    )  # + clamp/sqrt pass
    return [
        TimedCase(
            name="lid vs cdist+topk",
            input_desc=f"{n_fit:,} × {d} float32, k = {K}",
            make_input=lambda: manifold_points(n_fit, d, device),
            ours=[Variant("local_intrinsic_dimension (blocked exact kNN)", ours_lid, knn_seconds(n_fit, d, K))],
            baseline=Variant(
                f"torch.cdist + topk ({_bytes(4 * n_fit * n_fit)} N×N matrix)", cdist_topk_lid, cdist_estimate
            ),
            budget_s=15,
            repeats=s.repeats,
            check=versus_cdist,
        ),
        TimedCase(
            name="lid, large N",
            input_desc=f"{n:,} × {d} float32, k = {K}",
            make_input=lambda: manifold_points(n, d, device),
            ours=[Variant("local_intrinsic_dimension (blocked exact kNN)", ours_lid, knn_seconds(n, d, K))],
            baseline=None,
            no_baseline=(
                f"cdist's N×N float32 matrix would be {_bytes(4 * n * n)}; cdist+topk is shown at {n_fit:,} rows"
            ),
            budget_s=50,
            repeats=s.repeats,
            check=spot_check,
            warmup_input=lambda x: x[: max(x.shape[0] // 50, 2 * K)],
        ),
        TimedCase(
            name="twonn, large N",
            input_desc=f"{n:,} × {d} float32",
            make_input=lambda: manifold_points(n, d, device),
            ours=[
                Variant(
                    "twonn_dimension (blocked exact kNN, k = 2)",
                    lambda x: float(twonn_dimension(x)),
                    knn_seconds(n, d, 2),
                )
            ],
            baseline=None,
            no_baseline=f"cdist's N×N float32 matrix would be {_bytes(4 * n * n)}",
            budget_s=35,
            repeats=s.repeats,
            check=lambda m: f"TwoNN dimension {m.ours:.3f} (the points lie on a 16-D manifold plus noise)",
            warmup_input=lambda x: x[: max(x.shape[0] // 50, 16)],
        ),
    ]


# ---- (b4) uniformity -----------------------------------------------------------------------------


def pdist_uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's one-liner on L2-normalised points: all N(N−1)/2 distances at once."""
    x = F.normalize(x, dim=1)
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def uniformity_seconds(n: int, d: int, tile: int = 4096) -> float:
    """Pair tiles of 4,096² on CUDA (``reprmetrics.functional.multiview``), on or above the diagonal."""
    pairs = n * n / 2
    tiles = math.ceil(n / tile) * (math.ceil(n / tile) + 1) / 2
    return 2 * pairs * (d + 2) / PEAK_FLOPS["float32"] + 5 * 4 * pairs / BANDWIDTH + 6 * tiles * LAUNCH_S


def uniformity_cases(device: torch.device, s: Sizes) -> list[TimedCase]:
    d = s.uniformity_features

    def points(n: int) -> torch.Tensor:
        return torch.randn(n, d, generator=_generator(device), device=device)

    def ours(x: torch.Tensor) -> float:
        return float(uniformity(x, t=2.0))

    n_fit, n = s.uniformity_fit_rows, s.uniformity_rows
    pairs_fit = n_fit * (n_fit - 1) / 2
    pdist_estimate = 3 * d * pairs_fit / PEAK_FLOPS["float32"] + 8 * 4 * pairs_fit / BANDWIDTH
    return [
        TimedCase(
            name="uniformity vs pdist",
            input_desc=f"{n_fit:,} × {d} float32, t = 2",
            make_input=lambda: points(n_fit),
            ours=[Variant("functional.uniformity (pair tiles)", ours, uniformity_seconds(n_fit, d))],
            baseline=Variant(
                f"torch.pdist(x̂).pow(2).mul(-t).exp().mean().log() ({_bytes(4 * pairs_fit)} of distances)",
                pdist_uniformity,
                pdist_estimate,
            ),
            budget_s=12,
            repeats=s.repeats,
            check=lambda m: f"{m.ours:.6f} vs {m.baseline:.6f} (rel. diff {_rel(m.ours, m.baseline):.1e})",
        ),
        TimedCase(
            name="uniformity, large N",
            input_desc=f"{n:,} × {d} float32, t = 2",
            make_input=lambda: points(n),
            ours=[Variant("functional.uniformity (pair tiles)", ours, uniformity_seconds(n, d))],
            baseline=None,
            no_baseline=f"pdist's N(N−1)/2 float32 distances alone would be {_bytes(2 * n * (n - 1))}",
            budget_s=20,
            repeats=s.repeats,
            check=lambda m: (
                f"uniformity {m.ours:.6f} (≈ −2t + 2t²/D = {-4 + 8 / d:.4f} for isotropic points on the sphere)"
            ),
            warmup_input=lambda x: x[: max(x.shape[0] // 16, 2)],
        ),
    ]


# ---- (b5) evaluate's default set -----------------------------------------------------------------


def evaluate_case(device: torch.device, s: Sizes) -> TimedCase:
    n, d = s.evaluate_rows, s.evaluate_features
    batches = math.ceil(n / DEFAULT_BATCH_SIZE)

    def make_input() -> torch.Tensor:
        g = _generator(device)
        scale = torch.arange(1, d + 1, dtype=torch.float32, device=device).pow(-0.5)
        return torch.randn(n, d, generator=g, device=device) * scale

    def gram_floor(x: torch.Tensor) -> float:
        """RankMe alone: one float64 ZᵀZ GEMM per batch and one eigendecomposition (the floor of any spectral
        metric)."""
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for b in x.split(DEFAULT_BATCH_SIZE):
            b = b.to(torch.float64)
            gram.addmm_(b.T, b)
        return rankme_from_singular_values(torch.linalg.eigvalsh(gram).clamp_min(0).sqrt())

    def agreement(m: Measured) -> str:
        names = ", ".join(sorted(m.ours))
        return (
            f"{len(m.ours)} metrics ({names}); rankme {m.ours['rankme']:.4f} vs floor {m.baseline:.4f} (rel. diff"
            f" {_rel(m.ours['rankme'], m.baseline):.1e})"
        )

    ours_estimate = (
        12 * n * d * d / PEAK_FLOPS["float64"]
        + 12 * n * d * 8 / BANDWIDTH
        + batches * EVALUATE_LAUNCH_S_PER_BATCH
        + 6 * eigensolver_seconds(d)
    )
    floor_estimate = (
        2 * n * d * d / PEAK_FLOPS["float64"] + 3 * n * d * 8 / BANDWIDTH + batches * 3e-5 + eigensolver_seconds(d)
    )
    return TimedCase(
        name="evaluate (default set)",
        input_desc=f"{n:,} × {d} float32 tensor on the device (λ_k ∝ 1/k), batches of {DEFAULT_BATCH_SIZE:,}",
        make_input=make_input,
        ours=[Variant("reprmetrics.evaluate(x) (default metrics)", lambda x: evaluate(x), ours_estimate)],
        baseline=Variant("floor: float64 ZᵀZ per batch + eigvalsh (RankMe alone)", gram_floor, floor_estimate),
        budget_s=35,
        repeats=s.repeats,
        check=agreement,
        warmup_input=lambda x: x[: max(x.shape[0] // 50, 1_000)],
        notes="speed-up < 1: what the whole default set costs over its cheapest member",
    )


# ---- (b6) the monitor's overhead on a ResNet-50-like encoder ---------------------------------------


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (v1.5: the stride sits in the 3×3 convolution)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNetLikeEncoder(nn.Module):
    """ResNet-50's layout (He et al., 2016): a 7×7/2 stem and 3×3/2 max-pool, stages of (3, 4, 6, 3)
    bottlenecks of widths 64·2^i, global average pooling: a (B, 2048) embedding, 23.5 M parameters.
    ``blocks`` and ``width`` shrink it for the smoke run."""

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, channels = [], width
        for i, count in enumerate(blocks):
            stage_width = width * 2**i
            for j in range(count):
                stages.append(Bottleneck(channels, stage_width, stride=2 if i > 0 and j == 0 else 1))
                channels = stage_width * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class SimCLRModel(nn.Module):
    """Backbone + SimCLR's two-layer projector (to 128-D); the monitor taps both."""

    def __init__(self, blocks: tuple[int, int, int, int], width: int) -> None:
        super().__init__()
        self.backbone = ResNetLikeEncoder(blocks, width)
        features = self.backbone.num_features
        self.projector = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def forward_flops(blocks: tuple[int, int, int, int], width: int, image_size: int) -> float:
    """Flops (2 × multiply-adds) of the convolutions and linear layers for one image, counted on the meta device."""
    total = 0

    def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += (
                output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            )
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    with torch.device("meta"):
        model = SimCLRModel(blocks, width).eval()  # eval: BatchNorm accepts one image
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.register_forward_hook(count)
        model(torch.empty(1, 3, image_size, image_size))
    return 2.0 * total


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's loss over the 2B views of a batch, in float32."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-math.inf)
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(n, device=z.device)])
    return F.cross_entropy(logits, targets)


class SimCLRStep:
    """One SimCLR training step of the ResNet-50-like model: two views, bf16 autocast, SGD."""

    def __init__(self, device: torch.device, s: Sizes) -> None:
        torch.manual_seed(0)
        self.device = device
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # cuDNN's fast layout
        self.model = SimCLRModel(s.resnet_blocks, s.resnet_width).to(device, memory_format=memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-6)
        g = _generator(device)
        shape = (s.monitor_batch, 3, s.image_size, s.image_size)
        self.images = [
            torch.randn(shape, generator=g, device=device).contiguous(memory_format=memory_format) for _ in range(4)
        ]
        self.calls = 0

    def __call__(self) -> None:
        images = self.images[self.calls % len(self.images)]
        self.calls += 1
        view1, view2 = images + 0.1 * torch.randn_like(images), images.flip(3)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = nt_xent(self.model(view1), self.model(view2))  # two calls: the tracker's "calls" layout
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, count: int, tracker: Any = None) -> list[dict]:
        """``count`` steps, each wrapped in the tracker's calls when one is given; the values it computed."""
        computed = []
        for _ in range(count):
            if tracker is None:
                self()
                continue
            tracker.start_train_step()
            self()
            values = tracker.end_train_step()
            if values is not None:
                computed.append(values)
        return computed


def monitor_estimates(s: Sizes) -> tuple[float, float]:
    """(monitored, plain) seconds per step at the assumed efficiencies, from the model's counted flops."""
    step_flops = 3 * forward_flops(s.resnet_blocks, s.resnet_width, s.image_size) * 2 * s.monitor_batch
    step = step_flops / (RESNET_EFFICIENCY * PEAK_FLOPS["bfloat16"])
    backbone_width = s.resnet_width * 8 * Bottleneck.expansion
    compute = sum(7 * eigensolver_seconds(w) for w in (backbone_width, 128))  # once per 200 steps
    return step + compute / 200, step


def monitor_case(device: torch.device, s: Sizes) -> CustomCase:
    ours_estimate, plain_estimate = monitor_estimates(s)
    case = CustomCase(
        name="monitor overhead, ResNet-50-like",
        input_desc=(
            f"ResNet-50-like encoder ({s.resnet_blocks} bottlenecks, width {s.resnet_width}) + projector,"
            f" batch {s.monitor_batch} × 2 views, {s.image_size} px, bf16 autocast, SGD; taps backbone and projector"
        ),
        run=lambda budget_s: [],
        estimate_ours_s=ours_estimate,
        estimate_baseline_s=plain_estimate,
        budget_s=55,
    )
    case.run = lambda budget_s: [measure_monitor_overhead(case, device, s, budget_s)]
    return case


def timed_steps(run: Callable[[], Any], device: torch.device) -> tuple[float, int, Any]:
    """Seconds, extra peak bytes and result of ``run()``: ``harness.measure`` without its emptying of the
    CUDA cache, so that blocks of training steps run on a warm allocator, as training does."""
    if device.type != "cuda":
        return measure(lambda _: run(), None, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    result = run()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - before, result


def measure_monitor_overhead(case: CustomCase, device: torch.device, s: Sizes, budget_s: float) -> dict:
    """The monitor's extra time per step, amortised over its cadence, next to the unmonitored step.

    Per repetition, in one process on the same model and data: ``m`` unmonitored steps; ``m``
    monitored steps off the schedule (hooks attached, capturing nothing); and the capture window, the
    last ``w`` steps of a cycle, ending with the scheduled computation (the tracker's clock is moved
    there through its ``state_dict``, as on resume). Per step of a cycle of ``c`` steps, with medians:
    overhead = [(window − w·plain) + (c − w)·(off − plain)] / c.
    """
    start = time.perf_counter()
    step = SimCLRStep(device, s)
    tracker = RepresentationTracker(["backbone", "projector"], num_views=2)  # defaults: every 200 steps, 1,024 samples
    cadence, m = tracker.every_n_train_steps, s.monitor_steps_per_block
    window = math.ceil(tracker.train_buffer_size / s.monitor_batch)
    plain, off, windows, peak_plain, peak_monitored = [], [], [], [], []
    computed: list[dict] = []

    def move_clock_to(train_steps: int) -> None:
        state = tracker.state_dict()
        state.update(train_steps=train_steps, batch_size=s.monitor_batch)
        tracker.load_state_dict(state)

    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        # Warm-up, untimed: cuDNN's autotuning, and one scheduled computation (metric sets, solver handles).
        step.run(2)
        tracker.attach(step.model)
        move_clock_to(cadence - window)
        step.run(window, tracker)
        cycle, reps, setup_done = 1, 0, time.perf_counter()
        for rep in range(s.repeats):
            tracker.detach()
            seconds, peak, _ = timed_steps(lambda: step.run(m), device)
            plain.append(seconds / m)
            peak_plain.append(peak)
            tracker.attach(step.model)
            move_clock_to(cycle * cadence)  # just after a scheduled step: off the schedule for c − w steps
            seconds, _, _ = timed_steps(lambda: step.run(m, tracker), device)
            off.append(seconds / m)
            cycle += 1
            move_clock_to(cycle * cadence - window)
            seconds, peak, got = timed_steps(lambda: step.run(window, tracker), device)
            windows.append(seconds)
            peak_monitored.append(peak)
            computed += got
            reps += 1
            per_rep = (time.perf_counter() - setup_done) / reps
            if rep + 1 < s.repeats and time.perf_counter() + per_rep > start + budget_s:
                break
    finally:
        tracker.detach()
        torch.backends.cudnn.benchmark = benchmark_before
    if len(computed) != reps or not all({"backbone/rankme", "projector/rankme"} <= set(values) for values in computed):
        raise RuntimeError(f"the tracker computed {len(computed)} times in {reps} capture windows, or without rankme")
    plain_s, off_s, window_s = statistics.median(plain), statistics.median(off), statistics.median(windows)
    window_extra_s = window_s - window * plain_s
    overhead_s = (window_extra_s + (cadence - window) * (off_s - plain_s)) / cadence
    fraction = overhead_s / plain_s
    step_flops = 3 * forward_flops(s.resnet_blocks, s.resnet_width, s.image_size) * 2 * s.monitor_batch
    row = new_row(
        case,
        f"monitored step, amortised over every_n_train_steps={cadence}",
        "the same step without the monitor",
        device,
    )
    row.update(
        ours_s=plain_s + overhead_s,
        baseline_s=plain_s,
        speedup=plain_s / (plain_s + overhead_s),
        ours_peak_mib=max(peak_monitored) / 2**20,
        baseline_peak_mib=max(peak_plain) / 2**20,
        reps=f"{reps} of {s.repeats}" + (" (budget)" if reps < s.repeats else ""),
        result=(
            f"overhead {100 * fraction:+.2f} % per step (goal ≤ 1 %: {'met' if fraction <= 0.01 else 'missed'}):"
            f" capture window + computation {1e3 * window_extra_s:+.0f} ms per {cadence} steps, off-schedule"
            f" steps {1e3 * (off_s - plain_s):+.2f} ms each; backbone RankMe"
            f" {float(computed[-1]['backbone/rankme']):.1f}"
        ),
        notes=(
            f"per rep {m} plain, {m} off-schedule steps and one {window}-step capture window; {_flop(step_flops)}"
            " per step"
        ),
    )
    return row


# ---- (a) the gpu-marked tests ---------------------------------------------------------------------


def run_gpu_tests(device: torch.device, timeout_s: float, log: Callable[[str], None]) -> dict:
    """``pytest -m gpu tests`` in a subprocess; without CUDA it reports that they skip, and runs nothing."""
    if device.type != "cuda":
        return {
            "status": "skipped",
            "summary": "not run: the gpu-marked tests need CUDA (without it they skip)",
            "output": "",
        }
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    log("running " + " ".join(command[1:]) + f" (limit {timeout_s:.0f} s) ...")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        return {"status": "timeout", "summary": f"timed out after {timeout_s:.0f} s", "output": output}
    output = done.stdout + done.stderr
    summary = next(
        (
            line.strip("= ")
            for line in reversed(output.splitlines())
            if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)
        ),
        "",
    )
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    status = "passed" if done.returncode == 0 else "failed"
    return {
        "status": status,
        "summary": f"{summary or 'no summary line'} (exit {done.returncode}, {time.perf_counter() - t0:.0f} s)",
        "failed": failed,
        "output": output,
    }


# ---- (c) the table --------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=(
                f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs,"
                f" sm_{props.major}{props.minor})"
            ),
            cuda=str(torch.version.cuda),
            cudnn=str(torch.backends.cudnn.version()),
        )
    else:
        threads = f"{env['threads']} thread" + ("s" if env["threads"] != "1" else "")
        env.update(device=f"CPU ({env['cpu']}, {threads})", cuda=str(torch.version.cuda), cudnn="—")
    return env


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or value >= 0.1:
        return f"{value:.3f}"
    return f"{value:.2e}"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def markdown(rows: list[dict], tests: dict, env: dict[str, str], smoke: bool, total_s: float, command: str) -> str:
    title = "GPU proof" + (" — smoke run (tiny sizes; times mean nothing)" if smoke else "")
    lines = [
        f"### {title}: {env['device']}, {env['date']}",
        "",
        f"`{command}`: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']};"
        f" {total_s:.0f} s in all (limit {TIME_LIMIT_S:.0f} s).",
        "",
        f"GPU tests (`pytest -m gpu tests`): {tests['summary']}"
        + (f"; failed: {', '.join(tests['failed'])}" if tests.get("failed") else ""),
        "",
        f"est. = estimated from the case's work at the {ASSUMED_DEVICE}'s datasheet peaks (see"
        " `benchmarks/gpu_proof.py`); times are medians; peak = extra memory during the call; speed-up ="
        " baseline / ours.",
        "",
        "| case | input | ours | ours (s) | est. (s) | baseline | baseline (s) | est. (s) | speed-up"
        " | ours peak (MiB) | baseline peak (MiB) | reps | result |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        result = r["result"] + (f" ({r['notes']})" if r.get("notes") else "")
        lines.append(
            f"| {r['case']} | {r['input']} | {r['ours']} | {_seconds(r['ours_s'])} | {_seconds(r['est_ours_s'])}"
            f" | {r['baseline']} | {_seconds(r['baseline_s'])} | {_seconds(r['est_baseline_s'])} | {speedup}"
            f" | {_mib(r['ours_peak_mib'])} | {_mib(r['baseline_peak_mib'])} | {r['reps']} | {result} |"
        )
    return "\n".join(lines) + "\n"


def estimate_table(s: Sizes = FULL) -> str:
    """The docstring's table of full-size estimates, computed (a test keeps the two equal)."""
    cases = build_cases(torch.device("cpu"), s)
    sizes = {
        "gram": (
            f"20 × (B, {s.gram_features:,}) → {s.gram_features:,}², B ="
            f" {' / '.join(f'{b:,}' for b in s.gram_batches)}; 5 GEMMs {s.square_gemm:,}³"
        ),
        "rankme accuracy": f"{s.accuracy_rows:,} × {s.accuracy_features} float32, rank 1 + 1e-3 noise",
        "rankme streaming": f"{s.rankme_rows:,} × {s.rankme_features:,} float32, batches of {s.batch:,}",
        "lid vs": f"{s.knn_fit_rows:,} × {s.knn_features} float32, k = {K}",
        "lid, large": f"{s.knn_rows:,} × {s.knn_features} float32, k = {K}",
        "twonn": f"{s.knn_rows:,} × {s.knn_features} float32",
        "uniformity vs": f"{s.uniformity_fit_rows:,} × {s.uniformity_features} float32, t = 2",
        "uniformity, large": f"{s.uniformity_rows:,} × {s.uniformity_features} float32, t = 2",
        "evaluate": f"{s.evaluate_rows:,} × {s.evaluate_features} float32, batches of 4,096",
        "monitor": f"batch {s.monitor_batch} × 2 views, {s.image_size} px, bf16 autocast",
    }
    lines = ["| case | size | est. ours (s) | est. baseline (s) | budget (s) |", "|---|---|---:|---:|---:|"]
    for case in cases:
        size = next(v for k, v in sizes.items() if case.name.startswith(k))
        base = "—" if case.estimate_baseline_s is None else f"{case.estimate_baseline_s:.4f}"
        lines.append(f"| {case.name} | {size} | {case.estimate_ours_s:.4f} | {base} | {case.budget_s:.0f} |")
    return "\n".join(lines)


def build_cases(device: torch.device, s: Sizes) -> list[TimedCase | CustomCase]:
    """Every case, from the most to the least predictable run time: one call cannot be interrupted,
    so a call that overruns can only cost the cases after it. Inputs are made when a case runs."""
    accuracy, streaming = rankme_cases(device, s)
    lid_fits, lid_large, twonn_large = knn_cases(device, s)
    return [
        *gram_peak_cases(device, s),
        accuracy,
        *uniformity_cases(device, s),
        lid_fits,
        evaluate_case(device, s),
        monitor_case(device, s),
        streaming,  # cuSOLVER's SVD of a 262,144 × 2,048 matrix: the least known baseline
        lid_large,
        twonn_large,
    ]


# ---- the command ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when available) or cpu"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the same code paths in seconds (CI)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--json", default=None, help="also write the rows and the test summary to this JSON file")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + TIME_LIMIT_S
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available (use --smoke --device cpu for the smoke run)")
    if device.type == "cpu" and not args.smoke:
        parser.error("the full sizes are meant for a GPU (a 1M-point kNN takes hours on a CPU); use --smoke on a CPU")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # The harness collects garbage before every timed call; objects that exist now (the imported
    # modules', mostly) never need scanning: frozen, a collection takes microseconds, not 0.15 s.
    gc.freeze()
    if args.smoke and device.type == "cpu":
        # The smoke run checks code paths, not speed; on a shared CPU one thread runs it several
        # times faster than threads that wait for each other.
        torch.set_num_threads(1)
    env = environment(device)
    log(
        f"GPU proof on {env['device']}, torch {env['torch']}, CUDA"
        f" {env['cuda']}{' (smoke sizes)' if args.smoke else ''}"
    )
    if args.skip_tests:
        tests = {"status": "skipped", "summary": "not run (--skip-tests)", "output": ""}
    else:
        tests = run_gpu_tests(device, TESTS_TIMEOUT_S, log)
        if tests["output"]:
            log("\n".join(tests["output"].splitlines()[-40:]))
    log(f"gpu tests: {tests['summary']}")
    sizes = SMOKE if args.smoke else FULL
    cases = [c for c in build_cases(device, sizes) if args.only in c.name]
    rows = run_cases(cases, device, deadline, log)
    command = "python -m benchmarks.gpu_proof" + (" --smoke" if args.smoke else "") + f" --device {args.device}"
    table = markdown(rows, tests, env, args.smoke, time.perf_counter() - started, command)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"environment": env, "smoke": args.smoke, "tests": tests, "rows": rows}, indent=2, default=str)
        )
    return (
        0 if tests["status"] in ("passed", "skipped") and not any(r["result"].startswith("error") for r in rows) else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
