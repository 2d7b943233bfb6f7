"""Framework-agnostic representation monitoring: taps, view grouping, schedule and metric sets.

:class:`RepresentationTracker` is what ``reprmetrics.callbacks.RepresentationMonitor`` adapts to
Lightning; it serves a plain PyTorch loop as well::

    tracker = RepresentationTracker(["backbone"], every_n_train_steps=50)
    tracker.attach(model)
    for batch in loader:
        tracker.start_train_step()
        loss = model(batch).loss; loss.backward(); opt.step()
        values = tracker.end_train_step()      # {"backbone/rankme": tensor, ...} on scheduled steps

Capture never changes training: forward hooks only read (and ``detach``) outputs, nothing uses the
global random generator, and every computation runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric

from reprmetrics.collapse import NormalizedStd
from reprmetrics.spectral import AlphaReQ, RankMe

__all__ = ["MetricSet", "RepresentationTracker", "Tap", "default_metrics", "flatten_output", "group_views"]

POINTS, VIEWS, PAIRS = "points", "views", "pairs"


def flatten_output(output: Any) -> Tensor:
    """Default tap reduction: the first tensor of a tuple/list output, flattened to ``(B, D)``.

    Feature maps ``(B, C, H, W)`` and sequences ``(B, T, D)`` are flattened; pass your own ``reduce``
    to a :class:`Tap` to pool them (``lambda y: y.mean((2, 3))``) or select a token (``lambda y: y[:, 0]``).
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise ValueError(f"RepresentationMonitor: a tap produced {type(output).__name__}; give the Tap a `reduce` function returning a (B, D) tensor")
    return output.unsqueeze(1) if output.ndim == 1 else output.flatten(1)


@dataclass
class Tap:
    """Where embeddings come from.

    Args:
        name: a submodule path of the model (``"backbone"``, ``"encoder.layer4"``) or a key of the dict
            that the training/validation step returns.
        source: ``"module"``, ``"output"``, or ``"auto"`` (a module when the model has such a submodule).
        reduce: module taps only: maps the module's output to ``(B, D)`` (default :func:`flatten_output`).
    """

    name: str
    source: str = "auto"
    reduce: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.source not in ("auto", "module", "output"):
            raise ValueError(f"RepresentationMonitor: Tap source must be 'auto', 'module' or 'output', got {self.source!r}")


def group_views(chunks: Sequence[Tensor], num_views: int, tap: str) -> Tensor:
    """``(B, q, D)`` views from the tensors one step produced for one tap.

    With ``num_views = q > 1``: q tensors (q forward calls, or a list of q outputs) are views 1..q in
    call order; a single tensor of ``q·B`` rows is read as q consecutive chunks (view-major, as
    ``torch.cat([view1, view2])`` gives); a ``(B, q, D)`` tensor is taken as is.
    With ``num_views = 1`` every row of every tensor is one sample.
    """
    chunks = [c for c in chunks if c is not None]
    if not chunks:
        raise ValueError(f"RepresentationMonitor: tap {tap!r} captured nothing this step")
    if len(chunks) == 1 and chunks[0].ndim == 3:
        views = chunks[0]
        if views.shape[1] != num_views:
            raise ValueError(f"RepresentationMonitor: tap {tap!r} gave {views.shape[1]} views, num_views={num_views}")
        return views
    if any(c.ndim != 2 for c in chunks):
        raise ValueError(f"RepresentationMonitor: tap {tap!r} must give (B, D), (B, q, D) or q (B, D) tensors, got shapes {[tuple(c.shape) for c in chunks]}")
    if num_views == 1:
        return torch.cat(chunks).unsqueeze(1)
    if len(chunks) == num_views:
        if len({c.shape for c in chunks}) != 1:
            raise ValueError(f"RepresentationMonitor: the {num_views} views of tap {tap!r} differ in shape: {[tuple(c.shape) for c in chunks]}")
        return torch.stack(chunks, dim=1)
    if len(chunks) == 1 and chunks[0].shape[0] % num_views == 0:
        return rearrange(chunks[0], "(q b) d -> b q d", q=num_views)
    raise ValueError(
        f"RepresentationMonitor: tap {tap!r} captured {len(chunks)} tensor(s) of shapes {[tuple(c.shape) for c in chunks]}"
        f" in one step; with num_views={num_views} expected {num_views} calls or one batch of {num_views}·B rows"
    )


