"""The Hugging Face ``Trainer`` adapters.

:class:`RepresentationCallback` watches, :class:`CollapseEarlyStoppingCallback` stops.

Needs ``transformers`` (``pip install "reprmetrics[huggingface]"``), never Lightning. Capture, schedule
and metrics are :class:`reprmetrics.monitor.RepresentationTracker`'s, decisions are the guards' of
:mod:`reprmetrics.stopping`; this file translates the Trainer's events into tracker calls, and
results and decisions into the Trainer's logs and controls. The two callbacks meet through
:func:`reprmetrics.results.channel`, keyed by the ``model`` every Trainer event carries and the prefix.
"""

from __future__ import annotations

import base64
import difflib
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
from torch import Tensor, nn
from torchmetrics import Metric

from reprmetrics.monitor import (
    DEFAULT_MIN_SAMPLES,
    MONITOR_MAX_SAMPLES,
    MonitorConfigurationError,
    RepresentationTracker,
    Tap,
    warn,
)
from reprmetrics.results import TrackerResult, channel
from reprmetrics.stopping import CollapseCriteria, Guard, KeyGuard, SSLGuard, parse_key

__all__ = ["CollapseEarlyStoppingCallback", "RepresentationCallback", "first_token"]

logger = logging.getLogger(__name__)
_STAGES = {"eval": "val", "train": "train"}  # stop_on stage -> the tracker's stage
_CRITERIA = (
    "patience",
    "min_value",
    "min_fraction_of_dim",
    "max_relative_drop",
    "baseline",
    "dim",
    "kind",
    "check_finite",
)


