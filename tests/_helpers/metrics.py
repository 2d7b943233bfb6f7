"""Every Metric class as a row of a table: how to build it, what it reads, how few rows make it fail.

Test files parametrise over :data:`METRIC_SPECS` instead of repeating per-class boilerplate; a new
Metric class is one more row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import reprmetrics as rm


@dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[..., Any]
    # "points": update(z); "views": update((B, q, D)); "pairs": update(x, y) same width; "cka": update(x, y)
    kind: str = "points"
    width: int = 16
    too_few: int = 1  # a union of this many rows (or fewer) makes compute() raise
    min_batch: int = 1  # the fewest rows one non-empty batch may have (MinibatchCKA's per-batch HSIC needs 4)

    def make(self, **kwargs: Any) -> Any:
        return self.factory(**kwargs)

    def batch(self, rows: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
        """Update arguments for ``rows`` samples (a random low-rank-plus-noise cloud off the origin)."""
        d = self.width
        basis = torch.randn(6, d, generator=generator, dtype=dtype)

        def cloud(n: int) -> Tensor:
            return (
                3.0
                + torch.randn(n, 6, generator=generator, dtype=dtype) @ basis
                + 0.1 * torch.randn(n, d, generator=generator, dtype=dtype)
            )

        if self.kind == "views":
            centres = cloud(rows)
            return (
                torch.stack(
                    [centres + 0.05 * torch.randn(rows, d, generator=generator, dtype=dtype) for _ in range(2)], dim=1
                ),
            )
        if self.kind == "pairs":
            x = cloud(rows)
            return (x, x + 0.1 * torch.randn(rows, d, generator=generator, dtype=dtype))
        if self.kind == "cka":
            x = cloud(rows)
            return (x, x[:, :5] @ torch.randn(5, 7, generator=generator, dtype=dtype))
        return (cloud(rows),)

    def empty(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
        """Update arguments of a batch with no rows (what a rank with an empty shard feeds)."""
        d = self.width
        if self.kind == "views":
            return (torch.empty(0, 2, d, dtype=dtype),)
        if self.kind == "pairs":
            return (torch.empty(0, d, dtype=dtype), torch.empty(0, d, dtype=dtype))
        if self.kind == "cka":
            return (torch.empty(0, d, dtype=dtype), torch.empty(0, 7, dtype=dtype))
        return (torch.empty(0, d, dtype=dtype),)

    def nonfinite(self, rows: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
        """Update arguments whose every row holds NaN."""
        return tuple(
            torch.full_like(t, float("nan")) if t.numel() else t
            for t in self.batch(rows, torch.Generator().manual_seed(99), dtype)
        )


METRIC_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("RankMe", rm.RankMe, too_few=0),
    MetricSpec("AlphaReQ", lambda **kw: rm.AlphaReQ(fit_range=(2, 10), **kw)),
    MetricSpec("NESum", rm.NESum),
    MetricSpec("CodingRate", rm.CodingRate, too_few=0),
    MetricSpec("NormalizedStd", rm.NormalizedStd),
    MetricSpec("IsoScore", rm.IsoScore),
    MetricSpec("WassersteinUniformity", rm.WassersteinUniformity, too_few=0),
    MetricSpec("SIGReg", lambda **kw: rm.SIGReg(num_slices=32, **kw), too_few=0),
    MetricSpec("Uniformity", rm.Uniformity),
    MetricSpec("LocalIntrinsicDimension", lambda **kw: rm.LocalIntrinsicDimension(k=5, **kw), too_few=5),
    MetricSpec("TwoNN", rm.TwoNN, too_few=2),
    MetricSpec("MLEDimension", lambda **kw: rm.MLEDimension(k=5, **kw), too_few=5),
    MetricSpec("LiDAR", rm.LiDAR, kind="views"),
    MetricSpec("Alignment", rm.Alignment, kind="pairs", too_few=0),
    MetricSpec("LinearCKA", rm.LinearCKA, kind="cka"),
    MetricSpec("MinibatchCKA", rm.MinibatchCKA, kind="cka", too_few=0, min_batch=4),
)

SPECS_BY_NAME = {spec.name: spec for spec in METRIC_SPECS}
