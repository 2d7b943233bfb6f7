"""CollapseEarlyStopping: stop a run (or a fine-tune) whose representation collapses."""

from __future__ import annotations

import difflib
import logging
import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from reprmetrics.monitor import MonitorConfigurationError, warn
from reprmetrics.results import TrackerResult, channel
from reprmetrics.stopping import CollapseCriteria, Decision, Guard, KeyGuard, collapse_kind, parse_key, ssl_guard

__all__ = ["CollapseEarlyStopping", "MonitoredKeyError", "collapse_kind"]

log = logging.getLogger(__name__)
_STAGES = {"train": "train", "val": "val"}


class MonitoredKeyError(MisconfigurationException, RuntimeError):
    """The monitored key is never produced (a ``RuntimeError`` like Lightning's ``EarlyStopping`` raises)."""


class CollapseEarlyStopping(EarlyStopping):
    r"""Stop training when a representation metric shows collapse for ``patience`` consecutive checks.

    A check *shows collapse* when the monitored value (one where higher is healthier: RankMe, LiDAR,
    local intrinsic dimension, normalised std, ...) is

    - below ``min_value`` (an absolute floor), or
    - below ``min_fraction_of_dim`` × D (rank metrics; D is the tap's embedding width, from the
      :class:`RepresentationMonitor` or given as ``dim``), or
    - more than ``max_relative_drop`` below the baseline: ``baseline`` when given (the fine-tuning
      case: the pretrained encoder's value), else the first value seen.

    For self-supervised training use the preset :meth:`for_ssl`, which also sees a collapse *in
    progress* (a sustained fall from the run's own best).

    Any collapsing check increments a counter, a healthy one resets it; at ``patience`` the trainer
    stops on every rank (Lightning's ``reduce_boolean_decision``), and ``stopping_reason_message``
    names the kind of collapse with the values seen, the tap's RankMe and normalised std side by side.
    The message is logged, printed by Lightning's logger and, with TensorBoard, added as text.

    Where values come from: a ``repr/...`` key of a :class:`RepresentationMonitor` (found by its
    prefix, in any order among the callbacks) is checked each time the monitor computes it — every
    ``every_n_train_steps`` for ``repr/train/...`` keys, at the end of validation for ``repr/val/...``
    keys. Any other logged key is read from Lightning's metrics at the end of validation. Put a
    ``ModelCheckpoint`` on the same metric (``mode="max"``) to keep the best checkpoint from before
    the collapse.

    Args:
        monitor: the logged key, e.g. ``"repr/val/projector/rankme"``.
        patience: consecutive collapsing checks before stopping.
        min_value: an absolute floor.
        min_fraction_of_dim: a floor as a fraction of the embedding width D.
        max_relative_drop: the largest allowed fall below the baseline, as a fraction.
        baseline: reference value for ``max_relative_drop`` (default: the first value seen).
        dim: embedding width for ``min_fraction_of_dim`` (default: from the RepresentationMonitor).
        kind: override the collapse kind named in the reason.
        check_finite: stop at once on a NaN/inf value (the monitor logs NaN when a tap's embeddings
            are non-finite: "Divergence: tap projector produced non-finite embeddings ...").
        strict: raise if the monitored key is never produced, listing the keys that exist (like
            Lightning's ``EarlyStopping``); ``strict=False`` warns instead.
        verbose: log each check's outcome.
        guard: the rule itself (:func:`reprmetrics.stopping.ssl_guard` or a ``KeyGuard``), instead of
            the criteria above; :meth:`for_ssl` passes one.
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
        strict: bool = True,
        verbose: bool = False,
        guard: Guard | None = None,
    ) -> None:
        super().__init__(
            monitor=monitor,
            patience=patience,
            mode="max",
            strict=strict,
            check_finite=check_finite,
            verbose=verbose,
            check_on_train_epoch_end=False,
        )
        self.criteria: CollapseCriteria | None = None
        try:
            if guard is None:
                self.criteria = CollapseCriteria(
                    monitor,
                    patience,
                    min_value,
                    min_fraction_of_dim,
                    max_relative_drop,
                    baseline,
                    dim,
                    kind,
                    check_finite,
                )
        except MonitorConfigurationError as error:
            raise MisconfigurationException(str(error)) from error
        self.guard = guard
        self._key_guard: KeyGuard | None = None
        self.min_value, self.min_fraction_of_dim, self.max_relative_drop, self.dim, self.kind = (
            min_value,
            min_fraction_of_dim,
            max_relative_drop,
            dim,
            kind,
        )
        self.prefix = monitor.split("/", 1)[0]
        self._trainer: Any = None
        self._from_monitor = False
        self._key_verified = False
        self._warned_unknown = False

    @classmethod
    def for_ssl(
        cls, tap: str, stage: str = "val", prefix: str = "repr", verbose: bool = False, **settings: Any
    ) -> CollapseEarlyStopping:
        """The SSL preset: one callback watching ``tap``'s RankMe, normalised std and their trend.

        The rule is :func:`reprmetrics.stopping.ssl_guard` (floors on rank and spread, and a sustained
        fall from the run's own best); ``settings`` override its defaults. Needs a
        :class:`RepresentationMonitor` computing ``tap`` at ``stage`` with ``rankme`` and
        ``normalized_std`` (in the default set)::

            Trainer(callbacks=[RepresentationMonitor(["backbone", "projector"], num_views=2),
                               CollapseEarlyStopping.for_ssl("projector")])
        """
        try:
            guard = ssl_guard(tap, stage, owner="CollapseEarlyStopping.for_ssl", **settings)
        except MonitorConfigurationError as error:
            raise MisconfigurationException(str(error)) from error
        return cls(f"{prefix}/{stage}/{tap}/rankme", patience=guard.patience, verbose=verbose, guard=guard)

    @property
    def baseline(self) -> float | None:
        """The reference for ``max_relative_drop``: the given one, else the first value seen."""
        return self.criteria.baseline if self.criteria is not None else None

    @property
    def values_seen(self) -> list[float]:
        return self.criteria.values_seen if self.criteria is not None else []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            min_value=self.min_value,
            min_fraction_of_dim=self.min_fraction_of_dim,
            max_relative_drop=self.max_relative_drop,
            **({"guard": repr(self.guard)} if self.guard is not None else {}),
        )

    # ---- where values come from ----------------------------------------------------------------
    def _rule(self) -> Guard | None:
        """The guard applied to monitor results: the given one, or the criteria on the monitored key
        (None for a key that is not a monitor's)."""
        if self.guard is not None:
            return self.guard
        if self._key_guard is None:
            parsed = parse_key(self.monitor, self.prefix, _STAGES)
            if parsed is None:
                return None
            assert self.criteria is not None
            self._key_guard = KeyGuard(*parsed, self.criteria)
        return self._key_guard

    def _unknown(self, message: str) -> None:
        if self.strict:
            raise MonitoredKeyError(message)
        if not self._warned_unknown:
            self._warned_unknown = True
            warn(message + " (strict=False: this stopper never acts)")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = weakref.proxy(trainer)
        channel(trainer, self.prefix).subscribe(self._on_result)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_source(trainer)

    def _check_source(self, trainer: pl.Trainer) -> None:
        """Once every callback is set up: is a monitor producing this key? (Raised here, before training.)"""
        tracker = channel(trainer, self.prefix).tracker
        parsed = parse_key(self.monitor, self.prefix, _STAGES)
        self._from_monitor = tracker is not None and parsed is not None
        if tracker is None:
            if self.guard is not None:
                tap = getattr(self.guard, "tap", "projector")
                raise MisconfigurationException(
                    f"CollapseEarlyStopping.for_ssl({tap!r}): no RepresentationMonitor with prefix {self.prefix!r}"
                    " is among the"
                    f" Trainer's callbacks; add one that taps {tap!r}, e.g."
                    f" Trainer(callbacks=[RepresentationMonitor([{tap!r}]), CollapseEarlyStopping.for_ssl({tap!r})])"
                )
            if self.min_fraction_of_dim is not None and self.dim is None:
                raise MisconfigurationException(
                    f"CollapseEarlyStopping({self.monitor!r}): min_fraction_of_dim needs the embedding width D,"
                    " which a RepresentationMonitor"
                    f" provides, but no RepresentationMonitor with prefix {self.prefix!r} is among the Trainer's"
                    " callbacks. Add one that taps the"
                    " key's tap (e.g. RepresentationMonitor(['projector'])), or, if another callback logs this key,"
                    " pass dim=D"
                )
            return  # another callback or the module logs this key: Lightning's own check applies
        if parsed is None:
            raise MisconfigurationException(
                f"CollapseEarlyStopping: {self.monitor!r} is not a monitor key; they read"
                f" {self.prefix}/{{train|val}}/{{tap}}/{{metric}},"
                f" e.g. {self.prefix}/val/{tracker.taps[0].name}/rankme"
            )
        stage, tap, _ = parsed
        taps = [t.name for t in tracker.taps]
        if tap not in taps:
            close = difflib.get_close_matches(tap, taps, n=3, cutoff=0.5)
            self._unknown(
                f"CollapseEarlyStopping: the RepresentationMonitor has no tap {tap!r} (in {self.monitor!r}); its"
                " taps are"
                f" {', '.join(repr(t) for t in taps)}"
                + (f"; did you mean {self.prefix}/{stage}/{close[0]}/{parsed[2]}?" if close else "")
            )
        if stage == "train" and tracker.every_n_train_steps == 0:
            raise MisconfigurationException(
                f"CollapseEarlyStopping({self.monitor!r}): the RepresentationMonitor computes no train-stage values"
                " (every_n_train_steps=0); monitor a val-stage key or set every_n_train_steps"
            )

    def _verify_metric_name(self, result: TrackerResult, tap: str) -> None:
        """At the first result of the key's stage: the metrics the rule reads must be ones the monitor reports."""
        if self._key_verified or tap not in result.names:
            return
        self._key_verified = True
        rule = self._rule()
        missing = [m for m in rule.metrics if m not in result.names[tap]] if rule is not None else []
        if not missing:
            return
        existing = [f"{self.prefix}/{result.stage}/{t}/{m}" for t, ms in result.names.items() for m in ms]
        close = difflib.get_close_matches(self.monitor, existing, n=3, cutoff=0.5)
        self._unknown(
            f"Early stopping conditioned on metric `{self.prefix}/{result.stage}/{tap}/{missing[0]}` which is not"
            " available: the"
            f" RepresentationMonitor does not compute {missing[0]!r} for tap {tap!r}. Pass in or modify your"
            " `CollapseEarlyStopping`"
            f" callback to use any of the following: {', '.join(f'`{k}`' for k in existing)}"
            + (f" (closest: {', '.join(f'`{k}`' for k in close)})" if close else "")
        )

    # ---- deciding --------------------------------------------------------------------------------
    def _on_result(self, result: TrackerResult) -> None:
        """A monitor computation (every rank, the same result, at the same moment)."""
        trainer = self._trainer
        rule = self._rule()
        if trainer is None or rule is None or result.stage != rule.stage or self._should_skip_check(trainer):
            return
        self._from_monitor = True
        self._verify_metric_name(result, rule.tap)
        decision = rule.check(result)
        if decision is not None:
            self._apply(trainer, decision)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._from_monitor or self._should_skip_check(trainer):
            return
        self._run_early_stopping_check(trainer)  # a key logged by something else: Lightning's own path

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return  # checks happen when values are computed

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        assert self.criteria is not None
        value = float(logs[self.monitor].squeeze())
        stop, reason = self.criteria.check(value, self.dim)
        self._apply(
            trainer,
            Decision(stop, self.criteria.last_kind if stop else "", reason, self.monitor, value, self.criteria.best),
        )

    def _apply(self, trainer: Any, decision: Decision) -> None:
        if decision.best is not None and math.isfinite(decision.best):
            self.best_score = torch.tensor(decision.best)
        rule = self._rule()
        self.wait_count = rule.wait_count if rule is not None else self.criteria.wait_count  # type: ignore[union-attr]
        should_stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = (
                EarlyStoppingReason.NON_FINITE_METRIC
                if decision.kind == "divergence"
                else EarlyStoppingReason.PATIENCE_EXHAUSTED
            )
            self.stopping_reason_message = decision.reason
            self._announce(trainer, decision.reason)
        elif decision.reason and self.verbose:
            self._log_info(trainer, decision.reason, self.log_rank_zero_only)

    def _announce(self, trainer: Any, reason: str) -> None:
        self._log_info(trainer, reason, log_rank_zero_only=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("collapse_early_stopping", reason, trainer.global_step)

    @override
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        assert self.criteria is not None
        return self.criteria.check(float(current), self.dim)

    # ---- persistence -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        rule = self._rule()
        state.update(
            guard=rule.state_dict() if rule is not None else self.criteria.state_dict(), key_verified=self._key_verified
        )  # type: ignore[union-attr]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("guard", state_dict.get("criteria"))
        rule = self._rule()
        if saved:
            (rule if rule is not None else self.criteria).load_state_dict(saved)  # type: ignore[union-attr]
        self._key_verified = state_dict.get("key_verified", False)
