"""Framework-agnostic collapse criteria: when does a monitored representation metric mean "stop"?

:class:`CollapseCriteria` holds the rule that ``reprmetrics.callbacks.CollapseEarlyStopping``
(Lightning) and the Hugging Face callback apply: a floor, a fraction of the embedding width D, or a
drop from a baseline, for ``patience`` consecutive checks; non-finite values (divergence) stop at once.
"""

from __future__ import annotations

import math
from typing import Any

from reprmetrics.monitor import CaptureReport, MonitorConfigurationError, available_metrics

__all__ = ["CollapseCriteria", "check_criteria_fit", "collapse_kind"]

RANK_METRICS = ("rankme", "lidar")
LOCAL_METRICS = ("lid",)
GLOBAL_DIMENSION_METRICS = ("twonn", "mle_dimension")
SPREAD_METRICS = ("normalized_std",)
# Metrics whose healthy value scales with the embedding width D (at most about D).
FRACTION_OF_DIM_METRICS = ("rankme", "lidar", "lid", "twonn", "mle_dimension", "nesum")
LOWER_IS_HEALTHIER = tuple(name for name, spec in available_metrics().items() if spec.direction == "↓")
DRIFT_METRICS = ("cka_to_reference",)
KNOWN_METRICS = (*available_metrics(), *DRIFT_METRICS)


def collapse_kind(metric: str, value: float, normalized_std: float | None = None, dim: int | None = None) -> str:
    """Which collapse a low value of ``metric`` means: complete, dimensional, local, or drift.

    ``normalized_std`` (of the same tap, when the monitor computes it) below a quarter of its healthy
    value 1/√D means every embedding points nearly the same way: complete collapse, whatever the metric.
    """
    if metric in DRIFT_METRICS:
        return "drift"
    if normalized_std is not None and dim and normalized_std < 0.25 / math.sqrt(dim):
        return "complete"
    if metric in SPREAD_METRICS or (metric in RANK_METRICS and value <= 1.5):
        return "complete"
    if metric in LOCAL_METRICS:
        return "local"
    if metric in RANK_METRICS or metric in GLOBAL_DIMENSION_METRICS:
        return "dimensional"
    return "representation"


def check_criteria_fit(
    monitor: str, min_value: float | None, min_fraction_of_dim: float | None, max_relative_drop: float | None, owner: str = "CollapseEarlyStopping"
) -> None:
    """Reject criteria that cannot mean what they say for the monitored metric (configuration time).

    Raises :class:`~reprmetrics.monitor.MonitorConfigurationError` naming the criterion that fits.
    """
    metric = monitor.rsplit("/", 1)[-1]
    where = f"{owner}({monitor!r})"
    if min_value is None and min_fraction_of_dim is None and max_relative_drop is None:
        raise MonitorConfigurationError(f"{owner}: give at least one of min_value, min_fraction_of_dim, max_relative_drop")
    for name, value in (("min_fraction_of_dim", min_fraction_of_dim), ("max_relative_drop", max_relative_drop)):
        if value is not None and not 0 < value < 1:
            raise MonitorConfigurationError(f"{owner}: `{name}` must be in (0, 1), got {value}")
    if metric in LOWER_IS_HEALTHIER:
        raise MonitorConfigurationError(
            f"{where}: {metric} is lower-is-healthier, and {owner} stops when a higher-is-healthier metric falls."
            " Watch rankme, normalized_std or lid instead (or an early stopping with mode='min')"
        )
    if metric == "alpha_req":
        raise MonitorConfigurationError(
            f"{where}: α-ReQ is healthy near 1 and unhealthy in both directions, so no floor or drop fits it;"
            " watch rankme (dimensional collapse) or normalized_std (complete collapse)"
        )
    if metric == "num_samples":
        raise MonitorConfigurationError(f"{where}: num_samples counts samples, it is not a collapse signal")
    if metric == "nonfinite_fraction":
        raise MonitorConfigurationError(
            f"{where}: non-finite embeddings are caught by check_finite=True on any of the tap's metrics"
            " (e.g. .../<tap>/rankme): it stops at once with a divergence reason"
        )
    if min_fraction_of_dim is not None and metric in KNOWN_METRICS and metric not in FRACTION_OF_DIM_METRICS:
        if metric == "normalized_std":
            hint = "its healthy value is 1/√D, not a fraction of D: use min_value (e.g. 0.25/√D, the complete-collapse line) or max_relative_drop"
        else:
            hint = "its value does not scale with D: use min_value or max_relative_drop"
        raise MonitorConfigurationError(f"{where}: min_fraction_of_dim fits rank-like metrics ({', '.join(FRACTION_OF_DIM_METRICS)}); for {metric} {hint}")


