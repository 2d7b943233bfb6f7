"""Collapse criteria on one monitored key: when does a representation metric's value mean "stop"?

:class:`CollapseCriteria` is the rule (a floor, a fraction of the width D, or a drop from a baseline,
for ``patience`` consecutive checks; non-finite values stop at once), :class:`KeyGuard` applies it to
a tracker result, and a :class:`Decision` is what a guard concludes. Imported through
:mod:`reprmetrics.stopping`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprmetrics.registry import MonitorConfigurationError, available_metrics
from reprmetrics.results import CaptureReport, TrackerResult

RANK_METRICS = ("rankme", "lidar")
LOCAL_METRICS = ("lid",)
GLOBAL_DIMENSION_METRICS = ("twonn", "mle_dimension")
SPREAD_METRICS = ("normalized_std",)
# Metrics whose healthy value scales with the embedding width D (at most about D).
FRACTION_OF_DIM_METRICS = ("rankme", "lidar", "lid", "twonn", "mle_dimension", "nesum")
LOWER_IS_HEALTHIER = tuple(name for name, spec in available_metrics().items() if spec.direction == "↓")
DRIFT_METRICS = ("cka_to_reference",)
SSL_RANK_FLOOR = 0.15  # the SSL preset's rank floor, as a fraction of D
KNOWN_METRICS = (*available_metrics(), *DRIFT_METRICS)


def collapse_kind(
    metric: str, value: float, normalized_std: float | None = None, dim: int | None = None, rank: float | None = None
) -> str:
    """Which collapse a low value of ``metric`` means: complete, dimensional, local, in progress, or drift.

    *Complete* only for collapse toward a point: the spread gone (the tap's normalised std below a
    quarter of its healthy 1/√D) **and** the rank gone (a rank metric below its floor — the check that
    fired — or, watching the spread, RankMe below the SSL preset's rank floor). The spread gone while
    RankMe still reads more is collapse *in progress* (toward one direction); a rank metric below its
    floor with the spread kept is *dimensional* collapse.
    """
    if metric in DRIFT_METRICS:
        return "drift"
    spread_gone = metric in SPREAD_METRICS or bool(
        normalized_std is not None and dim and normalized_std < 0.25 / math.sqrt(dim)
    )
    if metric in RANK_METRICS:
        return "complete" if spread_gone or value <= 1.5 else "dimensional"
    if spread_gone:
        rank_floor = max(1.5, SSL_RANK_FLOOR * (dim or 0))
        return "complete" if rank is None or rank < rank_floor else "in progress"
    if metric in LOCAL_METRICS:
        return "local"
    if metric in GLOBAL_DIMENSION_METRICS:
        return "dimensional"
    return "representation"


def check_criteria_fit(
    monitor: str,
    min_value: float | None,
    min_fraction_of_dim: float | None,
    max_relative_drop: float | None,
    owner: str = "CollapseEarlyStopping",
) -> None:
    """Reject criteria that cannot mean what they say for the monitored metric (configuration time).

    Raises :class:`~reprmetrics.monitor.MonitorConfigurationError` naming the criterion that fits.
    """
    metric = monitor.rsplit("/", 1)[-1]
    where = f"{owner}({monitor!r})"
    if min_value is None and min_fraction_of_dim is None and max_relative_drop is None:
        raise MonitorConfigurationError(
            f"{owner}: give at least one of min_value, min_fraction_of_dim, max_relative_drop"
        )
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
            hint = (
                "its healthy value is 1/√D, not a fraction of D: use min_value (e.g. 0.25/√D, the complete-collapse"
                " line) or max_relative_drop"
            )
        else:
            hint = "its value does not scale with D: use min_value or max_relative_drop"
        raise MonitorConfigurationError(
            f"{where}: min_fraction_of_dim fits rank-like metrics ({', '.join(FRACTION_OF_DIM_METRICS)}); for"
            f" {metric} {hint}"
        )


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
        self.last_kind = ""  # the kind named by the last check that stopped

    def check(
        self,
        value: float,
        dim: int | None = None,
        normalized_std: float | None = None,
        report: CaptureReport | None = None,
        rank: float | None = None,
    ) -> tuple[bool, str]:
        """Apply one check; returns ``(stop, reason)`` (a reason also for checks that do not stop).

        ``normalized_std`` and ``rank`` (RankMe) of the same tap, when known, are shown beside the value
        and decide the kind named: complete collapse only when the spread is gone too.
        """
        value = float(value)
        self.diverged = False
        self.last_kind = ""
        if self.check_finite and not math.isfinite(value):
            self.diverged = True
            self.last_kind = "divergence"
            if report is not None and report.nonfinite:
                stage = {"train": "training", "val": "validation"}.get(report.stage, report.stage)
                return True, (
                    f"Divergence: tap {report.tap} produced non-finite embeddings ({report.nonfinite_fraction:.0%}"
                    f" of {report.seen}"
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
                reasons.append(
                    f"{1 - value / self.baseline:.0%} below the baseline {self.baseline:.4g} (allowed drop"
                    f" {self.max_relative_drop:.0%})"
                )

        if not reasons:
            self.wait_count = 0
            return False, f"{self.monitor} = {value:.4g}: healthy"
        self.wait_count += 1
        if self.wait_count < self.patience:
            return False, f"{self.monitor} = {value:.4g}: {'; '.join(reasons)} ({self.wait_count}/{self.patience})"
        kind = self.last_kind = self.kind or collapse_kind(self.metric, value, normalized_std, dim, rank)
        recent = ", ".join(f"{v:.4g}" for v in self.values_seen[-(self.patience + 2) :])
        std_note = (
            f"; normalized std {normalized_std:.3g} vs healthy 1/√D = {1 / math.sqrt(dim):.3g}"
            if normalized_std is not None and dim
            else ""
        )
        if rank is not None and self.metric != "rankme":
            std_note += f"; RankMe {rank:.4g}" + (f" of D = {dim}" if dim else "")
        if kind == "drift":
            tap = self.monitor.rsplit("/", 2)[-2] if self.monitor.count("/") >= 2 else "representation"
            return True, (
                f"Representation drift: CKA to the reference {tap} fell to {value:.4g} ({self.monitor}),"
                f" {'; '.join(reasons)},"
                f" for {self.wait_count} consecutive checks (recent values: {recent}). Signaling Trainer to stop."
            )
        label = "Collapse in progress" if kind == "in progress" else f"{kind.capitalize()} collapse"
        return True, (
            f"{label}: {self.monitor} = {value:.4g} is {'; '.join(reasons)}, for {self.wait_count} consecutive checks"
            f" (recent values: {recent}; best seen {self.best:.4g}{std_note}). Signaling Trainer to stop."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "values_seen": list(self.values_seen),
            "wait_count": self.wait_count,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline", self.baseline)
        self.values_seen = list(state.get("values_seen", []))
        self.wait_count = int(state.get("wait_count", 0))
        self.best = float(state.get("best", max(self.values_seen, default=-math.inf)))


@dataclass(frozen=True)
class Decision:
    """What a guard concluded from one check.

    ``stop``: whether to stop; ``kind``: ``"complete"`` (collapse toward a point: spread and rank both
    gone), ``"dimensional"`` (rank lost, spread kept), ``"in progress"`` (a sustained fall from the
    run's own best, or spread below the complete-collapse line while rank remains), ``"drift"``,
    ``"divergence"`` (non-finite values), or ``""`` (healthy / no stop); ``reason``: text for logs;
    ``monitor``: the key that decided; ``value`` and ``best``: its value now and its best so far.
    """

    stop: bool
    kind: str = ""
    reason: str = ""
    monitor: str | None = None
    value: float | None = None
    best: float | None = None


class KeyGuard:
    """The :class:`CollapseCriteria` rule on one key of the tracker (``stage``, ``tap``, ``metric``).

    ``check(result)`` reads the key's value from a :class:`~reprmetrics.results.TrackerResult` of its
    stage, with the tap's width, normalised std, RankMe and capture report from the same result.
    """

    def __init__(self, stage: str, tap: str, metric: str, criteria: CollapseCriteria) -> None:
        self.stage, self.tap, self.metric, self.criteria = stage, tap, metric, criteria

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    @property
    def wait_count(self) -> int:
        return self.criteria.wait_count

    def check(self, result: TrackerResult) -> Decision | None:
        if result.stage != self.stage:
            return None
        value = result.value(self.tap, self.metric)
        if value is None:
            return None  # withheld this time (too few samples): no check
        dim = self.criteria.dim or result.widths.get(self.tap)
        stop, reason = self.criteria.check(
            value,
            dim,
            result.value(self.tap, "normalized_std"),
            result.reports.get(self.tap),
            result.value(self.tap, "rankme"),
        )
        best = self.criteria.best if math.isfinite(self.criteria.best) else None
        return Decision(stop, self.criteria.last_kind if stop else "", reason, self.criteria.monitor, value, best)

    def state_dict(self) -> dict[str, Any]:
        return self.criteria.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.criteria.load_state_dict(dict(state))

    def __repr__(self) -> str:
        return f"KeyGuard({self.criteria.monitor!r})"


def parse_key(key: str, prefix: str, stages: Mapping[str, str]) -> tuple[str, str, str] | None:
    """``(stage, tap, metric)`` of ``"{prefix}/{stage}/{tap}/{metric}"`` (tap names may hold '/'), or None.

    ``stages`` maps the stage names a framework writes to the tracker's (Lightning: train, val;
    Hugging Face: train, eval → val).
    """
    if not isinstance(key, str) or not key.startswith(prefix + "/"):
        return None
    stage, _, rest = key[len(prefix) + 1 :].partition("/")
    tap, _, metric = rest.rpartition("/")
    if stage not in stages or not tap or not metric:
        return None
    return stages[stage], tap, metric
