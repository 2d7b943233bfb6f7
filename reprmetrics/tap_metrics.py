"""One tap at one stage: its metrics, its drift to the reference and its capture counts.

:class:`~reprmetrics.tracker.RepresentationTracker` keeps one :class:`TapMetrics` per tap and stage,
feeds it every captured batch and asks it for the tap's values when the schedule says so; what to
compute is a :class:`MetricChoice`, shared by every tap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric

from reprmetrics._counts import CaptureCounts
from reprmetrics._validation import check_memory
from reprmetrics.metric_set import MetricSet
from reprmetrics.registry import MonitorConfigurationError, default_metrics
from reprmetrics.results import STAGE_LABELS, CaptureReport

if TYPE_CHECKING:
    from reprmetrics.similarity import LinearCKA

__all__ = ["MetricChoice", "TapMetrics"]

DRIFT_NAME = "cka_to_reference"


@dataclass(frozen=True)
class MetricChoice:
    """Which metrics every tap computes: the tracker's ``default_metrics``, ``metrics`` and options."""

    use_default: bool
    names: tuple[str, ...]
    extra: dict[str, Metric]
    max_samples: int
    rankme_diagnostics: bool

    def build(self, width: int, num_views: int) -> dict[str, Metric]:
        options = {"rankme": {"diagnostics": True}} if self.rankme_diagnostics else None
        metrics = default_metrics(width, num_views, self.max_samples, options=options) if self.use_default else {}
        if self.names:
            metrics.update(default_metrics(width, num_views, self.max_samples, names=list(self.names), options=options))
        metrics.update({name: m.clone() for name, m in self.extra.items()})
        for metric in metrics.values():
            if self.rankme_diagnostics and hasattr(metric, "diagnostics_reported"):  # a RankMe given as a Metric too
                metric.diagnostics_reported = True
        return metrics