def first_token(output: Any) -> Tensor:
    """A ``reduce`` for hidden-state taps: the first token's vector of a ``(B, T, D)`` output, BERT's ``[CLS]``.

    A transformer layer returns the hidden states (transformers 5) or a tuple whose first element they
    are (transformers 4): both work. ``Tap("bert.encoder.layer.1", reduce=first_token)``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise MonitorConfigurationError(
            f"first_token: expected (B, T, D) hidden states (or a tuple starting with them), got {shape}"
        )
    return output[:, 0]


def _eval_prefix(logs: Mapping[str, Any]) -> str | None:
    """The ``metric_key_prefix`` of an evaluation log (``"eval"``, ``"eval_{name}"``), else ``None``:
    ``Trainer.evaluate`` always adds ``{prefix}_runtime`` and ``{prefix}_samples_per_second``."""
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

    On ``trainer.train(resume_from_checkpoint=...)`` the callback reads its own entry back when
    training begins (``restore_callback_states_from_checkpoint`` may stay False, its default, and the
    callback object stays the one you made). With that option True the Trainer instead rebuilds the
    callback with :meth:`from_state`, which needs arguments that JSON can hold.
    """

    _arguments: dict[str, Any]
    owner: str

    def _identity(self) -> str:
        raise NotImplementedError

    def _save(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, saved: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        args = {k: v for k, v in self._arguments.items() if _plain(v)}
        return {"args": args, "attributes": {"resume_state": {"identity": self._identity(), **self._save()}}}

    def _check_rebuild(self, args: TrainingArguments) -> None:
        unsaved = sorted(k for k, v in self._arguments.items() if not _plain(v))
        if getattr(args, "restore_callback_states_from_checkpoint", False) and unsaved:
            raise MonitorConfigurationError(
                f"{self.owner}: restore_callback_states_from_checkpoint=True rebuilds callbacks from the JSON the"
                " checkpoint holds,"
                f" and its {', '.join(unsaved)} cannot be held in JSON. Leave the option False: {self.owner}"
                " restores its own state"
                " when training resumes from a checkpoint"
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


# ---- stopping --------------------------------------------------------------------------------------------
class CollapseEarlyStoppingCallback(TrainerCallback, _Resumable):
    r"""Stop a Hugging Face ``Trainer`` run whose representation collapses or drifts.

    Acts on the results of the :class:`RepresentationCallback` with the same ``prefix`` (found through
    :func:`reprmetrics.results.channel` keyed by the Trainer's ``model``, in any order among the
    callbacks; without one it raises before the first step). ``RepresentationCallback(..., stop_on=...)``
    builds one of these itself. Each ``stop_on`` rule is a guard of :mod:`reprmetrics.stopping`:

    - ``ssl_guard(tap)``: the SSL preset (rank, spread and their trend for one tap);
    - a key ``"repr/eval/{tap}/{metric}"`` (or the logged ``"eval_repr/{tap}/{metric}"``), checked at
      every evaluation, or ``"repr/train/{tap}/{metric}"``, checked whenever training-stage values are
      computed, with the criteria of :class:`~reprmetrics.stopping.CollapseCriteria`: a check *shows
      collapse* when the value is below ``min_value``, below ``min_fraction_of_dim`` × D (D: the tap's
      width), or more than ``max_relative_drop`` below ``baseline`` (default: the first value);
    - a list of keys and/or guards, or ``{key: {criterion: value}}`` to give a key criteria of its own.

    After ``patience`` consecutive collapsing checks, or at once for a non-finite value (divergence),
    it sets ``control.should_training_stop`` (on every rank: the values are the same everywhere), logs
    the reason with ``logger.warning`` and keeps it in :attr:`stopping_reason`. The reason names the
    kind ("Complete collapse", "Dimensional collapse", "Collapse in progress", "Representation drift:
    CKA to the reference ...", "Divergence: ...") and is logged as ``{eval_prefix}_{prefix}/stop_reason``
    (an evaluation's stop: in the dict ``evaluate()`` returns too) or ``{prefix}/stop_reason`` in an
    entry of its own in ``trainer.state.log_history``, as text in TensorBoard and W&B, and as a tag in
    MLflow. Only training is checked (not ``trainer.evaluate()`` alone), and a resumed run keeps the
    guards' counts, best values and baseline and the stop reason (see :class:`RepresentationCallback`).

    Args:
        stop_on: the rules (see above).
        prefix: the prefix of the :class:`RepresentationCallback` whose results it reads.
        patience: consecutive collapsing checks before stopping (keys).
        min_value: an absolute floor (keys).
        min_fraction_of_dim: a floor as a fraction of the tap's width D (keys).
        max_relative_drop: the largest allowed fall below the baseline, as a fraction (keys).
        baseline: the reference for ``max_relative_drop`` (default: the first value seen).
        dim: the width D for ``min_fraction_of_dim`` (default: the tap's).
        kind: the collapse kind the reason names (default: from the metric and values).
        check_finite: stop at once on a non-finite value.
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
        shared = dict(
            zip(
                _CRITERIA,
                (patience, min_value, min_fraction_of_dim, max_relative_drop, baseline, dim, kind, check_finite),
            )
        )
        if isinstance(stop_on, (str, SSLGuard)):
            stop_on = [stop_on]
        items = (
            [(k, dict(v or {})) for k, v in stop_on.items()]
            if isinstance(stop_on, Mapping)
            else [(k, {}) for k in stop_on or []]
        )
        if not any(isinstance(k, str) for k, _ in items) and any(
            v is not None for v in (min_value, min_fraction_of_dim, max_relative_drop, baseline)
        ):
            raise MonitorConfigurationError(
                f"{owner}: stopping criteria given but no `stop_on` key to apply them to, e.g."
                f" stop_on='{prefix}/eval/projector/rankme'"
            )
        self.rules: list[tuple[str, Guard]] = []  # (what the user wrote, the guard)
        for key, own in items:
            if isinstance(key, SSLGuard):
                self.rules.append((repr(key), key))
                continue
            stage, tap, metric = self._parse(key)
            unknown = sorted(set(own) - set(_CRITERIA))
            if unknown:
                raise MonitorConfigurationError(
                    f"{owner}: stop_on[{key!r}] has unknown criteria {unknown}; they are {sorted(_CRITERIA)}"
                )
            logged = f"eval_{prefix}/{tap}/{metric}" if stage == "val" else f"{prefix}/{tap}/{metric}"
            self.rules.append(
                (key, KeyGuard(stage, tap, metric, CollapseCriteria(logged, owner=owner, **{**shared, **own})))
            )
        if taps is not None:
            self.check_taps(*taps)
        self.stopping_reason: str | None = None
        self.stopped_step: int | None = None
        self._control: TrainerControl | None = (
            None  # held while training: a decision arrives inside another callback's event
        )
        self._pending: tuple[str, str] | None = None  # (stage, reason) not yet logged
        self._verified: set[int] = set()
        self._source_checked = False
        self._model: nn.Module | None = None
        self.backends = TrainerBackends()

    def _parse(self, key: Any) -> tuple[str, str, str]:
        if not isinstance(key, str):
            raise MonitorConfigurationError(
                f"{self.owner}: `stop_on` keys must be strings or ssl_guard(...), got {type(key).__name__}"
            )
        logged = f"eval_{self.prefix}/"
        parsed = parse_key(
            f"{self.prefix}/eval/{key[len(logged) :]}" if key.startswith(logged) else key, self.prefix, _STAGES
        )
        if parsed is None:
            raise MonitorConfigurationError(
                f"{self.owner}: stop_on={key!r} is not a key of this callback; they read"
                f" {self.prefix}/eval/{{tap}}/{{metric}} (evaluation,"
                f" logged as eval_{self.prefix}/{{tap}}/{{metric}}) or {self.prefix}/train/{{tap}}/{{metric}}"
                f" (training), e.g. {self.prefix}/eval/projector/rankme"
            )
        return parsed

    def check_taps(self, taps: Sequence[str], every_n_train_steps: int) -> None:
        """Raise for rules naming a tap the monitor lacks, or training-stage rules without training-stage values."""
        for written, rule in self.rules:
            if rule.tap not in taps:
                close = difflib.get_close_matches(rule.tap, taps, n=1, cutoff=0.5)
                stage = "eval" if rule.stage == "val" else "train"
                hint = (
                    (
                        f"{self.prefix}/{stage}/{close[0]}/{rule.metric}"
                        if isinstance(rule, KeyGuard)
                        else repr(close[0])
                    )
                    if close
                    else ""
                )
                raise MonitorConfigurationError(
                    f"{self.owner}: stop_on={written!r} names tap {rule.tap!r}, which is not one of the monitored taps"
                    f" ({', '.join(map(repr, taps))})" + (f"; did you mean {hint}?" if hint else "")
                )
            if rule.stage == "train" and every_n_train_steps == 0:
                raise MonitorConfigurationError(
                    f"{self.owner}: stop_on={written!r} needs training-stage values, but every_n_train_steps=0"
                )

    def _identity(self) -> str:
        return f"{self.prefix}:" + ";".join(written for written, _ in self.rules)

    # ---- the Trainer's events (RepresentationCallback calls these for the stopper it builds) ------------
    def _attach(self, args: TrainingArguments, model: nn.Module | None) -> None:
        if model is not None:
            channel(model, self.prefix).subscribe(self._on_result)
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            for written, rule in self.rules:
                if rule.stage == "val":
                    fix = (
                        "use ssl_guard(tap, stage='train')"
                        if isinstance(rule, SSLGuard)
                        else "stop on a training-stage key"
                    )
                    shown = written if isinstance(rule, SSLGuard) else rule.criteria.monitor
                    raise MonitorConfigurationError(
                        f"{self.owner}: stop_on={shown!r} is checked at evaluations, but eval_strategy='no': set"
                        " eval_strategy"
                        f" ('epoch' or 'steps') and an eval_dataset, or {fix}"
                    )

    def _begin(self, control: TrainerControl) -> None:
        self._control, self._pending = control, None
        self.backends.start()

    def _flush(
        self, args: TrainingArguments, state: TrainerState, metrics: dict[str, Any] | None = None, final: bool = False
    ) -> None:
        """Log a stop reason: a training-stage one at the next event, an evaluation's with its metrics."""
        if self._pending is None or (self._pending[0] == "val" and metrics is None and not final):
            return
        stage, reason = self._pending
        self._pending, self.stopped_step = None, state.global_step
        key = (
            f"{_eval_prefix(metrics or {}) or 'eval'}_{self.prefix}/stop_reason"
            if stage == "val"
            else f"{self.prefix}/stop_reason"
        )
        if metrics is not None:
            metrics[key] = reason  # the dict evaluate() returns
        state.log_history.append(_entry(state, {key: reason}))
        self.backends.text(args, state, key, reason)

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_rebuild(args)
        self._attach(args, model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._attach(args, model)
        self._resume(state)
        self._begin(control)
        self._source_checked = False
        self._model = model

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._control = control
        if not self._source_checked:  # every callback's on_train_begin has run: a monitor has published by now
            self._source_checked = True
            tracker = channel(self._model, self.prefix).tracker if self._model is not None else None
            if tracker is None:
                tap = self.rules[0][1].tap if self.rules else "projector"
                raise MonitorConfigurationError(
                    f"{self.owner}: no RepresentationCallback with prefix {self.prefix!r} is among the Trainer's"
                    " callbacks; add one that"
                    f" taps {tap!r}, e.g. callbacks=[RepresentationCallback([{tap!r}]), {self.owner}(...)]"
                )
            self.check_taps([t.name for t in tracker.taps], tracker.every_n_train_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._flush(args, state)

    on_substep_end = on_epoch_end = on_step_end

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._flush(args, state, metrics if metrics is not None else {})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(args, state, final=True)
        self._control = None
        self.backends.close()

    # ---- deciding ------------------------------------------------------------------------------------
    def _on_result(self, result: TrackerResult) -> None:
        """A monitor computation (every rank, the same result). Acts only while training."""
        if self._control is None:
            return
        for index, (_, rule) in enumerate(self.rules):
            if rule.stage != result.stage:
                continue
            self._verify(index, rule, result)
            decision = rule.check(result)
            if decision is not None and decision.stop and not self._control.should_training_stop:
                self._control.should_training_stop = True
                self.stopping_reason, self._pending = decision.reason, (result.stage, decision.reason)
                logger.warning(decision.reason)

    def _verify(self, index: int, rule: Guard, result: TrackerResult) -> None:
        """At the first result for the rule's tap: the metrics it reads must be ones the tracker reports."""
        if index in self._verified or rule.tap not in result.names:
            return
        self._verified.add(index)
        stage = "eval" if result.stage == "val" else "train"
        missing = [m for m in rule.metrics if m not in result.names[rule.tap]]
        if missing:
            existing = [f"{self.prefix}/{stage}/{rule.tap}/{m}" for m in result.names[rule.tap]]
            wanted = f"{self.prefix}/{stage}/{rule.tap}/{missing[0]}"
            close = difflib.get_close_matches(wanted, existing, n=3, cutoff=0.5)
            raise MonitorConfigurationError(
                f"{self.owner}: stop_on {wanted!r}: the tracker does not compute {missing[0]!r} for tap"
                f" {rule.tap!r}; it computes"
                f" {', '.join(map(repr, existing))}" + (f" (closest: {', '.join(map(repr, close))})" if close else "")
            )

    # ---- persistence -----------------------------------------------------------------------------------
    def _save(self) -> dict[str, Any]:
        return {
            "guards": [rule.state_dict() for _, rule in self.rules],
            "stopping_reason": self.stopping_reason,
            "stopped_step": self.stopped_step,
        }

    def _load(self, saved: Mapping[str, Any]) -> None:
        for (_, rule), guard_state in zip(self.rules, saved["guards"]):
            rule.load_state_dict(guard_state)
        self.stopping_reason, self.stopped_step = saved["stopping_reason"], saved["stopped_step"]


# ---- monitoring --------------------------------------------------------------------------------------------
class RepresentationCallback(TrainerCallback, _Resumable):
    r"""Watch the representations a model learns in a Hugging Face ``Trainer``; optionally stop on collapse or drift.

    What :class:`~reprmetrics.callbacks.RepresentationMonitor` gives a Lightning user, for
    ``transformers.Trainer`` and the trainers built on it (sentence-transformers' included)::

        from reprmetrics.callbacks.huggingface import RepresentationCallback, first_token
        from reprmetrics.monitor import Tap

        callback = RepresentationCallback(
            ["bert.pooler", Tap("bert.encoder.layer.1", reduce=first_token)],  # [CLS] of layer 1
            reference="initial",                                   # drift from the pretrained weights
            stop_on="repr/eval/bert.pooler/cka_to_reference", min_value=0.7, patience=2,
        )
        trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[callback])

    **Taps** are submodules of the model (``model.get_submodule`` paths, e.g. ``"bert.pooler"``; a
    forward hook reads the output: a ``(B, D)`` tensor, or a tuple whose first element is one) or keys
    of the dict-like output of the model's forward (``ModelOutput`` or a plain dict). For a
    hidden-state output ``(B, T, D)`` pass a :class:`~reprmetrics.monitor.Tap` with a ``reduce``, e.g.
    ``Tap("bert.encoder.layer.1", reduce=first_token)`` (:func:`first_token`). A tap that is neither
    raises :class:`~reprmetrics.monitor.MonitorConfigurationError` (a ``ValueError``) at the end of the
    first training step (or evaluation), naming the closest submodules and output keys.
    sentence-transformers: ``Tap("1", reduce=lambda features: features["sentence_embedding"])`` taps
    the pooled embeddings; an (anchor, positive) loss embeds each column with its own call:
    ``num_views=2, view_layout="calls"``.

    **When.** Evaluation-stage values stream over the whole evaluation set at every evaluation
    (``eval_strategy``; ``trainer.evaluate()``): capture starts at the first forward call of the model
    in eval mode (a forward pre-hook on the model: no Trainer event comes before the first evaluation
    batch), each ``on_prediction_step`` feeds one batch, and the values are computed in the ``on_log``
    of the evaluation metrics. ``trainer.predict()`` is not measured. Training-stage values are
    computed every ``every_n_train_steps`` training micro-batches over the most recent
    ``train_buffer_size`` samples (the first once the buffer is full); with
    ``gradient_accumulation_steps = k`` an optimizer step is k tracker steps.

    **Metrics** per tap: the default set ``rankme``, ``alpha_req`` (D ≥ 13, with ``alpha_req_r2``),
    ``normalized_std``, ``uniformity``, ``lid``, ``nesum``, ``coding_rate``, ``wasserstein_uniformity``,
    ``isoscore``, with ``num_views`` ≥ 2 ``lidar`` and ``alignment``; opt-in by name (``metrics=[...]``):
    ``sigreg``, ``twonn``, ``mle_dimension``; with ``reference``: ``cka_to_reference`` (evaluation
    only); with ``rankme_diagnostics``: ``rankme_top_singular_value``, ``rankme_condition_number``;
    always ``num_samples`` and ``nonfinite_fraction``. Values from fewer than ``min_samples`` samples
    are withheld (``num_samples`` is logged); non-finite embeddings make the tap's metrics NaN.

    **Where values go.** Evaluation values are ``{eval_prefix}_{prefix}/{tap}/{metric}`` (e.g.
    ``eval_repr/bert.pooler/rankme``; ``eval_prefix`` is the Trainer's ``metric_key_prefix``), training
    values ``{prefix}/{tap}/{metric}``:

    - the evaluation ``logs`` (the dict ``trainer.evaluate()`` returns): so
      ``metric_for_best_model="repr/bert.pooler/rankme"`` with ``load_best_model_at_end=True`` works
      (the Trainer adds ``eval_``);
    - ``trainer.state.log_history``: an entry of its own (values, ``epoch``, ``step``) after the
      Trainer's entry of the same evaluation, or at the training step they are computed at;
    - the ``report_to`` integrations: the Trainer runs them before user callbacks, so the callback
      writes to their backends itself (:class:`~reprmetrics.callbacks._figures.TrainerBackends`):
      TensorBoard (``eval/repr/...``, ``train/repr/...`` in the TensorBoard callback's folder), W&B
      (the same names on ``train/global_step``), MLflow (the names above). Other integrations do not
      receive them.

    **Figures** (``log_figures``): each evaluation adds, per tap, the covariance spectrum with the α-ReQ
    fit (``.../spectrum``) and histograms of the singular values and of the per-sample LID, to
    TensorBoard (figure, histograms), W&B (``wandb.Image``, ``wandb.Histogram``) and MLflow (PNG
    artifacts; histograms drawn as bar charts); with none of those, PNG files
    ``{output_dir}/figures/{key}/step_{step}.png``.

    **Stopping.** ``stop_on`` builds a :class:`CollapseEarlyStoppingCallback` inside this one (its
    rules, criteria and reason; read :attr:`stopping_reason`); or add that callback yourself.

    **Resuming.** The callback is an ``ExportableState``: each checkpoint's ``trainer_state.json``
    holds the tracker's clock, training buffers and history (the buffers base64-encoded: at most
    ``train_buffer_size`` × views × D float32 values per tap) and the stopper's state, and
    ``trainer.train(resume_from_checkpoint=...)`` restores them when training begins, so a resumed run
    computes the values and stops where the uninterrupted one does.

    Args:
        taps: submodule names, output keys or :class:`~reprmetrics.monitor.Tap` objects.
        num_views: views per sample q (LiDAR and alignment need q ≥ 2).
        every_n_train_steps: training-stage cadence in micro-batches (0: none).
        train_buffer_size: samples per tap the training-stage values read.
        max_samples: points kept by uniformity and LID per computation.
        metrics: opt-in metric names, or ``{name: Metric}``.
        default_metrics: include the default set.
        strict: raise instead of warning once and skipping a metric that cannot be computed.
        prefix: the second component of every logged name; a stopper reads the monitor of its prefix.
        view_layout: ``"calls"``, ``"concat"``, ``"stacked"`` or ``"auto"``
            (see :class:`~reprmetrics.monitor.RepresentationTracker`).
        min_samples: values from fewer usable samples are withheld.
        reference: ``"initial"``, an ``nn.Module`` or a checkpoint path: logs ``cka_to_reference``.
            ``"initial"`` copies the tapped submodules when the Trainer is built and again when
            training begins (after a resume: the checkpoint's weights).
        rankme_diagnostics: also log RankMe's top singular value and condition number.
        log_figures: add the spectrum figure and histograms at evaluations.
        figures_every_n_evals: draw them every this many evaluations (drawing costs time on CPU).
        stop_on: what to stop on (``None``: monitor only); see :class:`CollapseEarlyStoppingCallback`.
        patience: as for :class:`CollapseEarlyStoppingCallback` (keys in ``stop_on``).
        min_value: as for :class:`CollapseEarlyStoppingCallback`.
        min_fraction_of_dim: as for :class:`CollapseEarlyStoppingCallback`.
        max_relative_drop: as for :class:`CollapseEarlyStoppingCallback`.
        baseline: as for :class:`CollapseEarlyStoppingCallback`.
        dim: as for :class:`CollapseEarlyStoppingCallback`.
        kind: as for :class:`CollapseEarlyStoppingCallback`.
        check_finite: as for :class:`CollapseEarlyStoppingCallback`.
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
        self.tracker = RepresentationTracker(
            taps,
            num_views=num_views,
            every_n_train_steps=every_n_train_steps,
            train_buffer_size=train_buffer_size,
            max_samples=max_samples,
            metrics=metrics,
            default_metrics=default_metrics,
            strict=strict,
            view_layout=view_layout,
            min_samples=min_samples,
            reference=reference,
            rankme_diagnostics=rankme_diagnostics,
            owner=self.owner,
        )
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise MonitorConfigurationError(
                f"{self.owner}: `prefix` must be a non-empty string without '/', got {prefix!r}"
            )
        if (
            isinstance(figures_every_n_evals, bool)
            or not isinstance(figures_every_n_evals, int)
            or figures_every_n_evals < 1
        ):
            raise MonitorConfigurationError(
                f"{self.owner}: `figures_every_n_evals` must be a positive integer, got {figures_every_n_evals!r}"
            )
        self.prefix, self.log_figures, self.figures_every_n_evals = prefix, log_figures, figures_every_n_evals
        criteria = dict(
            zip(
                _CRITERIA,
                (patience, min_value, min_fraction_of_dim, max_relative_drop, baseline, dim, kind, check_finite),
            )
        )
        if stop_on is None and any(
            v is not None for v in (min_value, min_fraction_of_dim, max_relative_drop, baseline)
        ):
            raise MonitorConfigurationError(
                f"{self.owner}: stopping criteria given but no `stop_on` key to apply them to, e.g."
                f" stop_on='{prefix}/eval/{self.tracker.taps[0].name}/rankme'"
            )
        taps_known = ([t.name for t in self.tracker.taps], every_n_train_steps)
        self.stopper = (
            None
            if stop_on is None
            else CollapseEarlyStoppingCallback(stop_on, prefix, **criteria, owner=self.owner, taps=taps_known)
        )
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

    # ---- setting up --------------------------------------------------------------------------------------
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
            channel(self._model, self.prefix).publish_from(
                self.tracker
            )  # a stopper finds the results by model and prefix
        # The model's forward returns the same keys in training and evaluation: a missing output key is an
        # error at once.
        self.tracker.expect_eval = False
        self.backends.start()
        if self.stopper is not None:
            self.stopper._attach(args, model)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # The first forward call in eval mode opens an evaluation pass: no Trainer event precedes batch 1. A callback
        # the Trainer replaced (restore_callback_states_from_checkpoint) no longer publishes, and stays out.
        if not module.training and not self._eval_open and channel(module, self.prefix).tracker is self.tracker:
            self._eval_open = True
            self.tracker.start_eval()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._last_output = output if isinstance(output, Mapping) else None  # for output-key taps

    def _take_output(self) -> Mapping[str, Any] | None:
        output, self._last_output = self._last_output, None
        return output

    # ---- the Trainer's events ----------------------------------------------------------------------------
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_rebuild(args)
        self._setup(args, model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._setup(args, model)
        if model is not None and self.tracker.reference == "initial":
            self.tracker.retake_reference(model)  # the weights training starts from, the same on every rank
        self._resume(state)
        if self.stopper is not None:
            self.stopper._begin(control)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start_train_step()

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._end_train_step(args, state)  # gradient accumulation: each micro-batch is one tracker step
        self._start_train_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._end_train_step(args, state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.tracker.end_train_epoch()

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._eval_open:
            self.tracker.end_eval_step(self._take_output())

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        eval_prefix = _eval_prefix(logs or {})
        if self._eval_open and eval_prefix is not None:
            logs.update(
                self._end_eval(args, state, eval_prefix)
            )  # the dict evaluate() returns and best-model selection reads

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        metrics = metrics if metrics is not None else {}
        if self._eval_open:  # the evaluation log did not come through on_log (a Trainer whose log() skips callbacks)
            metrics.update(self._end_eval(args, state, _eval_prefix(metrics) or "eval"))
            warn(
                f"{self.owner}: the evaluation metrics were not logged through on_log; its values are in the"
                " evaluate() metrics only"
            )
        if self.stopper is not None:
            self.stopper._flush(args, state, metrics)

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_eval()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
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

    # ---- persistence -----------------------------------------------------------------------------------
    def _identity(self) -> str:
        return f"{self.prefix}:" + ",".join(t.name for t in self.tracker.taps)

    def _save(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.tracker.state_dict(), buffer)  # tensors and plain values: loads with weights_only=True
        return {
            "tracker": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "stopper": self.stopper._save() if self.stopper is not None else None,
        }

    def _load(self, saved: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(torch.load(io.BytesIO(base64.b64decode(saved["tracker"])), weights_only=True))
        if self.stopper is not None and saved.get("stopper"):
            self.stopper._load(saved["stopper"])
