"""Framework-agnostic collapse criteria: when does a monitored representation metric mean "stop"?

:class:`CollapseCriteria` holds the rule that ``reprmetrics.callbacks.CollapseEarlyStopping``
(Lightning) and the Hugging Face callback apply: a floor, a fraction of the embedding width D, or a
drop from a baseline, for ``patience`` consecutive checks; non-finite values (divergence) stop at once.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprmetrics.registry import MonitorConfigurationError, available_metrics
from reprmetrics.results import CaptureReport, TrackerResult

__all__ = [
    "SSL_GUARD_DEFAULTS",
    "CollapseCriteria",
    "Decision",
    "Guard",
    "KeyGuard",
    "SSLGuard",
    "check_criteria_fit",
    "collapse_kind",
    "parse_key",
    "ssl_guard",
]

RANK_METRICS = ("rankme", "lidar")
LOCAL_METRICS = ("lid",)
GLOBAL_DIMENSION_METRICS = ("twonn", "mle_dimension")
SPREAD_METRICS = ("normalized_std",)
# Metrics whose healthy value scales with the embedding width D (at most about D).
FRACTION_OF_DIM_METRICS = ("rankme", "lidar", "lid", "twonn", "mle_dimension", "nesum")
LOWER_IS_HEALTHIER = tuple(name for name, spec in available_metrics().items() if spec.direction == "↓")
DRIFT_METRICS = ("cka_to_reference",)
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
        rank_floor = max(1.5, SSL_GUARD_DEFAULTS["rank_floor"] * (dim or 0))
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


# ---- decisions and the SSL preset ------------------------------------------------------------------
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


class SSLGuard:
    """The SSL collapse preset for one tap: floors on rank and spread, and their trend against the run's best.

    Built by :func:`ssl_guard`; see there for the rule. Feed it one check at a time with
    :meth:`check_values` (values keyed ``"{tap}/{metric}"``, as the tracker returns them).
    """

    def __init__(
        self,
        tap: str,
        stage: str = "val",
        *,
        rank_floor: float,
        spread_floor: float,
        rank_drop: float,
        spread_drop: float,
        trend_mode: str,
        warmup: int,
        patience: int,
        check_finite: bool = True,
        owner: str = "ssl_guard",
    ) -> None:
        if not isinstance(tap, str) or not tap or "/" in tap:
            raise MonitorConfigurationError(f"{owner}: `tap` must be a tap name (no '/'), got {tap!r}")
        if stage not in ("train", "val"):
            raise MonitorConfigurationError(f"{owner}: `stage` must be 'train' or 'val', got {stage!r}")
        for name, value in (("rank_floor", rank_floor), ("rank_drop", rank_drop), ("spread_drop", spread_drop)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise MonitorConfigurationError(f"{owner}: `{name}` must be in (0, 1) or None, got {value!r}")
        if spread_floor is not None and not (isinstance(spread_floor, (int, float)) and 0 < spread_floor < 1):
            raise MonitorConfigurationError(
                f"{owner}: `spread_floor` (a fraction of the healthy 1/√D) must be in (0, 1) or None, got"
                f" {spread_floor!r}"
            )
        if trend_mode not in ("any", "all"):
            raise MonitorConfigurationError(f"{owner}: `trend_mode` must be 'any' or 'all', got {trend_mode!r}")
        for name, value, low in (("warmup", warmup, 0), ("patience", patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MonitorConfigurationError(f"{owner}: `{name}` must be an integer >= {low}, got {value!r}")
        self.tap, self.stage = tap, stage
        self.rank_floor, self.spread_floor = rank_floor, spread_floor
        self.rank_drop, self.spread_drop = rank_drop, spread_drop
        self.trend_mode, self.warmup, self.patience = trend_mode, warmup, patience
        self.check_finite = check_finite
        self.reset()

    @property
    def wait_count(self) -> int:
        """Consecutive checks the current condition has held (floor or trend)."""
        return max(self.floor_count, self.trend_count)

    # The per-tap metrics this guard reads.
    @property
    def metrics(self) -> tuple[str, str]:
        return ("rankme", "normalized_std")

    def keys(self) -> list[str]:
        """``"{tap}/{metric}"`` keys (the tracker's naming) this guard reads."""
        return [f"{self.tap}/{m}" for m in self.metrics]

    def reset(self) -> None:
        self.checks = 0
        self.best: dict[str, float] = {}
        self.floor_count = 0
        self.trend_count = 0
        self.last: dict[str, float] = {}

    def _settings(self) -> str:
        return (
            f"rank_floor={self.rank_floor}, spread_floor={self.spread_floor}, rank_drop={self.rank_drop},"
            f" spread_drop={self.spread_drop},"
            f" trend_mode={self.trend_mode!r}, warmup={self.warmup}, patience={self.patience}"
        )

    def __repr__(self) -> str:
        return f"ssl_guard({self.tap!r}, stage={self.stage!r}, {self._settings()})"

    def check_values(self, values: Mapping[str, Any], widths: Mapping[str, int] | None = None) -> Decision:
        """One check from ``{"{tap}/rankme": r, "{tap}/normalized_std": s, ...}`` and ``{tap: D}``.

        Values of other taps or metrics are ignored. A check without this tap's rankme and
        normalized_std (withheld for too few samples) changes nothing and does not stop.
        """
        rank = values.get(f"{self.tap}/rankme")
        spread = values.get(f"{self.tap}/normalized_std")
        if rank is None and spread is None:
            return Decision(False)
        rank = None if rank is None else float(rank)
        spread = None if spread is None else float(spread)
        dim = (widths or {}).get(self.tap)
        for name, value in (("rankme", rank), ("normalized_std", spread)):
            if value is not None and not math.isfinite(value) and self.check_finite:
                key = f"{self.tap}/{name}"
                return Decision(
                    True,
                    "divergence",
                    f"Divergence: {key} = {value} is not finite: the tap's embeddings contain NaN or infinite"
                    " values. Signaling Trainer to stop.",
                    key,
                    value,
                    self.best.get(name),
                )
        self.checks += 1
        current = {"rankme": rank, "normalized_std": spread}
        healthy_spread = 1 / math.sqrt(dim) if dim else None
        rank_low = rank is not None and dim is not None and self.rank_floor is not None and rank < self.rank_floor * dim
        spread_low = (
            spread is not None
            and healthy_spread is not None
            and self.spread_floor is not None
            and spread < self.spread_floor * healthy_spread
        )
        drops = {"rankme": self.rank_drop, "normalized_std": self.spread_drop}
        falling: dict[str, float] = {}  # metric -> fraction below its best
        counting = self.checks > self.warmup
        for name, value in current.items():
            best = self.best.get(name)
            if value is None or drops[name] is None or not counting or not best:
                continue
            fall = 1 - value / best
            if fall > drops[name]:
                falling[name] = fall
        trend = bool(falling) and (
            self.trend_mode == "any"
            or len(falling) == len([m for m in current if current[m] is not None and drops[m] is not None])
        )
        if counting:
            for name, value in current.items():
                if value is not None:
                    self.best[name] = max(self.best.get(name, -math.inf), value)
        self.last = {k: v for k, v in current.items() if v is not None}
        self.floor_count = self.floor_count + 1 if (rank_low or spread_low) else 0
        self.trend_count = self.trend_count + 1 if trend else 0
        side_by_side = self._side_by_side(rank, spread, dim)
        if self.floor_count >= self.patience:
            if rank_low and spread_low:
                kind, what = "complete", "Complete collapse: the embeddings are pulled toward one point"
            elif rank_low:
                kind, what = "dimensional", "Dimensional collapse: the embeddings span few directions"
            else:
                kind, what = (
                    "in progress",
                    "Collapse in progress: the embeddings converge on one direction (spread below its floor; rank"
                    " not yet gone)",
                )
            lines = []
            if rank_low:
                lines.append(f"RankMe {rank:.4g} < {self.rank_floor:g}·D = {self.rank_floor * dim:.4g}")
            if spread_low:
                lines.append(
                    f"normalized std {spread:.3g} < {self.spread_floor:g}/√D = {self.spread_floor * healthy_spread:.3g}"
                )
            key = f"{self.tap}/{'rankme' if rank_low else 'normalized_std'}"
            value = rank if rank_low else spread
            return Decision(
                True,
                kind,
                f"{what} ({self.stage}, tap {self.tap}): {'; '.join(lines)}{_for_checks(self.floor_count)};"
                f" {side_by_side}. Signaling Trainer to stop.",
                key,
                value,
                self.best.get(key.rsplit("/", 1)[1]),
            )
        if self.trend_count >= self.patience:
            parts = [
                f"{'RankMe' if name == 'rankme' else 'normalized std'} fell {fall:.0%} below its best"
                f" {self.best[name]:.4g}"
                f" (allowed {drops[name]:.0%})"
                for name, fall in falling.items()
            ]
            name = max(falling, key=falling.get)
            key = f"{self.tap}/{name}"
            return Decision(
                True,
                "in progress",
                f"Collapse in progress ({self.stage}, tap {self.tap}):"
                f" {'; '.join(parts)}{_for_checks(self.trend_count)}; {side_by_side}."
                " Signaling Trainer to stop.",
                key,
                current[name],
                self.best[name],
            )
        return Decision(False, "", f"{self.tap}: healthy; {side_by_side}")

    def check(self, result: TrackerResult) -> Decision | None:
        """One check from a tracker result of this guard's stage (None for other stages, or when withheld)."""
        if result.stage != self.stage or (
            f"{self.tap}/rankme" not in result.values and f"{self.tap}/normalized_std" not in result.values
        ):
            return None
        decision = self.check_values(result.floats(), result.widths)
        if decision.kind == "divergence" and result.diverged(self.tap):
            reason = (
                f"Divergence: {result.describe_divergence(self.tap)}, so {decision.monitor} = {decision.value}."
                " Signaling Trainer to stop."
            )
            return Decision(True, "divergence", reason, decision.monitor, decision.value, decision.best)
        return decision

    def _side_by_side(self, rank: float | None, spread: float | None, dim: int | None) -> str:
        parts = []
        if rank is not None:
            best = self.best.get("rankme")
            parts.append(
                f"RankMe {rank:.4g}"
                + (f" of D = {dim}" if dim else "")
                + (f" (best {best:.4g})" if best is not None else "")
            )
        if spread is not None:
            best = self.best.get("normalized_std")
            healthy = f", healthy ≈ 1/√D = {1 / math.sqrt(dim):.3g}" if dim else ""
            parts.append(
                f"normalized std {spread:.3g}"
                + (f" (best {best:.3g}{healthy})" if best is not None else (f" ({healthy[2:]})" if healthy else ""))
            )
        return ", ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "best": dict(self.best),
            "floor_count": self.floor_count,
            "trend_count": self.trend_count,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.checks = int(state.get("checks", 0))
        self.best = {k: float(v) for k, v in state.get("best", {}).items()}
        self.floor_count = int(state.get("floor_count", 0))
        self.trend_count = int(state.get("trend_count", 0))
        self.last = {k: float(v) for k, v in state.get("last", {}).items()}


#: The preset's settings, chosen on the collapse zoo's digits cells (5 SSL families, 90 runs) and
#: reported on the MNIST-1D cells as held-out data (``docs/zoo/``): 0 of 60 healthy runs stopped, 100
#: of 120 runs built to collapse stopped (the misses: BYOL with momentum 0 and VICReg at lr 0.05 on
#: MNIST-1D, whose projectors stay in the healthy range). Tight by design: a single check (patience 1)
#: with normalised std 10 % below its best stops — healthy runs fell at most 5 % after the first check,
#: and normalised std, an average over D dimensions, is a low-noise statistic. Pass ``patience=2`` for
#: noisier evaluation sets (it stops about one epoch later).
SSL_GUARD_DEFAULTS: dict[str, Any] = {
    "rank_floor": 0.15,
    "spread_floor": 0.4,
    "rank_drop": 0.8,
    "spread_drop": 0.1,
    "trend_mode": "any",
    "warmup": 1,
    "patience": 1,
}


def _for_checks(count: int) -> str:
    return f" for {count} consecutive checks" if count > 1 else ""


def ssl_guard(tap: str, stage: str = "val", **settings: Any) -> SSLGuard:
    r"""The SSL collapse guard for one tap: what to stop a self-supervised run on, in one call.

    Reads the tap's ``rankme`` and ``normalized_std`` (D is the tap's width) at each check and stops
    when, for ``patience`` consecutive checks,

    - **floors**: RankMe < ``rank_floor``·D, or normalised std < ``spread_floor``/√D (40 % of its
      healthy 1/√D by default); both at once is *complete* collapse (toward a point), RankMe alone is
      *dimensional* collapse, the spread alone is collapse *in progress* (toward one direction);
    - **trend**: RankMe is more than ``rank_drop``, or normalised std more than ``spread_drop``, below
      its best so far (``trend_mode="any"``; ``"all"``: both), counting from check ``warmup + 1`` on
      (the first ``warmup`` checks neither set the best nor stop: healthy runs lose rank early): a
      collapse *in progress*, which floors alone see late or never (a VICReg without its variance and
      covariance terms falls from 57 to 26 of 64 without ever crossing 0.2·D).

    Non-finite values stop at once (divergence). Settings default to :data:`SSL_GUARD_DEFAULTS`;
    pass any of them to override. Use it with ``CollapseEarlyStopping.for_ssl(tap)`` (Lightning),
    ``RepresentationCallback(..., stop_on=ssl_guard(tap))`` (Hugging Face), or call
    :meth:`SSLGuard.check_values` yourself in a plain loop.
    """
    unknown = sorted(set(settings) - set(SSL_GUARD_DEFAULTS) - {"check_finite", "owner"})
    if unknown:
        close = {u: difflib.get_close_matches(u, SSL_GUARD_DEFAULTS, n=1) for u in unknown}
        hints = "; ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
        raise MonitorConfigurationError(
            f"ssl_guard: unknown settings {hints}; the settings are {', '.join(SSL_GUARD_DEFAULTS)}"
        )
    return SSLGuard(tap, stage, **{**SSL_GUARD_DEFAULTS, **settings})


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


Guard = KeyGuard | SSLGuard


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
