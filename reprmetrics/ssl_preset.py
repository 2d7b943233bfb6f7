"""The SSL collapse preset: one guard per tap on rank, spread and their trend (:func:`ssl_guard`).

Imported through :mod:`reprmetrics.stopping`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from reprmetrics.criteria import SSL_RANK_FLOOR, Decision
from reprmetrics.registry import MonitorConfigurationError
from reprmetrics.results import TrackerResult


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
    "rank_floor": SSL_RANK_FLOOR,
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
