"""The tracker's bookkeeping: capture counts reduced across ranks, and the recent-samples buffer."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CaptureCounts", "RecentBuffer"]


class CaptureCounts(Metric):
    """Samples used, non-finite and dropped, widths and views, and the least-filled training buffer:
    reduced across ranks, so every rank makes the same report-or-withhold (and compute-or-wait) decision."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(compute_with_cache=False)
        for name in ("used", "nonfinite", "dropped"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("width", "views", "reference_width"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        # 1: full, or nothing captured (a rank without samples waits for no one).
        self.add_state("fill", torch.tensor(1.0, dtype=torch.float64), dist_reduce_fx="min")

    def update(
        self,
        used: int | Tensor = 0,
        nonfinite: int | Tensor = 0,
        dropped: int = 0,
        width: int = 0,
        views: int = 0,
        reference_width: int = 0,
        fill: float = 1.0,
    ) -> None:
        self.used += used
        self.nonfinite += nonfinite
        self.dropped += dropped
        self.width.clamp_(min=float(width))
        self.views.clamp_(min=float(views))
        self.reference_width.clamp_(min=float(reference_width))
        self.fill.clamp_(max=float(fill))

    def compute(self) -> dict[str, float]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            names = ("used", "nonfinite", "dropped", "width", "views", "reference_width", "fill")
            return dict(zip(names, torch.stack([getattr(self, n) for n in names]).tolist()))


class RecentBuffer:
    """The most recent ``capacity`` samples (groups of views), oldest dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: list[Tensor] = []

    def add(self, views: Tensor) -> None:
        self.chunks.append(views)
        stored = sum(len(c) for c in self.chunks)
        while self.chunks and stored - len(self.chunks[0]) >= self.capacity:
            stored -= len(self.chunks.pop(0))

    def recent(self) -> Tensor | None:
        """The most recent ``capacity`` samples (kept: the next computation reads the most recent again)."""
        if not self.chunks:
            return None
        self.chunks = [torch.cat(self.chunks)[-self.capacity :]]
        return self.chunks[0]

    def fill(self) -> float:
        """Stored samples over capacity, at most 1; 1 when empty."""
        stored = sum(len(c) for c in self.chunks)
        return 1.0 if stored == 0 else min(1.0, stored / self.capacity)