def _input_kind(metric: Metric) -> str:
    from reprmetrics.multiview import Alignment, LiDAR

    if isinstance(metric, LiDAR):
        return VIEWS
    if isinstance(metric, Alignment):
        return PAIRS
    return POINTS


def default_metrics(num_features: int, num_views: int, max_samples: int = 8192) -> dict[str, Metric]:
    """The default set for one tap: see :class:`RepresentationTracker`."""
    from reprmetrics.intrinsic_dimension import LocalIntrinsicDimension
    from reprmetrics.multiview import Alignment, LiDAR, Uniformity

    metrics: dict[str, Metric] = {"rankme": RankMe()}
    if num_features >= 13:  # α-ReQ fits ranks 11..100: needs at least 3 of them
        metrics["alpha_req"] = AlphaReQ()
    metrics["normalized_std"] = NormalizedStd()
    metrics["uniformity"] = Uniformity(max_samples=max_samples)
    metrics["lid"] = LocalIntrinsicDimension(max_samples=max_samples)
    if num_views >= 2:
        metrics["lidar"] = LiDAR()
        metrics["alignment"] = Alignment()
    return metrics


class MetricSet:
    """The metrics of one tap and stage: feeds each the input it takes, skips (and warns once about)
    a metric that cannot use a batch or cannot be computed, unless ``strict``.

    Point metrics receive the first view of each sample (views of one sample are near-duplicates
    that would distort neighbourhoods); LiDAR receives all views; Alignment views 1 and 2.
    """

    def __init__(self, metrics: Mapping[str, Metric], label: str, strict: bool, warned: set[str]) -> None:
        self.metrics = dict(metrics)
        self.label = label
        self.strict = strict
        self._warned = warned
        self.last_failures: dict[str, str] = {}

    def _fail(self, name: str, error: Exception) -> None:
        if self.strict:
            raise error
        self.last_failures[name] = str(error)
        key = f"{self.label}/{name}: {type(error).__name__}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"reprmetrics monitor: skipping {self.label}/{name}: {error}", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def update(self, views: Tensor) -> None:
        for name, metric in self.metrics.items():
            kind = _input_kind(metric)
            try:
                if kind == VIEWS:
                    metric.update(views)
                elif kind == PAIRS:
                    metric.update(views[:, 0], views[:, 1])
                else:
                    metric.update(views[:, 0])
            except (ValueError, RuntimeError) as error:
                self._fail(name, error)

    @torch.no_grad()
    def compute(self) -> dict[str, Tensor]:
        """Every computable value (all ranks call this together: metrics sync under DDP)."""
        values = {}
        self.last_failures = {}
        for name, metric in self.metrics.items():
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
                    values[name] = metric.compute().detach()
            except (ValueError, RuntimeError) as error:
                self._fail(name, error)
        return values

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


