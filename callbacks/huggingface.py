"""RepresentationCallback: representation metrics and collapse/drift stopping for the Hugging Face ``Trainer``.

Needs ``transformers`` (``pip install "reprmetrics[huggingface]"``), never Lightning. The capture,
schedule and metrics are :class:`reprmetrics.monitor.RepresentationTracker`'s, the stopping rule is
:class:`reprmetrics.stopping.CollapseCriteria` (what the Lightning callbacks use); this file only
translates the Trainer's events into tracker calls and the tracker's values into the Trainer's logs.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ModuleNotFoundError as error:  # exercised in a subprocess test
    raise ModuleNotFoundError(
        f'reprmetrics.callbacks.huggingface needs transformers: pip install "reprmetrics[huggingface]" (importing transformers failed: {error})',
        name=error.name,
    ) from error
from torch import Tensor, nn
from torchmetrics import Metric

from reprmetrics.monitor import DEFAULT_MIN_SAMPLES, MONITOR_MAX_SAMPLES, MonitorConfigurationError, RepresentationTracker, Tap, warn
from reprmetrics.stopping import CollapseCriteria, SSLGuard

__all__ = ["RepresentationCallback", "first_token"]

logger = logging.getLogger(__name__)
_OWNER = "RepresentationCallback"
_STAGES = {"eval": "val", "train": "train"}  # stop_on stage -> the tracker's stage


def first_token(output: Any) -> Tensor:
    """A ``reduce`` for hidden-state taps: the first token's vector of a ``(B, T, D)`` output, BERT's ``[CLS]``.

    A transformer layer returns the hidden states (transformers 5) or a tuple whose first element they
    are (transformers 4): both work. ``Tap("bert.encoder.layer.1", reduce=first_token)``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise MonitorConfigurationError(f"first_token: expected (B, T, D) hidden states (or a tuple starting with them), got {shape}")
    return output[:, 0]


