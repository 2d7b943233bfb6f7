"""Several metrics over the same rows in one pass per batch: :class:`MetricSet`.

Used by the tracker (one set per tap and stage) and by :func:`reprmetrics.evaluate`. Each batch is
checked once (one finite mask, no host sync: non-finite rows are weighted out, not indexed out),
converted once, normalised once, and feeds one instance of each statistic its metrics read
(:mod:`reprmetrics.statistics`). At compute, each statistic syncs once across ranks and one
eigendecomposition per matrix serves every metric that reads it. Updates are all-or-nothing per
batch: the batch is validated once for every member before any statistic changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from reprmetrics._base import ReprMetric
from reprmetrics.statistics import Batch, RowMoments, Statistic, finite_rows

__all__ = ["MetricSet"]


class MetricSet:
    """The metrics of one set of rows (one tap and stage, or one ``evaluate`` call).

    Metric classes of this package (``ReprMetric``) read shared statistics; any other torchmetrics
    ``Metric`` is updated on its own with the finite rows of the first view (selecting them costs one
    host sync per batch, only when such metrics are present).

    Args:
        metrics: ``{name: Metric}``.
        label: names the set in warnings (``"val/projector"``).
        strict: raise (``ValueError`` naming the metric) instead of warning once and skipping a metric
            that cannot be computed.
        warned: a set of warning keys shared with the owner, so each warning is given once.
        warn: how to warn (the tracker points warnings at the user's code).
    """

    def __init__(
        self,
        metrics: Mapping[str, Metric],
        label: str,
        strict: bool = False,
        warned: set[str] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.metrics = dict(metrics)
        self.label = label
        self.strict = strict
        self._warned = warned if warned is not None else set()
        self._warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.last_failures: dict[str, str] = {}  # updates that failed in this accumulation
        self.failures: dict[str, str] = {}  # metrics the last compute() could not compute, and why
        self.last_artifacts: dict[str, Any] = {}
        # One statistic per key, in the order of their first reader.
        self.statistics: dict[tuple[Any, ...], Statistic] = {}
        self.readers: dict[tuple[Any, ...], list[str]] = {}
        self.own: dict[str, Metric] = {}
        for name, metric in self.metrics.items():
            if isinstance(metric, Statistic):
                self.readers.setdefault(metric.statistic_key(), []).append(name)
            else:
                self.own[name] = metric
        self._failed_updates = _FailureFlags(len(self.own)) if self.own else None
        for key, names in self.readers.items():
            first = self.metrics[names[0]]
            if isinstance(first, RowMoments):
                full = any(self.metrics[n].needs_full_moments for n in names)
                self.statistics[key] = first.new_statistic(diagonal=not full)
            else:
                self.statistics[key] = first.new_statistic()

    # ---- updating -------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> MetricSet:
        for stat in self.statistics.values():
            stat.to(device)
        for metric in self.own.values():
            metric.to(device)
        if self._failed_updates is not None:
            self._failed_updates.to(device)
        return self

    def dense_states(self) -> int:
        """D×D matrices the shared statistics keep (for a memory check before the first batch)."""
        return sum(stat.dense_states for stat in self.statistics.values())

    def update(self, views: Tensor) -> Tensor:
        """Feed a ``(B, q, D)`` batch; samples with a non-finite value in any view are left out.

        Returns how many samples were used, as a tensor (no host sync).
        """
        with torch.no_grad():
            finite = finite_rows(views)
            weights = finite.to(torch.float64)
            self._feed(views, weights)
            return weights.sum()

    def update_points(self, points: Tensor, weights: Tensor | None = None) -> None:
        """Feed ``(B, D)`` rows to the point metrics (``weights``: 0/1 per row; rows of weight 0 are left out)."""
        self._feed_kind("points", Batch(points, weights), points, weights)

    def update_views(self, views: Tensor, weights: Tensor | None = None) -> None:
        """Feed ``(B, q, D)`` views to the view and pair metrics only."""
        if views.shape[1] >= 2:
            self._feed_kind("views", Batch(views, weights), views, weights)
            self._feed_kind("pairs", Batch(views[:, :2], weights), views, weights)

    def _feed(self, views: Tensor, weights: Tensor) -> None:
        self._feed_kind("points", Batch(views[:, 0], weights), views[:, 0], weights)
        if views.shape[1] >= 2:
            self._feed_kind("views", Batch(views, weights), views, weights)
            self._feed_kind("pairs", Batch(views[:, :2], weights), views, weights)

    def _feed_kind(self, kind: str, batch: Batch, data: Tensor, weights: Tensor | None) -> None:
        for stat in self.statistics.values():
            if stat.input_kind == kind:
                stat.accumulate(batch)
        if kind != "points" or not self.own:
            return
        rows = data if weights is None else data[weights > 0]  # a torchmetrics Metric cannot take weights
        for index, (name, metric) in enumerate(self.own.items()):
            if name in self.last_failures:
                continue
            try:
                metric.update(rows)
            except (ValueError, RuntimeError) as error:
                # Left out of this accumulation, not computed on a subset of the rows the others saw.
                self.last_failures[name] = f"its update failed on a batch the other metrics took ({error})"
                assert self._failed_updates is not None
                self._failed_updates.update(index)

    # ---- computing -----------------------------------------------------------------------------------
    def compute(self) -> dict[str, Tensor]:
        """Every computable value ``{name[_suffix]: tensor}`` (all ranks call this together: statistics sync).

        An α-ReQ metric ``name`` also gives ``{name}_r2``; RankMe with ``diagnostics=True`` also gives
        ``{name}_top_singular_value`` and ``{name}_condition_number`` (see each metric's
        ``value_names()``). :attr:`last_artifacts` holds what figures need (the covariance spectrum
        with the α-ReQ fit, singular values, per-sample LIDs).
        """
        values: dict[str, Tensor] = {}
        failures = dict(self.last_failures)
        self.last_artifacts = {}
        dtype = torch.get_default_dtype()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            for key, stat in self.statistics.items():
                names = self.readers[key]
                try:
                    with stat.sync_context(
                        dist_sync_fn=stat.dist_sync_fn, should_sync=stat._to_sync, should_unsync=True
                    ):
                        cache: dict[Any, Any] = {}
                        for name in names:
                            metric = self.metrics[name]
                            try:
                                found = metric.values_from(stat, cache)
                                values.update(
                                    {_joined(name, suffix): v.detach().to(dtype) for suffix, v in found.items()}
                                )
                                self.last_artifacts.update(metric.artifacts_from(stat, cache))
                            except (ValueError, RuntimeError) as error:
                                failures[name] = str(error)
                except (ValueError, RuntimeError) as error:  # the sync itself (e.g. ranks with different widths)
                    failures.update({name: str(error) for name in names})
            # A metric whose update failed on any rank is left out on every rank (synced flags), so no
            # rank waits in a sync that another skips.
            failed = self._failed_updates.compute().tolist() if self._failed_updates is not None else []
            for index, (name, metric) in enumerate(self.own.items()):
                if failed[index]:
                    failures.setdefault(name, "its update failed on a batch the other metrics took (on another rank)")
                    continue
                try:
                    values[name] = metric.compute().detach()
                except (ValueError, RuntimeError) as error:
                    failures[name] = str(error)
        self.failures = failures
        for name, message in failures.items():
            self._fail(name, message)
        return {name: values[name] for name in self.value_names() if name in values}

    def _fail(self, name: str, message: str) -> None:
        if self.strict:
            raise ValueError(f"{name}: {message}")
        key = f"{self.label}/{name}: {message.split(':')[0]}"
        if key not in self._warned:
            self._warned.add(key)
            self._warn(f"reprmetrics: skipping {self.label}/{name}: {message}")

    def value_names(self) -> list[str]:
        """The names :meth:`compute` reports (when every metric can be computed), in the set's order."""
        names = []
        for name, metric in self.metrics.items():
            suffixes = metric.value_names() if isinstance(metric, ReprMetric) else ("",)
            names += [_joined(name, suffix) for suffix in suffixes]
        return names

    def reset(self) -> None:
        self.last_failures = {}
        for stat in self.statistics.values():
            stat.reset()
        for metric in self.own.values():
            metric.reset()
        if self._failed_updates is not None:
            self._failed_updates.reset()


class _FailureFlags(ReprMetric):
    """Which user metrics failed an update on some rank (max-reduced, so every rank agrees)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.add_state("failed", torch.zeros(count, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, index: int) -> None:
        self.failed[index] = 1.0

    def compute(self) -> Tensor:
        return self.failed


def _joined(name: str, suffix: str) -> str:
    return f"{name}_{suffix}" if suffix else name
