"""The framework-agnostic core of monitoring: :class:`RepresentationTracker` (schedule, counts, results).

It captures embeddings through :class:`reprmetrics.taps.Capture`, feeds them to one
:class:`reprmetrics.tap_metrics.TapMetrics` per tap and stage, and gives each computation as a
:class:`reprmetrics.results.TrackerResult` — returned as ``{"tap/metric": value}`` and published to
subscribers (:meth:`RepresentationTracker.subscribe`): the Lightning and Hugging Face adapters log
from it and the guard in :mod:`reprmetrics.stopping` decides from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric

from reprmetrics._warnings import warn
from reprmetrics.metric_set import MetricSet
from reprmetrics.registry import MONITOR_MAX_SAMPLES, MonitorConfigurationError, check_metric_choice
from reprmetrics.results import CaptureReport, TrackerResult
from reprmetrics.tap_metrics import MetricChoice, TapMetrics
from reprmetrics.taps import OWNER, Capture, Tap
from reprmetrics.train_window import TrainWindow

__all__ = ["DEFAULT_MIN_SAMPLES", "RepresentationTracker"]

# Below this many usable samples a tap's values are not reported: 4 samples gave RankMe 3.5, a false
# collapse. 64 is max(2k + 2, 64) for the LID default k = 20; a metric's own minimum still applies.
DEFAULT_MIN_SAMPLES = 64


class RepresentationTracker:
    """Captures embeddings at taps and computes representation metrics on a schedule.

    A plain PyTorch loop (the README has a complete, tested one)::

        tracker = RepresentationTracker(["backbone"], every_n_train_steps=50)
        tracker.attach(model)
        for batch in loader:
            tracker.start_train_step()
            loss = model(batch).loss; loss.backward(); opt.step()
            values = tracker.end_train_step()      # {"backbone/rankme": tensor, ...} on scheduled steps
        tracker.start_eval()
        for batch in val_loader:
            model(batch)
            tracker.end_eval_step()
        values = tracker.end_eval()                # over the whole evaluation pass

    Capture never changes training: forward hooks only read (and ``detach``) outputs, nothing uses the
    global random generator, and every computation runs under ``torch.no_grad``. Each computation is
    also a :class:`~reprmetrics.results.TrackerResult`, in :attr:`last_result` and sent to every
    function given to :meth:`subscribe`.

    Args:
        taps: tap names or :class:`~reprmetrics.taps.Tap` objects. A name is a submodule of the model or
            a key of the dict the training/validation step returns; one that is neither by the end of
            the first training step (or evaluation pass) that could have produced it raises
            :class:`MonitorConfigurationError` with the closest submodule names and output keys.
        num_views: views per sample q (LiDAR and alignment need q ≥ 2).
        every_n_train_steps: compute training-stage metrics every this many training steps (0: never).
            A step is one training batch (with gradient accumulation, not an optimizer step).
        train_buffer_size: the training-stage metrics read the most recent this many samples per tap,
            captured over the steps just before a scheduled step; the first computation waits until
            the buffer is full (every step captures until then).
        max_samples: cap on the points kept by point-based metrics (uniformity, LID) per computation
            (8,192: they cost O(N²·D) and run at every evaluation).
        metrics: extra metrics: names from :func:`reprmetrics.registry.available_metrics` (opt-in
            ones such as ``["sigreg", "twonn"]``), or ``{name: Metric}`` cloned for every tap and stage.
        default_metrics: include the default set (see :func:`reprmetrics.registry.default_metrics`).
        strict: raise instead of warning once and skipping a metric that cannot be computed.
        view_layout: how the q views of a step arrive: ``"calls"``, ``"concat"``, ``"stacked"`` or
            ``"auto"`` (see :func:`reprmetrics.views.group_views`).
        min_samples: a tap's metric values are reported only when at least this many samples reached
            them; ``num_samples`` is reported always.
        reference: drift from a reference representation, reported as ``cka_to_reference`` at the val
            stage: ``"initial"`` (a frozen copy of each tapped submodule at :meth:`attach`), an
            ``nn.Module`` with the same submodule names, or a path to a state dict (read with
            ``weights_only=True``). Output-key taps read the reference from the key ``"{tap}_reference"``.
        rankme_diagnostics: also report RankMe's top singular value and condition number.
        owner: the name messages give (the adapters pass their class name).

    Reported per tap and stage, besides the metrics: ``alpha_req_r2``, ``num_samples`` and
    ``nonfinite_fraction``. When any captured sample is non-finite the run has diverged: every metric
    of that tap and stage is reported as NaN.
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
        view_layout: str = "auto",
        min_samples: int = DEFAULT_MIN_SAMPLES,
        reference: str | os.PathLike | nn.Module | None = None,
        rankme_diagnostics: bool = False,
        owner: str = OWNER,
    ) -> None:
        self.owner = owner
        taps = [taps] if isinstance(taps, (str, Tap)) else list(taps)
        self.taps = [t if isinstance(t, Tap) else Tap(t) for t in taps]
        self._check_arguments(num_views, every_n_train_steps, train_buffer_size, max_samples, min_samples)
        self.capture = Capture(self.taps, num_views, view_layout, reference, owner)  # checked before the metrics
        self.named_metrics, self.extra_metrics = check_metric_choice(metrics, default_metrics, owner)
        self.num_views, self.view_layout = num_views, view_layout
        self.every_n_train_steps, self.train_buffer_size = every_n_train_steps, train_buffer_size
        self.max_samples, self.min_samples = max_samples, min_samples
        self.use_default_metrics = default_metrics
        self.strict = strict
        self.reference = reference
        self.rankme_diagnostics = bool(rankme_diagnostics)
        choice = MetricChoice(
            default_metrics, tuple(self.named_metrics), self.extra_metrics, max_samples, self.rankme_diagnostics
        )

        self.train_steps = 0  # training steps seen (the schedule's clock)
        self.epoch = 0  # advanced by end_train_epoch(); warnings about empty captures are once per epoch
        self.eval_passes = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.reports: dict[tuple[str, str], CaptureReport] = {}
        self.last_result: TrackerResult | None = None
        self._subscribers: list[Callable[[TrackerResult], None]] = []
        self._warned: set[str] = set()
        self._tap_metrics = {
            (stage, t.name): TapMetrics(stage, t.name, choice, owner, strict, self._warned, warn)
            for stage in ("train", "val")
            for t in self.taps
        }
        self.window = TrainWindow([t.name for t in self.taps], every_n_train_steps, train_buffer_size)

    def _check_arguments(self, num_views: int, every: int, buffer: int, max_samples: int, min_samples: int) -> None:
        owner = self.owner
        if not self.taps:
            raise MonitorConfigurationError(f"{owner}: give at least one tap")
        if len({t.name for t in self.taps}) != len(self.taps):
            raise MonitorConfigurationError(f"{owner}: tap names must be unique")
        for value, name, low in (
            (num_views, "num_views", 1),
            (every, "every_n_train_steps", 0),
            (buffer, "train_buffer_size", 2),
            (max_samples, "max_samples", 2),
            (min_samples, "min_samples", 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MonitorConfigurationError(f"{owner}: `{name}` must be an integer >= {low}, got {value!r}")
        if every > 0 and buffer < min_samples:  # every training-stage value would be withheld
            raise MonitorConfigurationError(
                f"{owner}: train_buffer_size={buffer} is below min_samples={min_samples}, so no training-stage value"
                " could ever be reported: raise train_buffer_size, lower min_samples, or set every_n_train_steps=0"
            )

    # ---- attaching and subscribing -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register forward hooks on the module taps (idempotent; replaces earlier hooks)."""
        self.capture.attach(model)

    def retake_reference(self, model: nn.Module) -> None:
        """Take the reference copies again from ``model``: adapters call this when training starts, after
        the framework has synchronised the weights across ranks."""
        self.capture.retake_reference(model)

    def detach(self) -> None:
        """Remove the forward hooks."""
        self.capture.detach()

    def subscribe(self, receive: Callable[[TrackerResult], None]) -> Callable[[], None]:
        """Call ``receive(result)`` after every computation (every rank, the same result); returns an unsubscribe."""
        self._subscribers.append(receive)
        return lambda: self._subscribers.remove(receive) if receive in self._subscribers else None

    @property
    def expect_eval(self) -> bool:
        """Set by an adapter that knows an evaluation pass will come (an output tap missing from the
        training outputs may still appear in the evaluation outputs)."""
        return self.capture.expect_eval

    @expect_eval.setter
    def expect_eval(self, value: bool) -> None:
        self.capture.expect_eval = bool(value)

    @property
    def num_features(self) -> dict[str, int]:
        """``{tap: D}`` of the taps seen so far."""
        return self.capture.num_features

    def observe(self, outputs: Any, stage: str = "train") -> None:
        """Read output taps from what a step returned; keys are recorded even when not capturing."""
        self.capture.observe(outputs, stage)

    def check_taps(self, stage: str) -> None:
        """Raise for taps that are neither submodules nor step-output keys (the step ends call it)."""
        if stage == "eval" or self.eval_passes:
            self.capture.expect_eval = False  # the evaluation pass has come: a tap still missing is an error
        self.capture.check_taps(stage)

    # ---- training ------------------------------------------------------------------------------------
    def start_train_step(self) -> bool:
        """Call before each training step; returns whether this step captures embeddings
        (:meth:`TrainWindow.captures <reprmetrics.train_window.TrainWindow.captures>`)."""
        capture = self.window.captures(self.train_steps)
        self.capture.start("train" if capture else None)
        return capture

    def end_train_step(self, outputs: Any = None) -> dict[str, Tensor] | None:
        """Call after each training step, with what the step returned when output taps are used.

        Returns ``{"tap/metric": value}`` on scheduled steps (every ``every_n_train_steps``), else None.
        """
        self.capture.raise_error()
        self.observe(outputs, "train")
        self.check_taps("train")
        result = None
        if self.capture.mode == "train":
            for tap, (views, _) in self.capture.group(
                lambda tap, samples, why: self._count_dropped("train", tap, samples, why)
            ).items():
                self.window.add(tap, views)
            self.capture.start(None)
            self.capture.hint_at_views(self._warned)
            if (self.train_steps + 1) % self.every_n_train_steps == 0:
                result = self._compute_train()
        self.train_steps += 1
        return result

    def end_train_epoch(self) -> None:
        """Call at the end of each training epoch: warns about taps that captured nothing in it, and
        about training-stage values still waiting for a full buffer."""
        for tap, held in self.window.unfilled().items():
            if f"filling/train/{tap}" not in self._warned:
                self._warned.add(f"filling/train/{tap}")
                warn(
                    f"{self.owner}: tap {tap!r}: no training-stage values yet: they start once its buffer holds"
                    f" train_buffer_size={self.train_buffer_size} samples, and it holds {held} after epoch"
                    f" {self.epoch}. Lower train_buffer_size for small datasets"
                )
        steps, silent = self.window.end_epoch()
        for tap in (t for t in self.taps if t.name in silent):
            warn(
                f"{self.owner}: tap {tap.name!r} captured nothing during the {steps} capturing training steps of"
                f" epoch {self.epoch} ({self.capture.nothing_hint(tap.name, 'train')}); no train-stage values for it"
            )
        self.epoch += 1

    def _count_dropped(self, stage: str, tap: str, samples: int, reason: str) -> None:
        if stage == "train":
            self.window.dropped[tap] += samples
        else:
            self._tap_metrics[("val", tap)].counts.update(dropped=samples)
        key = f"dropped/{stage}/{tap}"
        if key not in self._warned:
            self._warned.add(key)
            warn(
                f"{self.owner}: tap {tap!r} ({stage}): {reason}; such batches are left out and counted (see"
                " num_samples)"
            )

    # ---- evaluation ----------------------------------------------------------------------------------
    def start_eval(self) -> None:
        """Call before an evaluation pass: metrics stream over all of its batches."""
        for tap in self.taps:
            self._tap_metrics[("val", tap.name)].reset()
        self.capture.clear()
        self.capture.start("eval")

    def abandon_eval(self) -> None:
        """Stop capturing an evaluation pass that will not be computed (the next :meth:`start_eval` resets it)."""
        if self.capture.mode == "eval":
            self.capture.start(None)

    def end_eval_step(self, outputs: Any = None) -> None:
        """Call after each evaluation batch, with what the step returned when output taps are used."""
        self.capture.raise_error()
        self.observe(outputs, "eval")
        if self.capture.mode != "eval":
            return
        for tap, (views, reference) in self.capture.group(
            lambda tap, samples, why: self._count_dropped("val", tap, samples, why)
        ).items():
            self._tap_metrics[("val", tap)].feed(views)
            if reference is not None:
                self._tap_metrics[("val", tap)].feed_drift(views, reference)
        self.capture.hint_at_views(self._warned)

    def end_eval(self) -> dict[str, Tensor]:
        """Values over the whole evaluation pass: ``{"tap/metric": value}``. Every rank must call it."""
        self.capture.raise_error()
        self.capture.start(None)
        self.eval_passes += 1
        self.check_taps("eval")
        return self._publish("val", {k: v for tap in self.taps for k, v in self._compute_tap("val", tap.name).items()})

    # ---- metrics ---------------------------------------------------------------------------------------
    def metric_set(
        self, stage: str, tap: str, views: Tensor | None = None, width: int | None = None, num_views: int | None = None
    ) -> MetricSet:
        """The metrics of ``tap`` at ``stage``, created from the first batch's width and views."""
        if views is not None:
            width, num_views, device = views.shape[-1], views.shape[1], views.device
        else:
            device = self.capture.device()
        return self._tap_metrics[(stage, tap)].metrics(width, num_views, device)

    def metric_sets(self, stage: str) -> dict[str, MetricSet]:
        """``{tap: MetricSet}`` of a stage (``"train"`` or ``"val"``)."""
        return {
            tap: m.metric_set for (st, tap), m in self._tap_metrics.items() if st == stage and m.metric_set is not None
        }

    def metric_names(self, stage: str) -> dict[str, list[str]]:
        """``{tap: [names it reports]}`` for the taps of a stage seen so far, the counts included."""
        with_drift = stage == "val" and self.reference is not None
        return {tap: self._tap_metrics[(stage, tap)].value_names(with_drift) for tap in self.metric_sets(stage)}

    def _compute_train(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for tap in self.taps:
            tap_metrics = self._tap_metrics[("train", tap.name)]
            tap_metrics.counts.reset()
            tap_metrics.counts.to(self.capture.device()).update(fill=self.window.buffers[tap.name].fill())
            if tap_metrics.counts.compute()["fill"] < 1.0:  # synced: every rank waits for a full buffer on every rank
                continue
            views, dropped = self.window.take(tap.name)
            tap_metrics.reset()
            if views is not None:
                tap_metrics.feed(views)
            tap_metrics.counts.update(dropped=dropped)
            values.update(self._compute_tap("train", tap.name))
        return self._publish("train", values)

    def _compute_tap(self, stage: str, tap: str) -> dict[str, Tensor]:
        """One tap's values. The counts are synced first, so every rank takes the same branch."""
        report, values = self._tap_metrics[(stage, tap)].compute(
            self.capture.device(),
            self.min_samples,
            grouping=f"{self.num_views} views (view_layout={self.view_layout!r})",
            nothing=f"validation pass {self.eval_passes} ({self.capture.nothing_hint(tap, stage)})",
            few=self._few_samples_hint(stage),
        )
        self.reports[(stage, tap)] = report
        return values

    def _few_samples_hint(self, stage: str) -> str:
        if stage == "train":
            return (
                f"The training buffer holds {self.train_buffer_size} samples: raise train_buffer_size, or lower"
                " min_samples"
            )
        return "The evaluation set is too small for these metrics: use more evaluation samples, or lower min_samples"

    def _publish(self, stage: str, values: dict[str, Tensor]) -> dict[str, Tensor]:
        for key, value in values.items():
            self.history.setdefault(f"{stage}/{key}", []).append((self.train_steps, float(value)))
        result = TrackerResult(
            stage=stage,
            step=self.train_steps,
            values=dict(values),
            reports={tap: r for (st, tap), r in self.reports.items() if st == stage},
            widths=dict(self.num_features),
            artifacts={tap: dict(s.last_artifacts) for tap, s in self.metric_sets(stage).items()},
            names=self.metric_names(stage),
        )
        self.last_result = result
        for receive in list(self._subscribers):
            receive(result)
        return values

    # ---- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to give the values the uninterrupted run gives: the schedule's
        clock and counters, the training capture buffers (at most ``train_buffer_size`` samples per
        tap, on the CPU), the history of values and the widths seen. Tensors and plain Python values
        only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {
            "train_steps": self.train_steps,
            "epoch": self.epoch,
            "eval_passes": self.eval_passes,
            "history": {k: list(v) for k, v in self.history.items()},
            "num_features": dict(self.num_features),
            **self.window.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (buffers go to the model's device)."""
        self.train_steps = int(state["train_steps"])
        self.epoch = int(state.get("epoch", 0))
        self.eval_passes = int(state.get("eval_passes", self.eval_passes))
        self.history = {k: [tuple(x) for x in v] for k, v in state["history"].items()}
        self.capture.num_features.update(state.get("num_features", {}))
        self.window.load_state_dict(state, self.capture.device())
