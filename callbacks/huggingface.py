"""The Hugging Face ``Trainer`` adapters: :class:`RepresentationCallback` watches,
:class:`CollapseEarlyStoppingCallback` stops.

Needs ``transformers`` (``pip install "reprmetrics[huggingface]"``), never Lightning. Capture, schedule
and metrics are :class:`reprmetrics.monitor.RepresentationTracker`'s, decisions are
:class:`reprmetrics.stopping.StopRules`'; this file translates the Trainer's events into tracker calls,
and results and decisions into the Trainer's logs and controls. The two callbacks meet through
:func:`reprmetrics.results.channel`, keyed by the ``model`` every Trainer event carries and the prefix.
The guide: ``docs/guide/huggingface.md``.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ModuleNotFoundError as error:  # exercised in a subprocess test
    raise ModuleNotFoundError(
        'reprmetrics.callbacks.huggingface needs transformers: pip install "reprmetrics[huggingface]" (importing'
        f" transformers failed: {error})",
        name=error.name,
    ) from error
import torch
from reprmetrics.callbacks._figures import TrainerBackends, drawable
from torch import nn
from torchmetrics import Metric

from reprmetrics.monitor import (
    DEFAULT_MIN_SAMPLES,
    MONITOR_MAX_SAMPLES,
    MonitorConfigurationError,
    RepresentationTracker,
    Tap,
    first_token,
    warn,
)
from reprmetrics.results import TrackerResult, channel
from reprmetrics.stopping import CRITERIA, KeyStyle, SSLGuard, StopRules, reject_unused_criteria

__all__ = ["CollapseEarlyStoppingCallback", "RepresentationCallback", "first_token"]

logger = logging.getLogger(__name__)
#: How the Trainer's keys read: ``{prefix}/{train|eval}/{tap}/{metric}``, logged as ``eval_{prefix}/...``.
STYLE = KeyStyle(
    "RepresentationCallback",
    {"train": "train", "eval": "val"},
    {"train": "{prefix}/{tap}/{metric}", "val": "eval_{prefix}/{tap}/{metric}"},
    {"eval_{prefix}/": "{prefix}/eval/"},
)
TRACKER_SETTINGS = set(inspect.signature(RepresentationTracker).parameters) - {"owner"}


def _eval_prefix(logs: Mapping[str, Any]) -> str | None:
    """The ``metric_key_prefix`` of an evaluation log (``Trainer.evaluate`` always adds ``{prefix}_runtime``
    and ``{prefix}_samples_per_second``), else ``None``."""
    for key in logs:
        prefix = key[: -len("_runtime")]
        if key.endswith("_runtime") and key != "train_runtime" and f"{prefix}_samples_per_second" in logs:
            return prefix
    return None


def _entry(state: TrainerState, values: Mapping[str, Any]) -> dict[str, Any]:
    """A ``state.log_history`` entry of our own, shaped like the Trainer's."""
    return {**values, **({"epoch": state.epoch} if state.epoch is not None else {}), "step": state.global_step}