class TapMetrics:
    """The metric set, the drift metric and the capture counts of one tap at one stage.

    The counts are a Metric reduced across ranks, so every rank takes the same branch in
    :meth:`compute` (report, withhold, or NaN for a diverged tap) and joins the same syncs, whether or
    not it saw samples.
    """

    def __init__(
        self,
        stage: str,
        tap: str,
        choice: MetricChoice,
        owner: str,
        strict: bool,
        warned: set[str],
        warn: Callable[[str], None],
    ):
        self.stage, self.tap, self.choice = stage, tap, choice
        self.owner, self.strict, self._warned, self._warn = owner, strict, warned, warn
        self.counts = CaptureCounts()
        self.metric_set: MetricSet | None = None
        self.drift: LinearCKA | None = None

    def metrics(self, width: int, num_views: int, device: torch.device) -> MetricSet:
        """The metric set, created on first use from the tap's width and views."""
        if self.metric_set is None:
            metric_set = MetricSet(
                self.choice.build(width, num_views),
                f"{self.stage}/{self.tap}",
                self.strict,
                self._warned,
                lambda m: self._warn(f"{self.owner}: {m}"),
            )
            try:  # each D×D float64 statistic, and as much again while its eigenvalues are computed
                check_memory(
                    2 * metric_set.dense_states() * (width + 3) * width * 8,
                    device,
                    self.owner,
                    f"tap {self.tap!r} of width D = {width:,} ({self.stage})",
                    "tap a narrower layer, pool or project it with the Tap's `reduce`, or choose metrics that"
                    " keep no D×D matrix",
                )
            except ValueError as error:
                raise MonitorConfigurationError(str(error)) from None
            self.metric_set = metric_set.to(device)  # embeddings stay where they are
        return self.metric_set

    def value_names(self, with_drift: bool) -> list[str]:
        names = self.metric_set.value_names() if self.metric_set is not None else []
        return [*names, *([DRIFT_NAME] if with_drift else []), "num_samples", "nonfinite_fraction"]

    def reset(self) -> None:
        """Forget the samples (on every rank: a rank without samples must not reuse the last state)."""
        for metric in (self.metric_set, self.drift, self.counts):
            if metric is not None:
                metric.reset()

    def feed(self, views: Tensor) -> None:
        used = self.metrics(views.shape[-1], views.shape[1], views.device).update(views)
        self.counts.to(views.device).update(
            used=used, nonfinite=len(views) - used, width=views.shape[-1], views=views.shape[1]
        )

    def feed_drift(self, views: Tensor, reference: Tensor) -> None:
        live, ref = views[:, 0], reference[:, 0]
        finite = torch.isfinite(live).all(dim=1) & torch.isfinite(ref).all(dim=1)  # weighted out: no host sync
        zero = torch.zeros((), dtype=live.dtype, device=live.device)
        live, ref = torch.where(finite[:, None], live, zero), torch.where(finite[:, None], ref, zero.to(ref.dtype))
        self._drift_metric(live.shape[-1], ref.shape[-1], live.device)
        self.counts.update(reference_width=ref.shape[-1])
        self.drift.accumulate(live, ref, finite.to(torch.float64))

    def _drift_metric(self, width: int, reference_width: int, device: torch.device) -> LinearCKA:
        if self.drift is None:
            from reprmetrics.similarity import LinearCKA

            self.drift = LinearCKA(num_features=(width, reference_width)).to(device)
        return self.drift

    def compute(
        self, device: torch.device, min_samples: int, grouping: str, nothing: str, few: str
    ) -> tuple[CaptureReport, dict[str, Tensor]]:
        """The tap's report and values (no values when no rank captured anything).

        The tracker words the warnings' context: ``grouping`` (the views expected), ``nothing`` (which
        pass captured nothing, and the likely cause) and ``few`` (what to do about too few samples).
        """
        tap, label = self.tap, STAGE_LABELS[self.stage]
        if self.metric_set is not None:
            device = next(iter(self.metric_set.statistics.values()), self.counts).device
        found = self.counts.to(device).compute()
        used, nonfinite, dropped = int(found["used"]), int(found["nonfinite"]), int(found["dropped"])
        width, reference_width = int(found["width"]), int(found["reference_width"])
        report = CaptureReport(self.stage, tap, used, nonfinite, dropped)
        if report.seen == 0:
            if self.stage == "val":
                self._warn(f"{self.owner}: tap {tap!r} captured nothing during {nothing}; no val-stage values for it")
            return report, {}
        values = {
            f"{tap}/num_samples": torch.tensor(float(used), device=device),
            f"{tap}/nonfinite_fraction": torch.tensor(report.nonfinite_fraction, device=device),
        }
        if self.metric_set is None and width:  # nothing reached this rank but others have data: join their sync
            self.metrics(width, int(found["views"]), device)
        # Drift is computed wherever any rank saw reference embeddings (synced), so every rank joins its sync.
        has_drift = self.stage == "val" and reference_width > 0
        if has_drift:
            self._drift_metric(width, reference_width, device)
        if nonfinite:
            self._warn(
                f"{self.owner}: divergence: tap {tap!r} produced non-finite embeddings"
                f" ({report.nonfinite_fraction:.0%} of {report.seen} samples, {label}); its metrics are reported"
                " as NaN"
            )
            names = (self.metric_set.value_names() if self.metric_set is not None else []) + (
                [DRIFT_NAME] if has_drift else []
            )
            values.update({f"{tap}/{name}": torch.tensor(float("nan"), device=device) for name in names})
            return report, values
        if dropped:
            self._warn(
                f"{self.owner}: tap {tap!r} ({label}): only {used} of {report.seen} samples were usable;"
                f" {dropped} were in batches that could not be grouped into {grouping}"
            )
        if used < min_samples:
            self._warn(
                f"{self.owner}: tap {tap!r} ({label}): {used} usable samples, fewer than"
                f" min_samples={min_samples}; its metrics are not reported (num_samples is). {few}"
            )
            return report, values
        if self.metric_set is not None:
            values.update({f"{tap}/{name}": value for name, value in self.metric_set.compute().items()})
        if has_drift:
            try:
                values[f"{tap}/{DRIFT_NAME}"] = self.drift.compute().detach()
            except (ValueError, RuntimeError) as error:
                if self.strict:
                    raise
                self._warn(f"{self.owner}: skipping {self.stage}/{tap}/{DRIFT_NAME}: {error}")
        return report, values
