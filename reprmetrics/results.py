"""What one computation of the tracker gives: :class:`TrackerResult`, with a :class:`CaptureReport` per tap.

The guard in :mod:`reprmetrics.stopping` decides from a result alone, and the framework adapters
log from it: nobody reads the tracker's history or its private state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CaptureReport", "Channel", "TrackerResult", "channel"]

STAGE_LABELS = {"train": "training", "val": "validation"}


@dataclass
class CaptureReport:
    """What one computation of a tap and stage saw: samples captured, used, non-finite and dropped."""

    stage: str
    tap: str
    used: int
    nonfinite: int
    dropped: int

    @property
    def seen(self) -> int:
        return self.used + self.nonfinite + self.dropped

    @property
    def nonfinite_fraction(self) -> float:
        return self.nonfinite / self.seen if self.seen else 0.0


@dataclass(frozen=True)
class TrackerResult:
    """One computation of the tracker, on every rank the same.

    Attributes:
        stage: ``"train"`` (every ``every_n_train_steps``) or ``"val"`` (each evaluation pass).
        step: the tracker's training-step clock when computed.
        values: ``{"tap/metric": scalar tensor}``; values withheld (too few samples) are absent, a tap
            whose embeddings were non-finite has NaN for every metric.
        reports: ``{tap: CaptureReport}`` (samples used, non-finite, dropped).
        widths: ``{tap: D}``, the embedding width of each tap seen so far.
        artifacts: ``{tap: {...}}`` what figures need: ``"spectrum"`` (covariance eigenvalues and the
            α-ReQ fit), ``"singular_values"``, ``"lid_per_sample"``.
        names: ``{tap: [metric names]}`` the stage reports for each tap (whether or not withheld now).
    """

    stage: str
    step: int
    values: Mapping[str, Tensor] = field(default_factory=dict)
    reports: Mapping[str, CaptureReport] = field(default_factory=dict)
    widths: Mapping[str, int] = field(default_factory=dict)
    artifacts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    names: Mapping[str, list[str]] = field(default_factory=dict)

    def value(self, tap: str, metric: str) -> float | None:
        """The value of ``tap``'s ``metric`` as a float, or None when not computed this time."""
        value = self.values.get(f"{tap}/{metric}")
        return None if value is None else float(value)

    def floats(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.values.items()}

    def diverged(self, tap: str) -> bool:
        report = self.reports.get(tap)
        return report is not None and report.nonfinite > 0

    def describe_divergence(self, tap: str) -> str:
        report = self.reports[tap]
        return (
            f"tap {tap} produced non-finite embeddings ({report.nonfinite_fraction:.0%} of {report.seen} samples,"
            f" {STAGE_LABELS.get(self.stage, self.stage)})"
        )


class Channel:
    """Delivers one tracker's results to the guards that act on them, found by name, not by class.

    The monitoring side calls :meth:`publish_from` with its tracker; the stopping side
    subscribes a function (:meth:`subscribe`). Either may come first. Adapters get a channel with
    :func:`channel`, keyed by the object their framework gives both (the Lightning ``Trainer``, the
    Hugging Face model) and the monitor's prefix: two callbacks never call each other or read each
    other's state.
    """

    def __init__(self) -> None:
        self.tracker: Any = None
        self._receivers: list[Callable[[TrackerResult], None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    def publish_from(self, tracker: Any) -> None:
        if self.tracker is tracker:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.tracker = tracker
        self._unsubscribe = tracker.subscribe(self._deliver)

    def subscribe(self, receive: Callable[[TrackerResult], None]) -> None:
        if receive not in self._receivers:
            self._receivers.append(receive)

    def _deliver(self, result: TrackerResult) -> None:
        for receive in list(self._receivers):
            receive(result)


_CHANNELS: weakref.WeakKeyDictionary[Any, dict[str, Channel]] = weakref.WeakKeyDictionary()


def channel(scope: Any, name: str) -> Channel:
    """The channel called ``name`` within ``scope`` (an object both sides see; kept as long as it lives)."""
    return _CHANNELS.setdefault(scope, {}).setdefault(name, Channel())
