"""The guard: when a tracker's results mean "stop", framework-agnostic.

A guard reads one :class:`~reprmetrics.results.TrackerResult` and returns a :class:`Decision`:
:class:`KeyGuard` applies :class:`CollapseCriteria` to one key, :func:`ssl_guard` is the SSL preset.
:class:`StopRules` is a stopper's set of guards: it parses what the user wrote (``stop_on``), checks
it against the monitor's taps and metrics (naming the closest), applies the guards to each result
and saves their state. The Lightning and Hugging Face stoppers only translate its decisions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reprmetrics.criteria import (
    DRIFT_METRICS,
    FRACTION_OF_DIM_METRICS,
    KNOWN_METRICS,
    LOWER_IS_HEALTHIER,
    CollapseCriteria,
    Decision,
    KeyGuard,
    check_criteria_fit,
    collapse_kind,
    parse_key,
)
from reprmetrics.registry import MonitorConfigurationError
from reprmetrics.results import TrackerResult
from reprmetrics.ssl_preset import SSL_GUARD_DEFAULTS, SSLGuard, ssl_guard

__all__ = [
    "CRITERIA",
    "DRIFT_METRICS",
    "FRACTION_OF_DIM_METRICS",
    "KNOWN_METRICS",
    "LOWER_IS_HEALTHIER",
    "SSL_GUARD_DEFAULTS",
    "CollapseCriteria",
    "Decision",
    "Guard",
    "KeyGuard",
    "KeyStyle",
    "SSLGuard",
    "StopRules",
    "check_criteria_fit",
    "collapse_kind",
    "parse_key",
    "reject_unused_criteria",
    "ssl_guard",
]

Guard = KeyGuard | SSLGuard
#: The settings of :class:`CollapseCriteria` a stopper passes on to its key rules.
CRITERIA = (
    "patience",
    "min_value",
    "min_fraction_of_dim",
    "max_relative_drop",
    "baseline",
    "dim",
    "kind",
    "check_finite",
)
_THRESHOLDS = ("min_value", "min_fraction_of_dim", "max_relative_drop", "baseline")


@dataclass(frozen=True)
class KeyStyle:
    """How a framework spells the monitor's keys.

    ``monitor``: the monitoring callback's name (for messages); ``stages``: stage as written → the
    tracker's (``"val"``/``"train"``); ``logged``: the tracker's stage → the logged name, a format of
    ``prefix``, ``tap``, ``metric``; ``aliases``: other spellings of a key's start (``{prefix}``
    formatted), e.g. the logged ``"eval_{prefix}/"`` for ``"{prefix}/eval/"``.
    """

    monitor: str
    stages: Mapping[str, str]
    logged: Mapping[str, str]
    aliases: Mapping[str, str] | None = None

    def written(self, stage: str) -> str:
        return next(name for name, tracker_stage in self.stages.items() if tracker_stage == stage)

    def key(self, prefix: str, stage: str, tap: str, metric: str) -> str:
        return f"{prefix}/{self.written(stage)}/{tap}/{metric}"

    def parse(self, key: Any, prefix: str) -> tuple[str, str, str] | None:
        """``(stage, tap, metric)`` of a key (tracker stage), or None when it is not a monitor key."""
        if not isinstance(key, str):
            return None
        for alias, canonical in (self.aliases or {}).items():
            alias, canonical = alias.format(prefix=prefix), canonical.format(prefix=prefix)
            if key.startswith(alias):
                key = canonical + key[len(alias) :]
        return parse_key(key, prefix, self.stages)

    def forms(self, prefix: str) -> str:
        """What the keys look like, for messages."""
        return " or ".join(f"{prefix}/{written}/{{tap}}/{{metric}}" for written in self.stages)


def reject_unused_criteria(owner: str, example: str, **criteria: Any) -> None:
    """Raise when thresholds are given but no key to apply them to (they would silently do nothing)."""
    if any(criteria.get(name) is not None for name in _THRESHOLDS):
        raise MonitorConfigurationError(
            f"{owner}: stopping criteria given but no `stop_on` key to apply them to, e.g. stop_on={example!r}"
        )


def _raise(message: str) -> None:
    raise MonitorConfigurationError(message)


class StopRules:
    """A stopper's rules, each ``(what the user wrote, guard)``, checked against the monitor's results.

    Build it with :meth:`parse` from ``stop_on`` (a key, a guard, a list of them, or ``{key:
    {criterion: value}}``), or from guards. ``on_unknown`` is called with the message when a rule names
    a tap or metric the monitor lacks (default: raise
    :class:`~reprmetrics.monitor.MonitorConfigurationError`; a lenient stopper may warn instead).
    """

    def __init__(
        self,
        rules: Sequence[tuple[str, Guard]],
        style: KeyStyle,
        prefix: str = "repr",
        owner: str = "StopRules",
        param: str = "stop_on",
        on_unknown: Callable[[str], None] = _raise,
    ) -> None:
        self.rules, self.style, self.prefix, self.owner, self.param = list(rules), style, prefix, owner, param
        self.on_unknown = on_unknown
        self._verified: set[int] = set()

    @classmethod
    def parse(
        cls,
        stop_on: str | Guard | Iterable[str | Guard] | Mapping[str, Mapping[str, Any]],
        style: KeyStyle,
        prefix: str = "repr",
        owner: str = "StopRules",
        **criteria: Any,
    ) -> StopRules:
        """Rules from ``stop_on``; ``criteria`` (see :data:`CRITERIA`) apply to every key without its own."""
        unknown = sorted(set(criteria) - set(CRITERIA))
        if unknown:
            raise MonitorConfigurationError(f"{owner}: unknown criteria {unknown}; they are {sorted(CRITERIA)}")
        if isinstance(stop_on, (str, SSLGuard, KeyGuard)) or not isinstance(stop_on, Iterable):
            stop_on = [stop_on]
        items = (
            [(k, dict(v or {})) for k, v in stop_on.items()]
            if isinstance(stop_on, Mapping)
            else [(k, {}) for k in stop_on or []]
        )
        for key, _ in items:
            if not isinstance(key, (str, SSLGuard, KeyGuard)):
                raise MonitorConfigurationError(
                    f"{owner}: `stop_on` keys must be strings or ssl_guard(...), got {type(key).__name__}"
                )
        if not any(isinstance(k, str) for k, _ in items):
            reject_unused_criteria(owner, style.key(prefix, "val", "projector", "rankme"), **criteria)
        rules: list[tuple[str, Guard]] = []
        for key, own in items:
            if isinstance(key, (SSLGuard, KeyGuard)):
                rules.append((repr(key), key))
                continue
            parsed = style.parse(key, prefix)
            if parsed is None:
                raise MonitorConfigurationError(cls.not_a_key(key, style, prefix, owner))
            unknown = sorted(set(own) - set(CRITERIA))
            if unknown:
                raise MonitorConfigurationError(
                    f"{owner}: stop_on[{key!r}] has unknown criteria {unknown}; they are {sorted(CRITERIA)}"
                )
            logged = style.logged[parsed[0]].format(prefix=prefix, tap=parsed[1], metric=parsed[2])
            rules.append((key, KeyGuard(*parsed, CollapseCriteria(logged, owner=owner, **{**criteria, **own}))))
        return cls(rules, style, prefix, owner)

    @staticmethod
    def not_a_key(
        key: Any, style: KeyStyle, prefix: str, owner: str, tap: str = "projector", param: str = "stop_on"
    ) -> str:
        logged = [fmt.format(prefix=prefix, tap="{tap}", metric="{metric}") for fmt in style.logged.values()]
        also = f" (logged as {' or '.join(logged)})" if any(f not in style.forms(prefix) for f in logged) else ""
        return (
            f"{owner}: {param}={key!r} is not a monitor key of the {style.monitor}; they read"
            f" {style.forms(prefix)}{also}, e.g. {style.key(prefix, 'val', tap, 'rankme')}"
        )

    def __iter__(self) -> Iterator[tuple[str, Guard]]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def identity(self) -> str:
        """What the rules are, for matching saved state to a stopper."""
        return f"{self.prefix}:" + ";".join(written for written, _ in self.rules)

    @property
    def wait_count(self) -> int:
        return max((rule.wait_count for _, rule in self.rules), default=0)

    def check_source(self, tracker: Any, example: str) -> None:
        """Before training: a monitor of this prefix exists (``tracker``), watches every rule's tap and computes
        its stage; ``example`` shows the stopper in a callback list."""
        if tracker is None:
            tap = self.rules[0][1].tap if self.rules else "projector"
            raise MonitorConfigurationError(
                f"{self.owner}: no {self.style.monitor} with prefix {self.prefix!r} is among the Trainer's callbacks;"
                f" add one that taps {tap!r}, e.g. callbacks=[{self.style.monitor}([{tap!r}]), {example}]"
            )
        self.check_monitor([t.name for t in tracker.taps], tracker.every_n_train_steps)

    def check_monitor(self, taps: Sequence[str], every_n_train_steps: int) -> None:
        """Before training: every rule's tap is one the monitor watches, and training-stage rules get values."""
        for written, rule in self.rules:
            if rule.tap not in taps:
                close = difflib.get_close_matches(rule.tap, taps, n=1, cutoff=0.5)
                hint = ""
                if close:
                    hint = (
                        self.style.key(self.prefix, rule.stage, close[0], rule.metric)
                        if isinstance(rule, KeyGuard)
                        else repr(close[0])
                    )
                self.on_unknown(
                    f"{self.owner}: {self.param}={written!r} names tap {rule.tap!r}, which the {self.style.monitor}"
                    f" does not watch; its taps are {', '.join(map(repr, taps))}"
                    + (f"; did you mean {hint}?" if hint else "")
                )
            if rule.stage == "train" and every_n_train_steps == 0:
                fix = "use ssl_guard(tap, stage='val')" if isinstance(rule, SSLGuard) else "watch a val-stage key"
                raise MonitorConfigurationError(
                    f"{self.owner}: {self.param}={written!r} needs training-stage values, but the"
                    f" {self.style.monitor} computes none (every_n_train_steps=0); {fix} or set every_n_train_steps"
                )

    def check(self, result: TrackerResult) -> Decision | None:
        """Apply the rules of the result's stage: the first decision that stops, else the last one (None: none)."""
        last = None
        for index, (_, rule) in enumerate(self.rules):
            if rule.stage != result.stage:
                continue
            self._verify(index, rule, result)
            decision = rule.check(result)
            if decision is not None and decision.stop:
                return decision
            last = decision if decision is not None else last
        return last

    def _verify(self, index: int, rule: Guard, result: TrackerResult) -> None:
        """At the first result for the rule's tap: the metrics it reads must be ones the tracker reports."""
        if index in self._verified or rule.tap not in result.names:
            return
        self._verified.add(index)
        missing = [m for m in rule.metrics if m not in result.names[rule.tap]]
        if missing:
            key = self.style.key(self.prefix, result.stage, rule.tap, missing[0])
            existing = [self.style.key(self.prefix, result.stage, rule.tap, m) for m in result.names[rule.tap]]
            close = difflib.get_close_matches(key, existing, n=3, cutoff=0.5)
            self.on_unknown(
                f"{self.owner}: early stopping conditioned on `{key}`, which is not available: the"
                f" {self.style.monitor} does not compute {missing[0]!r} for tap {rule.tap!r}. Use any of the"
                f" following: {', '.join(f'`{k}`' for k in existing)}"
                + (f" (closest: {', '.join(f'`{k}`' for k in close)})" if close else "")
            )

    def state_dict(self) -> dict[str, Any]:
        return {"guards": [rule.state_dict() for _, rule in self.rules], "verified": sorted(self._verified)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for (_, rule), saved in zip(self.rules, state["guards"]):
            rule.load_state_dict(saved)
        self._verified = set(state.get("verified", ()))