def _plain(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


class _Resumable(ExportableState):
    """transformers' ``ExportableState``: :meth:`state` goes into each checkpoint's ``trainer_state.json``.

    On ``trainer.train(resume_from_checkpoint=...)`` the callback reads its own entry back when training
    begins. With ``restore_callback_states_from_checkpoint=True`` the Trainer instead rebuilds the
    callback with :meth:`from_state`, which needs arguments JSON can hold.
    """

    _arguments: dict[str, Any]
    owner: str

    def state(self) -> dict[str, Any]:
        args = {k: v for k, v in self._arguments.items() if _plain(v)}
        return {"args": args, "attributes": {"resume_state": {"identity": self._identity(), **self._save()}}}

    def _check_rebuild(self, args: TrainingArguments) -> None:
        unsaved = sorted(k for k, v in self._arguments.items() if not _plain(v))
        if getattr(args, "restore_callback_states_from_checkpoint", False) and unsaved:
            raise MonitorConfigurationError(
                f"{self.owner}: restore_callback_states_from_checkpoint=True rebuilds callbacks from the JSON the"
                f" checkpoint holds, and its {', '.join(unsaved)} cannot be held in JSON. Leave the option False:"
                f" {self.owner} restores its own state when training resumes from a checkpoint"
            )

    def _resume(self, state: TrainerState) -> None:
        """When training begins: load what the checkpoint saved for this callback (nothing on a fresh run)."""
        saved = self.__dict__.pop("resume_state", None)  # set by from_state
        if saved is None and state.global_step > 0:
            entries = state.stateful_callbacks.get(type(self).__name__, [])
            mine = [
                e["attributes"]["resume_state"]
                for e in (entries if isinstance(entries, list) else [entries])
                if e.get("attributes", {}).get("resume_state", {}).get("identity") == self._identity()
            ]
            if not mine:
                warn(
                    f"{self.owner}: training resumes at step {state.global_step}, but the checkpoint holds no state"
                    f" for it ({self._identity()}); it starts afresh"
                )
                return
            saved = mine[-1]  # transformers appends an entry per save when a class is there twice
        if saved is not None:
            self._load(saved)


class CollapseEarlyStoppingCallback(TrainerCallback, _Resumable):
    r"""Stop a Hugging Face ``Trainer`` run whose representation collapses or drifts.

    Acts on the results of the :class:`RepresentationCallback` with the same ``prefix``, in any order
    among the callbacks (without one it raises before the first step). ``stop_on`` takes
    ``ssl_guard(tap)``, keys ``"repr/eval/{tap}/{metric}"`` (or the logged ``"eval_repr/..."``) and
    ``"repr/train/{tap}/{metric}"`` with the criteria of :class:`~reprmetrics.stopping.CollapseCriteria`,
    a list of them, or ``{key: {criterion: value}}``. A stop sets ``control.should_training_stop`` on
    every rank, logs the reason with ``logger.warning``, keeps it in :attr:`stopping_reason` and logs it
    as ``{eval_prefix}_{prefix}/stop_reason`` or ``{prefix}/stop_reason``. Only training is checked; a
    resumed run keeps the guards' state. The guide: ``docs/guide/huggingface.md#stopping``.
    ``patience``, ``min_value``, ``min_fraction_of_dim``, ``max_relative_drop``, ``baseline``, ``dim``,
    ``kind`` and ``check_finite`` are the criteria of keys without their own
    (:class:`~reprmetrics.stopping.CollapseCriteria`).

    Args:
        stop_on: the rules (see above).
        prefix: the prefix of the :class:`RepresentationCallback` whose results it reads.
        owner: the class name messages give (``RepresentationCallback`` passes its own).
        taps: the monitor's taps and ``every_n_train_steps``, when known, to check the rules at once.
    """

    def __init__(
        self,
        stop_on: str | SSLGuard | Iterable[str | SSLGuard] | Mapping[str, Mapping[str, Any]],
        prefix: str = "repr",
        patience: int = 3,
        min_value: float | None = None,
        min_fraction_of_dim: float | None = None,
        max_relative_drop: float | None = None,
        baseline: float | None = None,
        dim: int | None = None,
        kind: str | None = None,
        check_finite: bool = True,
        owner: str = "CollapseEarlyStoppingCallback",
        taps: tuple[list[str], int] | None = None,
    ) -> None:
        self._arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.owner, self.prefix = owner, prefix
        criteria = {k: v for k, v in self._arguments.items() if k in CRITERIA}
        self.rules = StopRules.parse(stop_on, STYLE, prefix, owner, **criteria)
        if taps is not None:
            self.rules.check_monitor(*taps)
        self.stopping_reason: str | None = None
        self.stopped_step: int | None = None
        self._control: TrainerControl | None = None  # held while training: a decision arrives in another event
        self._pending: tuple[str, str] | None = None  # (stage, reason) not yet logged
        self._model: nn.Module | None = None
        self._source_checked = False
        self.backends = TrainerBackends()

    def check_taps(self, taps: Sequence[str], every_n_train_steps: int) -> None:
        """Raise for rules naming a tap the monitor lacks, or training-stage rules without training-stage values."""
        self.rules.check_monitor(taps, every_n_train_steps)

    def _identity(self) -> str:
        return self.rules.identity

    def _attach(self, args: TrainingArguments, model: nn.Module | None) -> None:
        if model is not None:
            channel(model, self.prefix).subscribe(self._on_result)
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            for written, rule in self.rules:
                if rule.stage == "val":
                    guard = isinstance(rule, SSLGuard)
                    fix = "use ssl_guard(tap, stage='train')" if guard else "stop on a training-stage key"
                    raise MonitorConfigurationError(
                        f"{self.owner}: stop_on={written if guard else rule.criteria.monitor!r} is checked at"
                        f" evaluations, but eval_strategy='no': set eval_strategy ('epoch' or 'steps') and an"
                        f" eval_dataset, or {fix}"
                    )

    def _begin(self, control: TrainerControl) -> None:
        self._control, self._pending = control, None
        self.backends.start()

    def _flush(self, args, state, metrics: dict[str, Any] | None = None, final: bool = False) -> None:
        """Log a stop reason: a training-stage one at the next event, an evaluation's with its metrics."""
        if self._pending is None or (self._pending[0] == "val" and metrics is None and not final):
            return
        stage, reason = self._pending
        self._pending, self.stopped_step = None, state.global_step
        evaluation = f"{_eval_prefix(metrics or {}) or 'eval'}_" if stage == "val" else ""
        key = f"{evaluation}{self.prefix}/stop_reason"
        if metrics is not None:
            metrics[key] = reason  # the dict evaluate() returns
        state.log_history.append(_entry(state, {key: reason}))
        self.backends.text(args, state, key, reason)

    # ---- the Trainer's events (a RepresentationCallback calls these for the stopper it builds) ----------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_rebuild(args)
        self._attach(args, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(args, model)
        self._resume(state)
        self._begin(control)
        self._source_checked, self._model = False, model

    def on_step_begin(self, args, state, control, **kwargs):
        self._control = control
        if not self._source_checked:  # every callback's on_train_begin has run: a monitor has published by now
            self._source_checked = True
            tracker = channel(self._model, self.prefix).tracker if self._model is not None else None
            self.rules.check_source(tracker, f"{self.owner}(...)")

    def on_step_end(self, args, state, control, **kwargs):
        self._flush(args, state)

    on_substep_end = on_epoch_end = on_step_end

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._flush(args, state, metrics if metrics is not None else {})

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(args, state, final=True)
        self._control = None
        self.backends.close()

    def _on_result(self, result: TrackerResult) -> None:
        """A monitor computation (every rank, the same result). Acts only while training."""
        if self._control is None:
            return
        decision = self.rules.check(result)
        if decision is not None and decision.stop and not self._control.should_training_stop:
            self._control.should_training_stop = True
            self.stopping_reason, self._pending = decision.reason, (result.stage, decision.reason)
            logger.warning(decision.reason)

    def _save(self) -> dict[str, Any]:
        return {
            "rules": self.rules.state_dict(),
            "stopping_reason": self.stopping_reason,
            "stopped_step": self.stopped_step,
        }

    def _load(self, saved: Mapping[str, Any]) -> None:
        # "guards": the layout of earlier versions.
        self.rules.load_state_dict(saved.get("rules") or {"guards": saved["guards"]})
        self.stopping_reason, self.stopped_step = saved["stopping_reason"], saved["stopped_step"]


class RepresentationCallback(TrainerCallback, _Resumable):
    r"""Watch the representations a model learns in a Hugging Face ``Trainer``; optionally stop on collapse or drift.

    :class:`~reprmetrics.callbacks.RepresentationMonitor` for ``transformers.Trainer`` and the trainers
    built on it. Taps are submodule paths or keys of the model's dict-like output. Evaluation values
    ``{eval_prefix}_{prefix}/{tap}/{metric}`` stream over each evaluation and join its logs (so
    ``metric_for_best_model`` can read them); training values ``{prefix}/{tap}/{metric}`` come every
    ``every_n_train_steps`` micro-batches. Both go to ``state.log_history`` and the TensorBoard, W&B and
    MLflow ``report_to`` backends, with figures at evaluations. ``stop_on`` builds a
    :class:`CollapseEarlyStoppingCallback` inside this one; checkpoints hold the state, so a resumed run
    computes and stops as the uninterrupted one. The guide: ``docs/guide/huggingface.md``::

        callback = RepresentationCallback(
            ["bert.pooler", Tap("bert.encoder.layer.1", reduce=first_token)],  # [CLS] of layer 1
            reference="initial", stop_on="repr/eval/bert.pooler/cka_to_reference", min_value=0.7, patience=2,
        )

    ``num_views``, ``every_n_train_steps``, ``train_buffer_size``, ``max_samples``, ``metrics``,
    ``default_metrics``, ``strict``, ``view_layout``, ``min_samples``, ``reference`` and
    ``rankme_diagnostics`` are :class:`~reprmetrics.monitor.RepresentationTracker`'s (``"initial"`` is
    taken again when training begins: after a resume, the checkpoint's weights); ``patience``,
    ``min_value``, ``min_fraction_of_dim``, ``max_relative_drop``, ``baseline``, ``dim``, ``kind`` and
    ``check_finite`` are :class:`CollapseEarlyStoppingCallback`'s.

    Args:
        taps: submodule names, output keys or :class:`~reprmetrics.monitor.Tap` objects.
        prefix: the second component of every logged name; a stopper reads the monitor of its prefix.
        log_figures: add the spectrum figure and histograms at evaluations.
        figures_every_n_evals: draw them every this many evaluations (drawing costs time on CPU).
        stop_on: what to stop on (``None``: monitor only); see :class:`CollapseEarlyStoppingCallback`.
    """

    def __init__(
        self,
        taps: Iterable[str | Tap],
        num_views: int = 1,
        every_n_train_steps: int = 200,
        train_buffer_size: int = 1024,
        max_samples: int = MONITOR_MAX_SAMPLES,
        metrics: Mapping[str, Metric] | Sequence[str] | None = None,
        default_metrics: bool = True,
        strict: bool = False,
        prefix: str = "repr",
        view_layout: str = "auto",
        min_samples: int = DEFAULT_MIN_SAMPLES,
        reference: str | os.PathLike | nn.Module | None = None,
        rankme_diagnostics: bool = False,
        log_figures: bool = True,
        figures_every_n_evals: int = 1,
        stop_on: str | SSLGuard | Iterable[str | SSLGuard] | Mapping[str, Mapping[str, Any]] | None = None,
        patience: int = 3,
        min_value: float | None = None,
        min_fraction_of_dim: float | None = None,
        max_relative_drop: float | None = None,
        baseline: float | None = None,
        dim: int | None = None,
        kind: str | None = None,
        check_finite: bool = True,
    ) -> None:
        self._arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.owner = type(self).__name__
        settings = {k: v for k, v in self._arguments.items() if k in TRACKER_SETTINGS}
        self.tracker = RepresentationTracker(**settings, owner=self.owner)
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise MonitorConfigurationError(
                f"{self.owner}: `prefix` must be a non-empty string without '/', got {prefix!r}"
            )
        n = figures_every_n_evals
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MonitorConfigurationError(
                f"{self.owner}: `figures_every_n_evals` must be a positive integer, got {n!r}"
            )
        self.prefix, self.log_figures, self.figures_every_n_evals = prefix, log_figures, n
        criteria = {k: v for k, v in self._arguments.items() if k in CRITERIA}
        self.stopper: CollapseEarlyStoppingCallback | None = None
        if stop_on is None:
            reject_unused_criteria(self.owner, f"{prefix}/eval/{self.tracker.taps[0].name}/rankme", **criteria)
        else:
            taps = ([t.name for t in self.tracker.taps], every_n_train_steps)
            self.stopper = CollapseEarlyStoppingCallback(stop_on, prefix, **criteria, owner=self.owner, taps=taps)
        self.backends = TrainerBackends()
        self._model: nn.Module | None = None
        self._root_handles: list[Any] = []
        self._last_output: Mapping[str, Any] | None = None
        self._eval_open = False

    @property
    def stopping_reason(self) -> str | None:
        """Why ``stop_on`` stopped training (None: not stopped, or no ``stop_on``)."""
        return self.stopper.stopping_reason if self.stopper is not None else None

    @property
    def stopped_step(self) -> int | None:
        return self.stopper.stopped_step if self.stopper is not None else None

    def _setup(self, args: TrainingArguments, model: nn.Module | None) -> None:
        if model is not None and model is not self._model:
            for handle in self._root_handles:
                handle.remove()
            self.tracker.attach(model)
            self._model = model
            self._root_handles = [
                model.register_forward_pre_hook(self._before_forward),
                model.register_forward_hook(self._after_forward),
            ]
        if self._model is not None:
            channel(self._model, self.prefix).publish_from(self.tracker)  # stoppers find results by model and prefix
        self.tracker.expect_eval = False  # forward returns the same keys in training and evaluation
        self.backends.start()
        if self.stopper is not None:
            self.stopper._attach(args, model)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # The first eval-mode forward opens an evaluation: no Trainer event precedes batch 1. A callback the
        # Trainer replaced (restore_callback_states_from_checkpoint) no longer publishes, and stays out.
        if not module.training and not self._eval_open and channel(module, self.prefix).tracker is self.tracker:
            self._eval_open = True
            self.tracker.start_eval()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._last_output = output if isinstance(output, Mapping) else None  # for output-key taps

    def _take_output(self) -> Mapping[str, Any] | None:
        output, self._last_output = self._last_output, None
        return output

    # ---- the Trainer's events ----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_rebuild(args)
        self._setup(args, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._setup(args, model)
        if model is not None and self.tracker.reference == "initial":
            self.tracker.retake_reference(model)  # the weights training starts from, the same on every rank
        self._resume(state)
        if self.stopper is not None:
            self.stopper._begin(control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start_train_step()

    def on_substep_end(self, args, state, control, **kwargs):
        self._end_train_step(args, state)  # gradient accumulation: each micro-batch is one tracker step
        self._start_train_step()

    def on_step_end(self, args, state, control, **kwargs):
        self._end_train_step(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tracker.end_train_epoch()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._eval_open:
            self.tracker.end_eval_step(self._take_output())

    def on_log(self, args, state, control, logs=None, **kwargs):
        eval_prefix = _eval_prefix(logs or {})
        if self._eval_open and eval_prefix is not None:
            logs.update(self._end_eval(args, state, eval_prefix))  # what evaluate() returns, best-model selection reads

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics if metrics is not None else {}
        if self._eval_open:  # the evaluation log did not come through on_log (a Trainer whose log() skips callbacks)
            metrics.update(self._end_eval(args, state, _eval_prefix(metrics) or "eval"))
            warn(
                f"{self.owner}: the evaluation metrics were not logged through on_log; its values are in the"
                " evaluate() metrics only"
            )
        if self.stopper is not None:
            self.stopper._flush(args, state, metrics)

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval()

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopper is not None:
            self.stopper.on_train_end(args, state, control)
        self.backends.close()

    # ---- the tracker's side ------------------------------------------------------------------------------
    def _close_eval(self) -> None:
        """End a pass that is not reported (predict, or eval-mode forwards outside evaluate())."""
        if self._eval_open:
            self._eval_open = False
            self.tracker.abandon_eval()

    def _start_train_step(self) -> None:
        self._close_eval()
        self.tracker.start_train_step()

    def _end_train_step(self, args: TrainingArguments, state: TrainerState) -> None:
        values = self.tracker.end_train_step(self._take_output())
        if values:
            self._record(args, state, {f"{self.prefix}/{name}": float(v) for name, v in values.items()})
        if self.stopper is not None:
            self.stopper._flush(args, state)

    def _end_eval(self, args: TrainingArguments, state: TrainerState, eval_prefix: str) -> dict[str, float]:
        self._eval_open, self._last_output = False, None
        named = {f"{eval_prefix}_{self.prefix}/{name}": float(v) for name, v in self.tracker.end_eval().items()}
        self._record(args, state, named)
        if self.log_figures and (self.tracker.eval_passes - 1) % self.figures_every_n_evals == 0:
            for tap, artifacts in drawable(self.tracker.last_result, self.tracker.min_samples):
                self.backends.figures(args, state, f"{eval_prefix}_{self.prefix}/{tap}", tap, artifacts)
        return named

    def _record(self, args: TrainingArguments, state: TrainerState, values: dict[str, float]) -> None:
        if values:
            state.log_history.append(_entry(state, values))
            self.backends.scalars(args, state, values)

    def _identity(self) -> str:
        return f"{self.prefix}:" + ",".join(t.name for t in self.tracker.taps)

    def _save(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.tracker.state_dict(), buffer)  # tensors and plain values: loads with weights_only=True
        stopper = self.stopper._save() if self.stopper is not None else None
        return {"tracker": base64.b64encode(buffer.getvalue()).decode("ascii"), "stopper": stopper}

    def _load(self, saved: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(torch.load(io.BytesIO(base64.b64decode(saved["tracker"])), weights_only=True))
        if self.stopper is not None and saved.get("stopper"):
            self.stopper._load(saved["stopper"])