class _RecentBuffer:
    """The most recent ``capacity`` samples (groups of views), oldest dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: list[Tensor] = []

    def add(self, views: Tensor) -> None:
        self.chunks.append(views)
        stored = sum(len(c) for c in self.chunks)
        while self.chunks and stored - len(self.chunks[0]) >= self.capacity:
            stored -= len(self.chunks.pop(0))

    def take(self) -> Tensor | None:
        if not self.chunks:
            return None
        views = torch.cat(self.chunks)[-self.capacity :]
        self.chunks = []
        return views


class RepresentationTracker:
    """Captures embeddings at taps and computes representation metrics on a schedule.

    Args:
        taps: tap names or :class:`Tap` objects.
        num_views: views per sample q (LiDAR and alignment need q ≥ 2); see :func:`group_views`.
        every_n_train_steps: compute training-stage metrics every this many training steps (0: never).
            A step is one training batch (with gradient accumulation, not an optimizer step). The
            default keeps the overhead on a small CPU model within 5 % (``benchmarks/bench_monitor.py``):
            one computation of the default set on 1,024 samples costs about 20 ms per tap there.
        train_buffer_size: the training-stage metrics read the most recent this many samples per tap,
            captured over the steps just before a scheduled step; other steps capture nothing.
        max_samples: cap on the points kept by point-based metrics (uniformity, LID) per evaluation.
        metrics: extra metrics, ``{name: Metric}``, cloned for every tap and stage; they receive
            ``(B, D)`` embeddings (LiDAR views, Alignment view pairs).
        default_metrics: include RankMe, α-ReQ (D ≥ 13), normalised std, uniformity, local intrinsic
            dimension, and with views LiDAR and alignment.
        strict: raise instead of warning once and skipping a metric that cannot be computed.
    """

    def __init__(
        self,
        taps: Iterable[str | Tap],
        num_views: int = 1,
        every_n_train_steps: int = 200,
        train_buffer_size: int = 1024,
        max_samples: int = 8192,
        metrics: Mapping[str, Metric] | None = None,
        default_metrics: bool = True,
        strict: bool = False,
    ) -> None:
        self.taps = [t if isinstance(t, Tap) else Tap(t) for t in taps]
        if not self.taps:
            raise ValueError("RepresentationMonitor: give at least one tap")
        if len({t.name for t in self.taps}) != len(self.taps):
            raise ValueError("RepresentationMonitor: tap names must be unique")
        for value, name, low in ((num_views, "num_views", 1), (every_n_train_steps, "every_n_train_steps", 0), (train_buffer_size, "train_buffer_size", 2), (max_samples, "max_samples", 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"RepresentationMonitor: `{name}` must be an integer >= {low}, got {value!r}")
        if not default_metrics and not metrics:
            raise ValueError("RepresentationMonitor: no metrics to compute (default_metrics=False and no `metrics`)")
        for name, metric in (metrics or {}).items():
            if not isinstance(metric, Metric):
                raise ValueError(f"RepresentationMonitor: metric {name!r} must be a torchmetrics.Metric, got {type(metric).__name__}")
        self.num_views = num_views
        self.every_n_train_steps = every_n_train_steps
        self.train_buffer_size = train_buffer_size
        self.max_samples = max_samples
        self.extra_metrics = dict(metrics or {})
        self.use_default_metrics = default_metrics
        self.strict = strict

        self.train_steps = 0  # training steps seen (the schedule's clock)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.num_features: dict[str, int] = {}
        self._warned: set[str] = set()
        self._metric_sets: dict[tuple[str, str], MetricSet] = {}
        self._buffers = {t.name: _RecentBuffer(train_buffer_size) for t in self.taps}
        self._captured: dict[str, list[Tensor]] = {t.name: [] for t in self.taps}
        self._batch_size: int | None = None
        self._mode: str | None = None  # "train", "eval" or None (capture off)
        self._handles: list[Any] = []
        self._module_taps: set[str] = set()

    # ---- attaching -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register forward hooks for the module taps (idempotent)."""
        self.detach()
        self._module_taps = set()
        for tap in self.taps:
            try:
                module = model.get_submodule(tap.name)
            except AttributeError:
                module = None
            if tap.source == "module" and module is None:
                raise ValueError(f"RepresentationMonitor: the model has no submodule {tap.name!r}")
            if module is None or tap.source == "output":
                continue
            self._module_taps.add(tap.name)
            self._handles.append(module.register_forward_hook(self._make_hook(tap)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, tap: Tap) -> Callable[..., None]:
        reduce = tap.reduce or flatten_output

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._mode is None:
                return  # off-schedule: costs one attribute read
            with torch.no_grad():
                self._captured[tap.name].append(reduce(output).detach())

        return hook

    # ---- capture ---------------------------------------------------------------------------
    def observe(self, outputs: Any) -> None:
        """Read output taps from the dict a step returned (ignored when not capturing)."""
        if self._mode is None or not isinstance(outputs, Mapping):
            return
        for tap in self.taps:
            if tap.name in self._module_taps or tap.name not in outputs:
                continue
            value = outputs[tap.name]
            if isinstance(value, (list, tuple)):
                self._captured[tap.name].extend(v.detach() for v in value)
            elif isinstance(value, Tensor):
                self._captured[tap.name].append(value.detach())

    def _take_views(self) -> dict[str, Tensor]:
        grouped = {}
        for tap in self.taps:
            chunks, self._captured[tap.name] = self._captured[tap.name], []
            if not chunks:
                continue
            try:
                views = group_views(chunks, self.num_views, tap.name)
            except ValueError as error:
                if self.strict:
                    raise
                key = f"views/{tap.name}"
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(f"reprmetrics monitor: {error}", RuntimeWarning, stacklevel=3)
                continue
            self.num_features[tap.name] = views.shape[-1]
            grouped[tap.name] = views
        return grouped

    # ---- training schedule -----------------------------------------------------------------
    def _capture_window(self) -> int:
        """How many steps before a scheduled step to capture, so the buffer fills with recent samples."""
        if self._batch_size is None:
            return 1
        return max(1, math.ceil(self.train_buffer_size / self._batch_size))

    def start_train_step(self) -> bool:
        """Call before each training step; returns whether this step captures embeddings."""
        n = self.every_n_train_steps
        capture = n > 0 and (self.train_steps % n) >= n - self._capture_window()
        self._mode = "train" if capture else None
        return capture

    def end_train_step(self, outputs: Any = None) -> dict[str, Tensor] | None:
        """Call after each training step; returns ``{"tap/metric": value}`` on scheduled steps."""
        if outputs is not None:
            self.observe(outputs)
        result = None
        if self._mode == "train":
            for tap, views in self._take_views().items():
                self._batch_size = views.shape[0]
                self._buffers[tap].add(views)
            self._mode = None
            if (self.train_steps + 1) % self.every_n_train_steps == 0:
                result = self._compute_stage("train", {tap: buf.take() for tap, buf in self._buffers.items()})
        self.train_steps += 1
        return result

    # ---- evaluation ------------------------------------------------------------------------
    def start_eval(self) -> None:
        """Call before an evaluation pass: metrics stream over all of its batches."""
        for (stage, _), metric_set in self._metric_sets.items():
            if stage == "val":
                metric_set.reset()
        self._mode = "eval"

    def end_eval_step(self, outputs: Any = None) -> None:
        if outputs is not None:
            self.observe(outputs)
        if self._mode != "eval":
            return
        for tap, views in self._take_views().items():
            self.metric_set("val", tap, views).update(views)

    def end_eval(self) -> dict[str, Tensor]:
        """Values over the whole evaluation pass (every rank must call it: metrics sync)."""
        self._mode = None
        values = {}
        for tap in self.taps:
            metric_set = self._metric_sets.get(("val", tap.name))
            if metric_set is None:
                continue
            for name, value in metric_set.compute().items():
                values[f"{tap.name}/{name}"] = value
        self._record("val", values)
        return values

    # ---- metrics ---------------------------------------------------------------------------
    def metric_set(self, stage: str, tap: str, views: Tensor) -> MetricSet:
        key = (stage, tap)
        if key not in self._metric_sets:
            metrics = default_metrics(views.shape[-1], views.shape[1], self.max_samples) if self.use_default_metrics else {}
            metrics.update({name: m.clone() for name, m in self.extra_metrics.items()})
            metrics = {name: m.to(views.device) for name, m in metrics.items()}  # embeddings stay where they are
            self._metric_sets[key] = MetricSet(metrics, f"{stage}/{tap}", self.strict, self._warned)
        return self._metric_sets[key]

    def metric_sets(self, stage: str) -> dict[str, MetricSet]:
        return {tap: s for (st, tap), s in self._metric_sets.items() if st == stage}

    def _compute_stage(self, stage: str, views_by_tap: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        values = {}
        for tap, views in views_by_tap.items():
            if views is None:
                continue
            metric_set = self.metric_set(stage, tap, views)
            metric_set.reset()
            metric_set.update(views)
            for name, value in metric_set.compute().items():
                values[f"{tap}/{name}"] = value
        self._record(stage, values)
        return values

    def _record(self, stage: str, values: Mapping[str, Tensor]) -> None:
        for key, value in values.items():
            self.history.setdefault(f"{stage}/{key}", []).append((self.train_steps, float(value)))

    # ---- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "train_steps": self.train_steps,
            "history": {k: list(v) for k, v in self.history.items()},
            "num_features": dict(self.num_features),
            "batch_size": self._batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.train_steps = int(state["train_steps"])
        self.history = {k: [tuple(x) for x in v] for k, v in state["history"].items()}
        self.num_features = dict(state.get("num_features", {}))
        self._batch_size = state.get("batch_size")
