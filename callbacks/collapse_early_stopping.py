"""CollapseEarlyStopping: stop a run (or a fine-tune) whose representation collapses."""

from __future__ import annotations

import difflib
import logging
import math
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
from reprmetrics.stopping import CollapseCriteria, SSLGuard, collapse_kind, ssl_guard

__all__ = ["CollapseEarlyStopping", "MonitoredKeyError", "collapse_kind"]

log = logging.getLogger(__name__)
_STAGES = ("train", "val")


class MonitoredKeyError(MisconfigurationException, RuntimeError):
    """The monitored key is never produced (a ``RuntimeError`` like Lightning's ``EarlyStopping`` raises)."""


class CollapseEarlyStopping(EarlyStopping):
    r"""Stop training when a representation metric shows collapse for ``patience`` consecutive checks.

    A check *shows collapse* when the monitored value (one where higher is healthier: RankMe, LiDAR,
    local intrinsic dimension, normalised std, ...) is

    - below ``min_value`` (an absolute floor), or
    - below ``min_fraction_of_dim`` × D (rank metrics; D is the tap's embedding width, read from the
      :class:`RepresentationMonitor` or given as ``dim``), or
    - more than ``max_relative_drop`` below the baseline: ``baseline`` when given (the fine-tuning
      case: the pretrained encoder's value), else the first value seen.

    Any collapsing check increments a counter, a healthy one resets it; at ``patience`` the trainer
    stops on every rank (Lightning's ``reduce_boolean_decision``), and ``stopping_reason_message``
    names the kind of collapse (complete, dimensional, local) with the values seen: *complete* when
    the tap's normalised std (if monitored) is below a quarter of its healthy 1/√D or a rank metric is
    about 1, *local* for local intrinsic dimension, *dimensional* for other rank/dimension metrics. The message is
    logged, printed by Lightning's logger and, with TensorBoard, added as text.

    A check happens each time the monitored value is produced: for ``repr/train/...`` keys every
    time the monitor computes (every ``every_n_train_steps``), for ``repr/val/...`` keys and any other
    logged key at the end of validation. Put a ``ModelCheckpoint`` on the same metric
    (``mode="max"``) to keep the best checkpoint from before the collapse.

    Args:
        monitor: the logged key, e.g. ``"repr/val/projector/rankme"``.
        patience: consecutive collapsing checks before stopping.
        min_value, min_fraction_of_dim, max_relative_drop: the criteria (at least one).
        baseline: reference value for ``max_relative_drop`` (default: the first value seen).
        dim: embedding width for ``min_fraction_of_dim`` (default: from the RepresentationMonitor).
        kind: override the collapse kind named in the reason.
        check_finite: stop at once on a NaN/inf value. The monitor logs NaN when a tap's embeddings
            are non-finite (a diverged run), and the reason then says so: "Divergence: tap projector
            produced non-finite embeddings (37 % of 512 samples) ...".
        strict: raise if the monitored key is never produced: a stage or tap the monitor does not
            have at setup, a metric name once the monitor has computed that stage (listing the keys
            that exist, like Lightning's ``EarlyStopping``). With ``strict=False`` a warning says so.
        verbose: log each check's outcome.
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
        guard: SSLGuard | None = None,
    ) -> None:
        super().__init__(monitor=monitor, patience=patience, mode="max", strict=strict, check_finite=check_finite, verbose=verbose, check_on_train_epoch_end=False)
        self.guard = guard
        try:
            self.criteria = CollapseCriteria(
                monitor, patience, min_value, min_fraction_of_dim, max_relative_drop, baseline, dim, kind, check_finite
            ) if guard is None else None
        except MonitorConfigurationError as error:
            raise MisconfigurationException(str(error)) from error
        self.min_value = min_value
        self.min_fraction_of_dim = min_fraction_of_dim
        self.max_relative_drop = max_relative_drop
        self.dim = dim
        self.kind = kind
        self._history_seen = 0
        self._key_verified = False
        self._warned_unknown = False

    @classmethod
    def for_ssl(cls, tap: str, stage: str = "val", prefix: str = "repr", verbose: bool = False, **settings: Any) -> CollapseEarlyStopping:
        """The SSL preset: one callback watching ``tap``'s RankMe, normalised std and their trend.

        The rule is :func:`reprmetrics.stopping.ssl_guard` (floors on rank and spread, and a sustained
        fall from the run's own best); ``settings`` override its defaults. Needs a
        :class:`RepresentationMonitor` computing ``tap`` at ``stage`` with the default metrics (or at
        least ``rankme`` and ``normalized_std``)::

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
            monitor=self.monitor, min_value=self.min_value, min_fraction_of_dim=self.min_fraction_of_dim, max_relative_drop=self.max_relative_drop,
            **({"guard": repr(self.guard)} if self.guard is not None else {}),
        )

    # ---- where values come from --------------------------------------------------------------
    def _source(self, trainer: pl.Trainer) -> tuple[Any, str] | None:
        """The RepresentationMonitor that produces ``monitor`` and the key in its history."""
        from reprmetrics.callbacks.representation_monitor import RepresentationMonitor

        for callback in trainer.callbacks:
            if isinstance(callback, RepresentationMonitor) and self.monitor.startswith(callback.prefix + "/"):
                return callback, self.monitor[len(callback.prefix) + 1 :]
        return None

    def _parts(self, trainer: pl.Trainer) -> tuple[Any, str, str, str] | None:
        """``(monitor callback, stage, tap, metric)`` when a RepresentationMonitor's prefix matches."""
        source = self._source(trainer)
        if source is None:
            return None
        callback, key = source
        stage, _, rest = key.partition("/")
        tap, _, metric = rest.rpartition("/")
        return callback, stage, tap, metric

    def _unknown(self, message: str) -> None:
        if self.strict:
            raise MonitoredKeyError(message)
        if not self._warned_unknown:
            self._warned_unknown = True
            warn(message + " (strict=False: this stopper never acts)")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        parts = self._parts(trainer)
        if parts is None:
            prefix = self.monitor.split("/", 1)[0]
            if self.guard is not None:
                raise MisconfigurationException(
                    f"CollapseEarlyStopping.for_ssl({self.guard.tap!r}): no RepresentationMonitor with prefix {prefix!r} is among the"
                    f" Trainer's callbacks; add one that taps {self.guard.tap!r}, e.g."
                    f" Trainer(callbacks=[RepresentationMonitor([{self.guard.tap!r}]), CollapseEarlyStopping.for_ssl({self.guard.tap!r})])"
                )
            if self.min_fraction_of_dim is not None and self.dim is None:
                raise MisconfigurationException(
                    f"CollapseEarlyStopping({self.monitor!r}): min_fraction_of_dim needs the embedding width D, which a RepresentationMonitor"
                    f" provides, but no RepresentationMonitor with prefix {prefix!r} is among the Trainer's callbacks. Add one that taps the"
                    " key's tap (e.g. RepresentationMonitor(['projector'])), or, if another callback logs this key, pass dim=D"
                )
            return  # another callback or the module logs it: Lightning's own check applies
        callback, key_stage, tap, metric = parts
        prefix = callback.prefix
        taps = [t.name for t in callback.tracker.taps]
        if key_stage not in _STAGES or not tap or not metric:
            raise MisconfigurationException(
                f"CollapseEarlyStopping: {self.monitor!r} is not a monitor key; they read {prefix}/{{train|val}}/{{tap}}/{{metric}},"
                f" e.g. {prefix}/val/{taps[0]}/rankme"
            )
        if tap not in taps:
            close = difflib.get_close_matches(tap, taps, n=3, cutoff=0.5)
            self._unknown(
                f"CollapseEarlyStopping: the RepresentationMonitor has no tap {tap!r} (in {self.monitor!r}); its taps are"
                f" {', '.join(repr(t) for t in taps)}" + (f"; did you mean {prefix}/{key_stage}/{close[0]}/{metric}?" if close else "")
            )
        if key_stage == "train" and callback.tracker.every_n_train_steps == 0:
            raise MisconfigurationException(
                f"CollapseEarlyStopping({self.monitor!r}): the RepresentationMonitor computes no train-stage values"
                " (every_n_train_steps=0); monitor a val-stage key or set every_n_train_steps"
            )

    def _verify_metric_name(self, callback: Any, stage: str, tap: str, metric: str) -> None:
        """Once the monitor has computed ``stage`` for ``tap``, the metric name must be one it reports."""
        if self._key_verified:
            return
        names = callback.tracker.metric_names(stage)
        if tap not in names:
            return  # this tap has produced nothing yet: the monitor warns about that
        self._key_verified = True
        wanted = [metric] if self.guard is None else list(self.guard.metrics)
        missing = [m for m in wanted if m not in names[tap]]
        if not missing:
            return
        metric = missing[0]
        prefix = callback.prefix
        existing = [f"{prefix}/{stage}/{t}/{m}" for t, ms in names.items() for m in ms]
        close = difflib.get_close_matches(self.monitor, existing, n=3, cutoff=0.5)
        self._unknown(
            f"Early stopping conditioned on metric `{self.monitor.rsplit('/', 1)[0]}/{metric}` which is not available: the RepresentationMonitor does not"
            f" compute {metric!r} for tap {tap!r}. Pass in or modify your `CollapseEarlyStopping` callback to use any of the"
            f" following: {', '.join(f'`{k}`' for k in existing)}" + (f" (closest: {', '.join(f'`{k}`' for k in close)})" if close else "")
        )

    def _embedding_dim(self, trainer: pl.Trainer) -> int | None:
        if self.dim is not None:
            return self.dim
        source = self._source(trainer)
        if source is None:
            return None
        _, key = source
        tap = key.split("/", 1)[1].rsplit("/", 1)[0]
        return source[0].tracker.num_features.get(tap)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._should_skip_check(trainer):
            return
        source = self._source(trainer)
        if source is not None and source[1].startswith("train/"):
            self._check_new_values(trainer, source)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_check(trainer):
            return
        source = self._source(trainer)
        if source is None:
            self._run_early_stopping_check(trainer)  # any logged key: Lightning's own path
        elif not source[1].startswith("train/"):
            self._check_new_values(trainer, source)

    def _check_new_values(self, trainer: pl.Trainer, source: tuple[Any, str]) -> None:
        monitor_cb, key = source
        stage, _, rest = key.partition("/")
        tap, _, metric = rest.rpartition("/")
        self._verify_metric_name(monitor_cb, stage, tap, metric)
        history = monitor_cb.tracker.history.get(key, [])
        if len(history) <= self._history_seen:
            return
        self._history_seen = len(history)
        self._report_for_check = monitor_cb.tracker.reports.get((stage, tap))
        if self.guard is not None:
            self._decide_by_guard(trainer, monitor_cb.tracker, stage, tap)
            return
        self._decide(trainer, torch.tensor(history[-1][1]))

    def _decide_by_guard(self, trainer: pl.Trainer, tracker: Any, stage: str, tap: str) -> None:
        assert self.guard is not None
        values = {}
        for key in self.guard.keys():
            history = tracker.history.get(f"{stage}/{key}")
            if history:
                values[key] = history[-1][1]
        decision = self.guard.check_values(values, tracker.num_features)
        if "rankme" in self.guard.best:
            self.best_score = torch.tensor(self.guard.best["rankme"])
        self.wait_count = max(self.guard.floor_count, self.guard.trend_count)
        should_stop = trainer.strategy.reduce_boolean_decision(decision.stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC if decision.kind == "divergence" else EarlyStoppingReason.PATIENCE_EXHAUSTED
            self.stopping_reason_message = decision.reason
            self._announce(trainer, decision.reason)
        elif self.verbose:
            self._log_info(trainer, decision.reason, self.log_rank_zero_only)

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        self._decide(trainer, logs[self.monitor].squeeze())

    def _companion_std(self, trainer: pl.Trainer) -> float | None:
        """The latest normalised std of the same tap and stage, if the monitor computes it."""
        source = self._source(trainer)
        if source is None:
            return None
        monitor_cb, key = source
        history = monitor_cb.tracker.history.get(key.rsplit("/", 1)[0] + "/normalized_std")
        return history[-1][1] if history else None

    def _decide(self, trainer: pl.Trainer, current: Tensor) -> None:
        self._dim_for_check = self._embedding_dim(trainer)
        self._std_for_check = self._companion_std(trainer)
        should_stop, reason = self._evaluate_stopping_criteria(current)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            self._announce(trainer, reason)
        elif reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _announce(self, trainer: pl.Trainer, reason: str | None) -> None:
        if not reason:
            return
        self._log_info(trainer, reason, log_rank_zero_only=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("collapse_early_stopping", reason, trainer.global_step)

    # ---- the criteria ------------------------------------------------------------------------
    @override
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        dim = getattr(self, "_dim_for_check", None) or self.dim
        should_stop, reason = self.criteria.check(
            float(current), dim, getattr(self, "_std_for_check", None), getattr(self, "_report_for_check", None)
        )
        self.wait_count = self.criteria.wait_count
        if math.isfinite(self.criteria.best):
            self.best_score = torch.tensor(self.criteria.best)
        if should_stop:
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC if self.criteria.diverged else EarlyStoppingReason.PATIENCE_EXHAUSTED
        return should_stop, reason

    # ---- persistence ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            criteria=self.criteria.state_dict() if self.criteria is not None else {},
            guard=self.guard.state_dict() if self.guard is not None else {},
            history_seen=self._history_seen,
            key_verified=self._key_verified,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.criteria is not None:
            self.criteria.load_state_dict(state_dict.get("criteria", {}))
        if self.guard is not None:
            self.guard.load_state_dict(state_dict.get("guard", {}))
        self._history_seen = state_dict.get("history_seen", 0)
        self._key_verified = state_dict.get("key_verified", False)