class CollapseCriteria:
    """The stopping rule for one monitored key, fed one value per check.

    A check *shows collapse* when the value (higher is healthier) is below ``min_value``, below
    ``min_fraction_of_dim`` × D, or more than ``max_relative_drop`` below ``baseline`` (the first value
    seen when not given). ``patience`` consecutive collapsing checks stop; a healthy check resets the
    count. With ``check_finite`` a NaN/inf value stops at once; when the monitor's
    :class:`~reprmetrics.monitor.CaptureReport` says the tap's embeddings were non-finite, the reason
    says "Divergence: ...".
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        min_value: float | None = None,
        min_fraction_of_dim: float | None = None,
        max_relative_drop: float | None = None,
        baseline: float | None = None,
        dim: int | None = None,
        kind: str | None = None,
        check_finite: bool = True,
        owner: str = "CollapseEarlyStopping",
    ) -> None:
        check_criteria_fit(monitor, min_value, min_fraction_of_dim, max_relative_drop, owner)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise MonitorConfigurationError(f"{owner}: `patience` must be a positive integer, got {patience}")
        if baseline is not None and not (math.isfinite(baseline) and baseline > 0):
            raise MonitorConfigurationError(f"{owner}: `baseline` must be a positive finite number, got {baseline}")
        self.monitor = monitor
        self.metric = monitor.rsplit("/", 1)[-1]
        self.patience = patience
        self.min_value = min_value
        self.min_fraction_of_dim = min_fraction_of_dim
        self.max_relative_drop = max_relative_drop
        self.baseline = baseline
        self.dim = dim
        self.kind = kind
        self.check_finite = check_finite
        self.values_seen: list[float] = []
        self.wait_count = 0
        self.best = -math.inf
        self.diverged = False

    def check(
        self, value: float, dim: int | None = None, normalized_std: float | None = None, report: CaptureReport | None = None
    ) -> tuple[bool, str]:
        """Apply one check; returns ``(stop, reason)`` (a reason also for checks that do not stop)."""
        value = float(value)
        self.diverged = False
        if self.check_finite and not math.isfinite(value):
            self.diverged = True
            if report is not None and report.nonfinite:
                stage = {"train": "training", "val": "validation"}.get(report.stage, report.stage)
                return True, (
                    f"Divergence: tap {report.tap} produced non-finite embeddings ({report.nonfinite_fraction:.0%} of {report.seen}"
                    f" samples, {stage}), so {self.monitor} = {value}. Signaling Trainer to stop."
                )
            return True, f"Monitored metric {self.monitor} = {value} is not finite. Signaling Trainer to stop."
        self.values_seen.append(value)
        self.best = max(self.best, value)
        if self.baseline is None and len(self.values_seen) == 1:
            self.baseline = value  # first value seen
        dim = self.dim or dim

        reasons = []
        if self.min_value is not None and value < self.min_value:
            reasons.append(f"below the floor {self.min_value:g}")
        if self.min_fraction_of_dim is not None and dim:
            threshold = self.min_fraction_of_dim * dim
            if value < threshold:
                reasons.append(f"below {self.min_fraction_of_dim:g} × D = {threshold:.4g} (D = {dim})")
        if self.max_relative_drop is not None and self.baseline:
            threshold = (1 - self.max_relative_drop) * self.baseline
            if value < threshold:
                reasons.append(f"{1 - value / self.baseline:.0%} below the baseline {self.baseline:.4g} (allowed drop {self.max_relative_drop:.0%})")

        if not reasons:
            self.wait_count = 0
            return False, f"{self.monitor} = {value:.4g}: healthy"
        self.wait_count += 1
        if self.wait_count < self.patience:
            return False, f"{self.monitor} = {value:.4g}: {'; '.join(reasons)} ({self.wait_count}/{self.patience})"
        kind = self.kind or collapse_kind(self.metric, value, normalized_std, dim)
        recent = ", ".join(f"{v:.4g}" for v in self.values_seen[-(self.patience + 2) :])
        std_note = f"; normalized std {normalized_std:.3g} vs healthy 1/√D = {1 / math.sqrt(dim):.3g}" if normalized_std is not None and dim else ""
        if kind == "drift":
            tap = self.monitor.rsplit("/", 2)[-2] if self.monitor.count("/") >= 2 else "representation"
            return True, (
                f"Representation drift: CKA to the reference {tap} fell to {value:.4g} ({self.monitor}), {'; '.join(reasons)},"
                f" for {self.wait_count} consecutive checks (recent values: {recent}). Signaling Trainer to stop."
            )
        return True, (
            f"{kind.capitalize()} collapse: {self.monitor} = {value:.4g} is {'; '.join(reasons)}, for {self.wait_count} consecutive checks"
            f" (recent values: {recent}; best seen {self.best:.4g}{std_note}). Signaling Trainer to stop."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "values_seen": list(self.values_seen), "wait_count": self.wait_count, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline", self.baseline)
        self.values_seen = list(state.get("values_seen", []))
        self.wait_count = int(state.get("wait_count", 0))
        self.best = float(state.get("best", max(self.values_seen, default=-math.inf)))
