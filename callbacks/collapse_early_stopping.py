"""CollapseEarlyStopping: stop a Lightning run (or a fine-tune) whose representation collapses."""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reprmetrics.callbacks.representation_monitor import STYLE, as_misconfiguration
from typing_extensions import override

from reprmetrics.monitor import MonitorConfigurationError, warn
from reprmetrics.results import TrackerResult, channel
from reprmetrics.stopping import CollapseCriteria, Decision, Guard, KeyGuard, StopRules, collapse_kind, ssl_guard

__all__ = ["CollapseEarlyStopping", "MonitoredKeyError", "collapse_kind"]


class MonitoredKeyError(MisconfigurationException, RuntimeError):
    """The monitored key is never produced (a ``RuntimeError`` like Lightning's ``EarlyStopping`` raises)."""


class CollapseEarlyStopping(EarlyStopping):
    r"""Stop training when a representation metric shows collapse for ``patience`` consecutive checks.

    A check *shows collapse* when the monitored value (higher is healthier: RankMe, LiDAR, LID,
    normalised std, ...) is below ``min_value``, below ``min_fraction_of_dim`` × D (D: the tap's width),
    or more than ``max_relative_drop`` below ``baseline`` (default: the first value seen). For
    self-supervised training use the preset :meth:`for_ssl`, which also sees a collapse *in progress*.
    At ``patience`` consecutive collapsing checks (at once for a non-finite value) the trainer stops on
    every rank, and ``stopping_reason_message`` names the kind of collapse with the values seen; it is
    logged and, with TensorBoard, added as text.

    A ``repr/...`` key of a :class:`RepresentationMonitor` (found by its prefix, in any order among the
    callbacks) is checked each time the monitor computes it; any other logged key is read from
    Lightning's metrics at the end of validation. See the guide: ``docs/guide/stopping.md``.

    Args:
        monitor: the logged key, e.g. ``"repr/val/projector/rankme"``.
        patience: consecutive collapsing checks before stopping.
        min_value: an absolute floor.
        min_fraction_of_dim: a floor as a fraction of the embedding width D.
        max_relative_drop: the largest allowed fall below the baseline, as a fraction.
        baseline: the reference for ``max_relative_drop`` (default: the first value seen).
        dim: the width D for ``min_fraction_of_dim`` (default: the monitor's).
        kind: override the collapse kind named in the reason.
        check_finite: stop at once on a NaN/inf value ("Divergence: ...").
        strict: raise if the key is never produced, listing the keys that exist; ``False`` warns.
        verbose: log each check's outcome.
        guard: the rule itself (:func:`reprmetrics.stopping.ssl_guard` or a ``KeyGuard``) instead of
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
        # Lightning's own check runs at validation end, only for keys that are not a monitor's.
        super().__init__(
            monitor,
            patience=patience,
            mode="max",
            strict=strict,
            check_finite=check_finite,
            verbose=verbose,
            check_on_train_epoch_end=False,
        )
        self.min_value, self.min_fraction_of_dim, self.max_relative_drop = (
            min_value,
            min_fraction_of_dim,
            max_relative_drop,
        )
        self.dim, self.kind, self.guard, self.prefix = dim, kind, guard, monitor.split("/", 1)[0]
        self.criteria: CollapseCriteria | None = None
        with as_misconfiguration():
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
        parsed = STYLE.parse(monitor, self.prefix)
        rule = guard if guard is not None else KeyGuard(*parsed, self.criteria) if parsed is not None else None
        self.rules = (
            None
            if rule is None
            else StopRules([(monitor, rule)], STYLE, self.prefix, "CollapseEarlyStopping", "monitor", self._unknown)
        )
        self._trainer: Any = None
        self._from_monitor = self._warned_unknown = False

    @classmethod
    def for_ssl(
        cls, tap: str, stage: str = "val", prefix: str = "repr", verbose: bool = False, **settings: Any
    ) -> CollapseEarlyStopping:
        """The SSL preset: one callback watching ``tap``'s RankMe, normalised std and their trend.

        The rule is :func:`reprmetrics.stopping.ssl_guard`; ``settings`` override its defaults. Needs a
        :class:`RepresentationMonitor` computing ``tap`` at ``stage`` (``rankme`` and ``normalized_std``
        are in the default set)::

            Trainer(callbacks=[RepresentationMonitor(["backbone", "projector"], num_views=2),
                               CollapseEarlyStopping.for_ssl("projector")])
        """
        with as_misconfiguration():
            guard = ssl_guard(tap, stage, owner="CollapseEarlyStopping.for_ssl", **settings)
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
        guard = {"guard": repr(self.guard)} if self.guard is not None else {}
        return self._generate_state_key(
            monitor=self.monitor,
            min_value=self.min_value,
            min_fraction_of_dim=self.min_fraction_of_dim,
            max_relative_drop=self.max_relative_drop,
            **guard,
        )

    def _unknown(self, message: str) -> None:
        if self.strict:
            raise MonitoredKeyError(message)
        if not self._warned_unknown:
            self._warned_unknown = True
            warn(message + " (strict=False: this stopper never acts)")

    # ---- where values come from ----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = weakref.proxy(trainer)
        channel(trainer, self.prefix).subscribe(self._on_result)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every callback is set up: a monitor producing this key must exist (raised here, before training)."""
        tracker = channel(trainer, self.prefix).tracker
        self._from_monitor = tracker is not None and self.rules is not None
        with as_misconfiguration():
            if tracker is not None and self.rules is None:
                raise MonitorConfigurationError(
                    StopRules.not_a_key(
                        self.monitor, STYLE, self.prefix, "CollapseEarlyStopping", tracker.taps[0].name, "monitor"
                    )
                )
            if self.rules is not None and (tracker is not None or self.guard is not None):
                self.rules.check_source(tracker, f"CollapseEarlyStopping.for_ssl({getattr(self.guard, 'tap', '')!r})")
            elif tracker is None and self.min_fraction_of_dim is not None and self.dim is None:
                raise MonitorConfigurationError(
                    f"CollapseEarlyStopping({self.monitor!r}): min_fraction_of_dim needs the embedding width D, which"
                    f" a RepresentationMonitor provides, but no RepresentationMonitor with prefix {self.prefix!r} is"
                    " among the Trainer's callbacks. Add one that taps the key's tap (e.g."
                    " RepresentationMonitor(['projector'])), or, if another callback logs this key, pass dim=D"
                )

    # ---- deciding --------------------------------------------------------------------------------
    def _on_result(self, result: TrackerResult) -> None:
        """A monitor computation (every rank, the same result, at the same moment)."""
        if self._trainer is None or self.rules is None or self._should_skip_check(self._trainer):
            return
        self._from_monitor = True  # a monitor key: checked here, never through Lightning's metrics
        decision = self.rules.check(result)
        if decision is not None:
            self._apply(self._trainer, decision)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._from_monitor and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)  # a key logged by something else: Lightning's own path

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return  # checks happen when values are computed

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        value = float(logs[self.monitor].squeeze())
        stop, reason = self.criteria.check(value, self.dim)
        self._apply(
            trainer,
            Decision(stop, self.criteria.last_kind if stop else "", reason, self.monitor, value, self.criteria.best),
        )

    def _apply(self, trainer: Any, decision: Decision) -> None:
        if decision.best is not None and math.isfinite(decision.best):
            self.best_score = torch.tensor(decision.best)
        self.wait_count = self.rules.wait_count if self.rules is not None else self.criteria.wait_count
        should_stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            divergence = decision.kind == "divergence"
            self.stopping_reason = (
                EarlyStoppingReason.NON_FINITE_METRIC if divergence else EarlyStoppingReason.PATIENCE_EXHAUSTED
            )
            self.stopping_reason_message = decision.reason
            self._log_info(trainer, decision.reason, log_rank_zero_only=True)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_text("collapse_early_stopping", decision.reason, trainer.global_step)
        elif decision.reason and self.verbose:
            self._log_info(trainer, decision.reason, self.log_rank_zero_only)

    # ---- persistence -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        rules = self.rules.state_dict() if self.rules is not None else {"guards": [self.criteria.state_dict()]}
        return {**super().state_dict(), "rules": rules}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        old = state_dict.get("guard") or state_dict.get("criteria")  # saved by earlier versions
        saved = state_dict.get("rules") or {"guards": [old] if old else []}
        if self.rules is not None and saved["guards"]:
            self.rules.load_state_dict(saved)
        elif saved["guards"]:
            self.criteria.load_state_dict(saved["guards"][0])