class RepresentationCallback(TrainerCallback):
    r"""Watch the representations a model learns in a Hugging Face ``Trainer``, and stop on collapse or drift.

    What :class:`~reprmetrics.callbacks.RepresentationMonitor` plus
    :class:`~reprmetrics.callbacks.CollapseEarlyStopping` give a Lightning user, for
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
    forward hook reads the output: a ``(B, D)`` tensor, or a tuple whose first element is one) or
    keys of the dict-like output of the model's forward (``ModelOutput`` or a plain dict, e.g. an
    ``nn.Module`` returning ``{"loss": ..., "logits": ..., "embeddings": ...}``). For a hidden-state
    output ``(B, T, D)`` pass a :class:`~reprmetrics.monitor.Tap` with a ``reduce``:
    ``Tap("bert.encoder.layer.1", reduce=first_token)`` (the first token, :func:`first_token`), or a
    function of your own (a forward hook sees the module's output only, not the attention mask). A tap that is neither raises
    :class:`~reprmetrics.monitor.MonitorConfigurationError` (a ``ValueError``) at the end of the first
    training step (or evaluation), naming the closest submodules and output keys.

    **sentence-transformers.** ``SentenceTransformerTrainer`` is a ``Trainer``: the same callback
    works. A ``SentenceTransformer``'s submodules are numbered (``"0"`` the transformer, ``"1"`` the
    pooling), and they return the features dict, so tap the sentence embeddings with
    ``Tap("1", reduce=lambda features: features["sentence_embedding"])``; a loss over (anchor,
    positive) columns embeds each with its own forward call: ``num_views=2, view_layout="calls"``.

    **When.** Evaluation-stage values stream over the whole evaluation set at every evaluation the
    Trainer runs (``eval_strategy``; ``trainer.evaluate()``): capture starts at the first forward
    call of the model in eval mode (a forward pre-hook on the model: the Trainer puts the model in
    eval mode before the first evaluation batch, and no callback event comes before that batch),
    each ``on_prediction_step`` feeds one batch, and the values are computed when the Trainer logs
    the evaluation metrics. ``trainer.predict()`` passes are not measured. Training-stage values are
    computed every ``every_n_train_steps`` training micro-batches over the most recent
    ``train_buffer_size`` samples. One tracker step is one forward/backward micro-batch, as in
    Lightning: with ``gradient_accumulation_steps = k`` an optimizer step (``state.global_step``) is
    k tracker steps, so ``view_layout="calls"`` still sees one call per view.

    **Keys** (in ``trainer.state.log_history``, in every ``report_to`` integration, and in the dict
    ``trainer.evaluate()`` returns):

    - ``eval_{prefix}/{tap}/{metric}`` in the evaluation log, e.g. ``eval_repr/bert.pooler/rankme``
      (TensorBoard: ``eval/repr/bert.pooler/rankme``). ``eval`` is the Trainer's
      ``metric_key_prefix`` (``eval_{name}`` for a dict of evaluation sets). So
      ``metric_for_best_model="repr/bert.pooler/rankme"`` (the Trainer adds ``eval_``) with
      ``greater_is_better=True`` and ``load_best_model_at_end=True`` keeps the best checkpoint by it.
    - ``{prefix}/{tap}/{metric}`` in the training log of the step they are computed at (TensorBoard:
      ``train/repr/bert.pooler/rankme``); the callback asks the Trainer to log at those steps
      (``control.should_log``), besides its ``logging_steps``.
    - metrics: RankMe, α-ReQ (D ≥ 13), ``normalized_std``, ``uniformity``, ``lid`` (and with views
      ``lidar``, ``alignment``; with ``reference`` ``cka_to_reference``, evaluation only), plus
      ``num_samples`` and ``nonfinite_fraction``. Values from fewer than ``min_samples`` samples are
      withheld (``num_samples`` is logged); non-finite embeddings make the tap's metrics NaN.
    - ``..._{prefix}/stop_reason`` / ``{prefix}/stop_reason``: the reason, as text, in the log where
      the callback stops training.

    To put its values into the same log event that the integrations receive, the callback moves
    itself to the front of the Trainer's callback list when the Trainer is built (the Trainer puts
    ``report_to`` integrations before user callbacks and logs the evaluation metrics before
    ``on_evaluate``); it also adds them to ``state.log_history``'s entry of that event.

    **Stopping.** ``stop_on`` names one key or a list of keys, each checked with the criteria of
    :class:`~reprmetrics.stopping.CollapseCriteria` (the rule of ``CollapseEarlyStopping``):
    ``"repr/eval/{tap}/{metric}"`` (or the logged form ``"eval_repr/{tap}/{metric}"``) is checked
    at every evaluation, ``"repr/train/{tap}/{metric}"`` whenever training-stage values are computed.
    A check *shows collapse* when the value is below ``min_value``, below ``min_fraction_of_dim`` × D
    (D: the tap's width), or more than ``max_relative_drop`` below ``baseline`` (default: the first
    value); after ``patience`` consecutive such checks, or at once for a non-finite value
    (divergence), the callback sets ``control.should_training_stop``, logs the reason with
    ``logger.warning``, keeps it in :attr:`stopping_reason` and logs it under ``stop_reason``. The
    reason names the kind: "Complete collapse", "Dimensional collapse", "Representation drift: CKA
    to the reference ...", "Divergence: ...".

    Args:
        taps, num_views, view_layout, every_n_train_steps, train_buffer_size, max_samples,
        min_samples, metrics, default_metrics, strict, reference, rankme_diagnostics: as for
            :class:`~reprmetrics.monitor.RepresentationTracker`. ``reference="initial"`` copies the
            tapped submodules when the Trainer is built (so ``trainer.evaluate()`` before training
            has a reference) and again when training begins (after the Trainer has prepared the
            model, under DDP broadcast it to every rank, and loaded a ``resume_from_checkpoint``: a
            resumed run's reference is the checkpoint's weights).
        prefix: first component of every logged name.
        stop_on: what to stop on (``None``: monitor only): the SSL preset ``ssl_guard(tap)``
            (:func:`reprmetrics.stopping.ssl_guard`: rank, spread and their trend for one tap), a key, a list of keys and/or guards (each key with the
            criteria below), or ``{key: {criterion: value}}`` to give a key criteria of its own, e.g.
            ``{"repr/eval/pooler/rankme": {"min_fraction_of_dim": 0.1},
            "repr/eval/pooler/normalized_std": {"min_value": 0.25 / D**0.5, "patience": 1}}``.
        patience, min_value, min_fraction_of_dim, max_relative_drop, baseline, dim, kind,
        check_finite: the criteria, as for :class:`~reprmetrics.stopping.CollapseCriteria`
            (for every ``stop_on`` key, unless the key gives its own).

    Under DDP every rank computes the same values from synced metric states, so every rank takes the
    same decision. With a dict of evaluation sets every evaluation pass (one per set) is a check of
    each ``stop_on`` key. The callback is not an ``ExportableState``: resuming from a checkpoint
    starts its criteria afresh (:meth:`state_dict` / :meth:`load_state_dict` carry them by hand).
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
        )
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise MonitorConfigurationError(f"{_OWNER}: `prefix` must be a non-empty string without '/', got {prefix!r}")
        self.prefix = prefix
        shared = dict(
            patience=patience, min_value=min_value, min_fraction_of_dim=min_fraction_of_dim, max_relative_drop=max_relative_drop,
            baseline=baseline, dim=dim, kind=kind, check_finite=check_finite,
        )
        self._guards: list[SSLGuard] = []
        if isinstance(stop_on, SSLGuard):
            stop_on = [stop_on]
        if isinstance(stop_on, (list, tuple)):
            self._guards = [g for g in stop_on if isinstance(g, SSLGuard)]
            stop_on = [k for k in stop_on if not isinstance(k, SSLGuard)]
        for guard in self._guards:
            self._check_guard_tap(guard)
        if isinstance(stop_on, str):
            stop_keys: dict[str, dict[str, Any]] = {stop_on: {}}
        elif isinstance(stop_on, Mapping):
            stop_keys = {key: dict(own or {}) for key, own in stop_on.items()}
        else:
            stop_keys = {key: {} for key in (stop_on or [])}
        if not stop_keys and any(v is not None for v in (min_value, min_fraction_of_dim, max_relative_drop, baseline)):
            raise MonitorConfigurationError(f"{_OWNER}: stopping criteria given but no `stop_on` key to apply them to, e.g. stop_on={self._example_key()!r}")
        # (stage, tap, metric, criteria): one CollapseCriteria per key, fed each new value of it.
        self._stoppers: list[tuple[str, str, str, CollapseCriteria]] = []
        for key, own in stop_keys.items():
            stage, tap, metric = self._parse_stop_key(key)
            unknown = sorted(set(own) - set(shared))
            if unknown:
                raise MonitorConfigurationError(f"{_OWNER}: stop_on[{key!r}] has unknown criteria {unknown}; they are {sorted(shared)}")
            options = {**shared, **own}
            criteria = CollapseCriteria(self._logged_key(stage, tap, metric, "eval"), owner=_OWNER, **options)
            self._stoppers.append((stage, tap, metric, criteria))
        self._history_seen = [0] * len(self._stoppers)
        self._guard_seen = [0] * len(self._guards)
        self._verified: set[tuple[str, str]] = set()
        self.stopping_reason: str | None = None
        self.stopped_step: int | None = None

        self._model: nn.Module | None = None
        self._root_handles: list[Any] = []
        self._last_output: Mapping[str, Any] | None = None
        self._eval_open = False
        self._pending_train: dict[str, Any] = {}
        self._placed_in: CallbackHandler | None = None
        self._warned_placement = False

    # ---- keys --------------------------------------------------------------------------------
    def _example_key(self) -> str:
        return f"{self.prefix}/eval/{self.tracker.taps[0].name}/rankme"

    def _logged_key(self, stage: str, tap: str, metric: str, eval_prefix: str) -> str:
        """The name a value is logged under (see the class docstring)."""
        return f"{eval_prefix}_{self.prefix}/{tap}/{metric}" if stage == "val" else f"{self.prefix}/{tap}/{metric}"

    def _parse_stop_key(self, key: str) -> tuple[str, str, str]:
        """``(tracker stage, tap, metric)`` of a ``stop_on`` key; raises with the forms it accepts."""
        if not isinstance(key, str):
            raise MonitorConfigurationError(f"{_OWNER}: `stop_on` keys must be strings, got {type(key).__name__}")
        stage = tap = metric = ""
        if key.startswith(f"eval_{self.prefix}/"):
            stage, (tap, _, metric) = "eval", key[len(self.prefix) + 6 :].rpartition("/")
        elif key.startswith(f"{self.prefix}/"):
            stage, _, rest = key[len(self.prefix) + 1 :].partition("/")
            tap, _, metric = rest.rpartition("/")
        if stage not in _STAGES or not tap or not metric:
            raise MonitorConfigurationError(
                f"{_OWNER}: stop_on={key!r} is not a key of this callback; they read {self.prefix}/eval/{{tap}}/{{metric}} (evaluation,"
                f" logged as eval_{self.prefix}/{{tap}}/{{metric}}) or {self.prefix}/train/{{tap}}/{{metric}} (training), e.g. {self._example_key()!r}"
            )
        taps = [t.name for t in self.tracker.taps]
        if tap not in taps:
            close = difflib.get_close_matches(tap, taps, n=3, cutoff=0.5)
            raise MonitorConfigurationError(
                f"{_OWNER}: stop_on={key!r} names tap {tap!r}, which is not one of its taps ({', '.join(map(repr, taps))})"
                + (f"; did you mean {self.prefix}/{stage}/{close[0]}/{metric}?" if close else "")
            )
        if stage == "train" and self.tracker.every_n_train_steps == 0:
            raise MonitorConfigurationError(f"{_OWNER}: stop_on={key!r} needs training-stage values, but every_n_train_steps=0")
        return _STAGES[stage], tap, metric

    def _check_guard_tap(self, guard: SSLGuard) -> None:
        taps = [t.name for t in self.tracker.taps]
        if guard.tap not in taps:
            close = difflib.get_close_matches(guard.tap, taps, n=3, cutoff=0.5)
            raise MonitorConfigurationError(
                f"{_OWNER}: stop_on={guard!r} names tap {guard.tap!r}, which is not one of its taps ({', '.join(map(repr, taps))})"
                + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if guard.stage == "train" and self.tracker.every_n_train_steps == 0:
            raise MonitorConfigurationError(f"{_OWNER}: stop_on={guard!r} needs training-stage values, but every_n_train_steps=0")

    # ---- setting up --------------------------------------------------------------------------
    def _place_first(self) -> None:
        """Move this callback to the front of the calling Trainer's callback list (see the class docstring).

        The handler is the ``CallbackHandler`` that is dispatching the current event, found on the
        call stack. Moving an element to the front keeps the position of every callback after it, so
        the event being dispatched reaches every other callback exactly once.
        """
        frame = sys._getframe(1)
        for _ in range(8):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                if handler.callbacks[0] is not self:
                    handler.callbacks.remove(self)
                    handler.callbacks.insert(0, self)
                self._placed_in = handler
                return
        if not self._warned_placement:
            self._warned_placement = True
            warn(
                f"{_OWNER}: could not find the Trainer's callback handler to run before the reporting integrations; its values"
                " reach trainer.state.log_history and the evaluation metrics, but integrations listed before it may miss them"
            )

    def _setup(self, args: TrainingArguments, model: nn.Module | None) -> None:
        self._place_first()
        if model is None:
            return
        if model is not self._model:
            for handle in self._root_handles:
                handle.remove()
            self.tracker.attach(model)
            self._model = model
            self._root_handles = [model.register_forward_pre_hook(self._before_forward), model.register_forward_hook(self._after_forward)]
        # The model's forward returns the same keys in training and evaluation: an output-key tap
        # missing after the first training step is an error then (no waiting for an evaluation).
        self.tracker.expect_eval = False
        evaluates = str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
        for guard in self._guards:
            if guard.stage == "val" and not evaluates:
                raise MonitorConfigurationError(
                    f"{_OWNER}: stop_on={guard!r} is checked at evaluations, but eval_strategy='no': set eval_strategy"
                    " ('epoch' or 'steps') and an eval_dataset, or use ssl_guard(tap, stage='train')"
                )
        for stage, tap, metric, criteria in self._stoppers:
            if stage == "val" and not evaluates:
                raise MonitorConfigurationError(
                    f"{_OWNER}: stop_on={criteria.monitor!r} is checked at evaluations, but eval_strategy='no': set eval_strategy"
                    " ('epoch' or 'steps') and an eval_dataset, or stop on a training-stage key"
                )

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # The first forward call in eval mode opens an evaluation pass: no Trainer event precedes batch 1.
        if not module.training and not self._eval_open:
            self._eval_open = True
            self.tracker.start_eval()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._last_output = output if isinstance(output, Mapping) else None  # for output-key taps

    def _take_output(self) -> Mapping[str, Any] | None:
        output, self._last_output = self._last_output, None
        return output

    # ---- Trainer events ----------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._setup(args, model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._setup(args, model)
        if model is not None and self.tracker.reference == "initial":
            self.tracker.retake_reference(model)  # the weights training starts from, the same on every rank

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._start_train_step()

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Gradient accumulation: each micro-batch is one tracker step.
        self._end_train_step(state, control)
        self._start_train_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._end_train_step(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.tracker.end_train_epoch()

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._placed_in is None:
            self._place_first()  # evaluate() on a Trainer this callback was added to after it was built
        if self._eval_open:
            self.tracker.end_eval_step(self._take_output())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        added: dict[str, Any] = {}
        eval_prefix = _eval_prefix(logs)
        if self._eval_open and eval_prefix is not None:
            added.update(self._end_eval(state, control, eval_prefix))
        if self._pending_train and eval_prefix is None:
            added.update(self._pending_train)
            self._pending_train = {}
        if added:
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and entry.get("step") == state.global_step and set(logs) <= set(entry):
                entry.update(added)  # the Trainer appended a copy of `logs` just before this event
            logs.update(added)  # the dict the integrations after this callback receive, and evaluate() returns

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._eval_open:  # the evaluation log did not come through on_log (a Trainer whose log() skips callbacks)
            added = self._end_eval(state, control, _eval_prefix(metrics or {}) or "eval")
            if metrics is not None:
                metrics.update(added)
            warn(f"{_OWNER}: the evaluation metrics were not logged through on_log; its values are in the evaluate() metrics only")

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_eval()

    # ---- the tracker's side ------------------------------------------------------------------
    def _close_eval(self) -> None:
        """End a pass that is not reported (predict, or eval-mode forwards outside evaluate())."""
        if self._eval_open:
            self._eval_open = False
            self.tracker._mode = None  # stop capturing; the next start_eval() resets the evaluation state

    def _start_train_step(self) -> None:
        self._close_eval()
        self.tracker.start_train_step()

    def _end_train_step(self, state: TrainerState, control: TrainerControl) -> None:
        values = self.tracker.end_train_step(self._take_output())
        if values:
            self._pending_train.update({self._logged_key("train", *name.rsplit("/", 1), ""): float(v) for name, v in values.items()})
            self._check("train", state, control, self._pending_train, "")
            control.should_log = True  # logged at this step, with the Trainer's training log

    def _end_eval(self, state: TrainerState, control: TrainerControl, eval_prefix: str) -> dict[str, Any]:
        self._eval_open = False
        self._last_output = None
        values = self.tracker.end_eval()
        added = {self._logged_key("val", *name.rsplit("/", 1), eval_prefix): float(v) for name, v in values.items()}
        self._check("val", state, control, added, eval_prefix)
        return added

    # ---- stopping ----------------------------------------------------------------------------
    def _verify_metric(self, stage: str, tap: str, metric: str) -> None:
        """Once ``stage`` has been computed for ``tap``, the metric must be one the tracker reports."""
        if (stage, tap) in self._verified:
            return
        names = self.tracker.metric_names(stage)
        if tap not in names:
            return  # nothing captured yet: the tracker warns about that
        self._verified.add((stage, tap))
        if metric not in names[tap]:
            named = "eval" if stage == "val" else "train"
            existing = [f"{self.prefix}/{named}/{tap}/{m}" for m in names[tap]]
            wanted = f"{self.prefix}/{named}/{tap}/{metric}"
            close = difflib.get_close_matches(wanted, existing, n=3, cutoff=0.5)
            raise MonitorConfigurationError(
                f"{_OWNER}: stop_on {wanted!r}: the tracker does not compute {metric!r} for tap {tap!r}; it computes"
                f" {', '.join(map(repr, existing))}" + (f" (closest: {', '.join(map(repr, close))})" if close else "")
            )

    def _check(self, stage: str, state: TrainerState, control: TrainerControl, logs: dict[str, Any], eval_prefix: str) -> None:
        for i, (key_stage, tap, metric, criteria) in enumerate(self._stoppers):
            if key_stage != stage:
                continue
            self._verify_metric(stage, tap, metric)
            history = self.tracker.history.get(f"{stage}/{tap}/{metric}", [])
            if len(history) <= self._history_seen[i]:
                continue  # withheld this time (too few samples): no check
            self._history_seen[i] = len(history)
            spread = self.tracker.history.get(f"{stage}/{tap}/normalized_std")
            stop, reason = criteria.check(
                history[-1][1], criteria.dim or self.tracker.num_features.get(tap), spread[-1][1] if spread else None, self.tracker.reports.get((stage, tap))
            )
            if stop:
                self._stop(stage, state, control, logs, eval_prefix, reason)
        for i, guard in enumerate(self._guards):
            if guard.stage != stage:
                continue
            for metric in guard.metrics:
                self._verify_metric(stage, guard.tap, metric)
            history = self.tracker.history.get(f"{stage}/{guard.tap}/rankme", [])
            if len(history) <= self._guard_seen[i]:
                continue
            self._guard_seen[i] = len(history)
            values = {key: self.tracker.history[f"{stage}/{key}"][-1][1] for key in guard.keys() if self.tracker.history.get(f"{stage}/{key}")}
            decision = guard.check_values(values, self.tracker.num_features)
            if decision.stop:
                self._stop(stage, state, control, logs, eval_prefix, decision.reason)

    def _stop(self, stage: str, state: TrainerState, control: TrainerControl, logs: dict[str, Any], eval_prefix: str, reason: str) -> None:
        if not control.should_training_stop:
            control.should_training_stop = True
            self.stopping_reason, self.stopped_step = reason, state.global_step
            logger.warning(reason)
            logs[f"{eval_prefix}_{self.prefix}/stop_reason" if stage == "val" else f"{self.prefix}/stop_reason"] = reason

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The tracker's clock and history and each criterion's state (for resuming by hand)."""
        return {
            "tracker": self.tracker.state_dict(),
            "criteria": [c.state_dict() for *_, c in self._stoppers],
            "guards": [g.state_dict() for g in self._guards],
            "guard_seen": list(self._guard_seen),
            "history_seen": list(self._history_seen),
            "stopping_reason": self.stopping_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        for (*_, criteria), saved in zip(self._stoppers, state.get("criteria", [])):
            criteria.load_state_dict(saved)
        self._history_seen = list(state.get("history_seen", self._history_seen))
        for guard, saved in zip(self._guards, state.get("guards", [])):
            guard.load_state_dict(saved)
        self._guard_seen = list(state.get("guard_seen", self._guard_seen))
        self.stopping_reason = state.get("stopping_reason")


def _eval_prefix(logs: Mapping[str, Any]) -> str | None:
    """The ``metric_key_prefix`` of an evaluation log (``"eval"``, ``"eval_{name}"``), else ``None``.

    ``Trainer.evaluate`` always adds ``{prefix}_runtime`` and ``{prefix}_samples_per_second``.
    """
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            prefix = key[: -len("_runtime")]
            if f"{prefix}_samples_per_second" in logs:
                return prefix
    return None
