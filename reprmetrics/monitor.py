"""Framework-agnostic representation monitoring: taps, view layout, schedule, sample counts, metric sets.

:class:`RepresentationTracker` is what ``reprmetrics.callbacks.RepresentationMonitor`` adapts to
Lightning; it serves a plain PyTorch loop as well (the README has a complete, tested loop)::

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
global random generator, and every computation runs under ``torch.no_grad``.

Never silent: a tap that is neither a submodule nor a step-output key, a view layout that does not
match what was captured, or a feature map without a ``reduce`` raises
:class:`MonitorConfigurationError`; a capture that produced nothing, batches that could not be
grouped into views and non-finite embeddings are counted, logged (``num_samples``,
``nonfinite_fraction``) and warned about.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import pickle
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric

from reprmetrics._validation import check_memory
from reprmetrics.metric_set import MetricSet
from reprmetrics.registry import (
    MONITOR_MAX_SAMPLES,
    MetricSpec,
    MonitorConfigurationError,
    available_metrics,
    check_metric_names,
    default_metrics,
)

__all__ = [
    "DEFAULT_MIN_SAMPLES",
    "VIEW_LAYOUTS",
    "MetricSet",
    "MetricSpec",
    "MonitorConfigurationError",
    "RepresentationTracker",
    "Tap",
    "available_metrics",
    "check_metric_names",
    "default_metrics",
    "flatten_output",
    "group_views",
]

VIEW_LAYOUTS = ("auto", "calls", "concat", "stacked")
# Below this many usable samples a tap's values are not reported: 4 samples gave RankMe 3.5, a false
# collapse. 64 is max(2k + 2, 64) for the LID default k = 20; a metric's own minimum still applies.
DEFAULT_MIN_SAMPLES = 64

# Frames in these directories are library code: warnings point at the first frame outside them.
_LIBRARY_DIRS: tuple[str, ...] = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (torch.__file__, __import__("torchmetrics").__file__, os.path.join(os.path.dirname(__file__), "__init__.py"))
)
_LIBRARY_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "transformers", "accelerate")
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep


def register_library_dir(path: str) -> None:
    """Treat frames under ``path`` as library code when warnings look for the user's code (adapters)."""
    global _LIBRARY_DIRS
    _LIBRARY_DIRS = (*_LIBRARY_DIRS, os.path.abspath(path) + os.sep)


def _is_library_frame(filename: str) -> bool:
    filename = os.path.abspath(filename)
    if filename.startswith(_LIBRARY_DIRS):
        return True
    if any(f"{os.sep}{package}{os.sep}" in filename for package in _LIBRARY_PACKAGES):
        return True
    # The standard library (contextlib, threading, ...), but not packages installed beside it.
    return filename.startswith(_STDLIB_DIR) and "site-packages" not in filename


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called right here that points at the user's code.

    Walks out of reprmetrics, torch, torchmetrics, Lightning, transformers and the standard library
    (decorators such as ``torch.no_grad`` add frames in ``torch/utils/_contextlib.py``). Falls back to
    the outermost library frame when every frame is library code.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_library_frame(frame.f_code.co_filename):
        if frame.f_back is None:
            return level
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn with the location of the user's code (see :func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def _closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)


def _quoted(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + f", ... ({len(names)} in all)") if len(names) > limit else (shown or "none")


_FEATURE_MAP_HINT = (
    "pass a `reduce` that gives (B, D) embeddings, e.g. Tap({name!r}, reduce=lambda y: y.mean((2, 3))) to"
    " average-pool a (B, C, H, W) feature map, or Tap({name!r}, reduce=lambda y: y[:, 0]) to take the first"
    " token of a (B, T, D) sequence; to flatten on purpose, Tap({name!r}, reduce=flatten_output)"
    " (from reprmetrics.monitor)"
)


def flatten_output(output: Any) -> Tensor:
    """Explicit flattening: the first tensor of a tuple/list output, flattened to ``(B, D)``.

    Not the default: a (B, 64, 56, 56) feature map would become a 200,704-wide embedding. Pass it as a
    tap's ``reduce`` when that is what you want: ``Tap("layer4", reduce=flatten_output)``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise MonitorConfigurationError(f"RepresentationMonitor: a tap produced {type(output).__name__}; give the Tap a `reduce` function returning a (B, D) tensor")
    return output.unsqueeze(1) if output.ndim == 1 else output.flatten(1)


def _module_embeddings(output: Any, tap: str) -> Tensor:
    """Default ``reduce`` of a module tap: its output (or the first tensor of a tuple) as ``(B, D)``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        keys = list(output.keys())
        raise MonitorConfigurationError(
            f"RepresentationMonitor: module tap {tap!r} returns a mapping with keys {_quoted(keys)}; pick the embeddings"
            f" with a `reduce`, e.g. Tap({tap!r}, reduce=lambda out: out[{keys[0] if keys else 'key'!r}])"
        )
    if not isinstance(output, Tensor):
        raise MonitorConfigurationError(f"RepresentationMonitor: module tap {tap!r} returns {type(output).__name__}; give the Tap a `reduce` returning a (B, D) tensor")
    if output.ndim == 1:
        return output.unsqueeze(1)
    if output.ndim > 2:
        raise MonitorConfigurationError(
            f"RepresentationMonitor: module tap {tap!r} returns a {output.ndim}-D tensor of shape {tuple(output.shape)};"
            f" embeddings must be (B, D): {_FEATURE_MAP_HINT.format(name=tap)}"
        )
    return output


@dataclass
class Tap:
    """Where embeddings come from.

    Args:
        name: a submodule path of the model (``"backbone"``, ``"encoder.layer4"``) or a key of the dict
            that the training/validation step returns.
        source: ``"module"``, ``"output"``, or ``"auto"`` (a module when the model has such a submodule,
            otherwise an output key).
        reduce: maps what the tap captures to ``(B, D)`` embeddings: a module's output (one call) or an
            output key's value (each tensor of a list value separately). Without it a module output
            must already be ``(B, D)`` (or a tuple whose first element is); a 3-D or 4-D output raises
            with the ``reduce`` to use. :func:`flatten_output` flattens on purpose.
    """

    name: str
    source: str = "auto"
    reduce: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MonitorConfigurationError(f"RepresentationMonitor: a tap name must be a non-empty string, got {self.name!r}")
        if self.source not in ("auto", "module", "output"):
            raise MonitorConfigurationError(f"RepresentationMonitor: Tap source must be 'auto', 'module' or 'output', got {self.source!r}")
        if self.reduce is not None and not callable(self.reduce):
            raise MonitorConfigurationError(f"RepresentationMonitor: Tap {self.name!r}: `reduce` must be callable, got {type(self.reduce).__name__}")


def _load_weights(path: str | os.PathLike) -> Mapping[str, Tensor]:
    """A state dict (or a Lightning checkpoint's ``state_dict``) from ``path``, never running pickled code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MonitorConfigurationError(
            f"RepresentationMonitor: cannot load the reference checkpoint {str(path)!r} safely ({first_line[:200]}). It is read with"
            " torch.load(weights_only=True), which never runs pickled code: save only the weights, e.g."
            " torch.save(model.state_dict(), path), or pass the reference model itself as `reference`"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MonitorConfigurationError(
            f"RepresentationMonitor: the reference checkpoint {str(path)!r} holds {type(state).__name__}, not a state dict of tensors;"
            " save it with torch.save(model.state_dict(), path)"
        )
    return state


def _follow_device(copy_: nn.Module, live: nn.Module) -> None:
    """Move a reference copy to the live module's device (Lightning moves the model after attach)."""
    live_tensor = next(iter((*live.parameters(), *live.buffers())), None)
    copy_tensor = next(iter((*copy_.parameters(), *copy_.buffers())), None)
    if live_tensor is not None and copy_tensor is not None and copy_tensor.device != live_tensor.device:
        copy_.to(live_tensor.device)


class _UngroupableBatch(ValueError):
    """A batch that the declared layout cannot split into views (e.g. 63 rows into 2 views)."""

    def __init__(self, message: str, samples: int) -> None:
        super().__init__(message)
        self.samples = samples


def group_views(chunks: Sequence[Tensor], num_views: int, tap: str, layout: str = "auto") -> Tensor:
    """``(B, q, D)`` views from the tensors one step produced for one tap.

    With ``num_views = 1`` every row of every tensor is one sample. With ``num_views = q > 1`` the
    ``layout`` says how views arrive in one step:

    - ``"calls"``: q tensors ``(B, D)``, one per forward call (or a list of q from an output key),
      views 1..q in call order;
    - ``"concat"``: one ``(q·B, D)`` tensor, view-major (``torch.cat([view_1, view_2])``);
    - ``"stacked"``: one ``(B, q, D)`` tensor;
    - ``"auto"``: ``calls`` for q tensors, ``stacked`` for one 3-D tensor. One 2-D tensor is ambiguous
      (a concatenated batch, or a batch without views) and raises: declare the layout.

    Raises :class:`MonitorConfigurationError` when the captured tensors do not match the layout.
    """
    chunks = [c for c in chunks if c is not None]
    if not chunks:
        raise MonitorConfigurationError(f"RepresentationMonitor: tap {tap!r} captured nothing this step")
    shapes = [tuple(c.shape) for c in chunks]
    if num_views == 1:
        if any(c.ndim != 2 for c in chunks):
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r} captured tensors of shapes {shapes} with num_views=1; each must be (B, D):"
                f" {_FEATURE_MAP_HINT.format(name=tap)}, or set num_views if a (B, q, D) tensor holds views"
            )
        return torch.cat(chunks).unsqueeze(1)
    q = num_views
    if layout == "auto":
        if len(chunks) == q and all(c.ndim == 2 for c in chunks):
            layout = "calls"
        elif len(chunks) == 1 and chunks[0].ndim == 3:
            layout = "stacked"
        elif len(chunks) == 1 and chunks[0].ndim == 2:
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r} captured one {shapes[0]} tensor per step with num_views={q}: ambiguous."
                f" Pass view_layout='concat' if it is torch.cat([view_1, ..., view_{q}]) (view-major), or num_views=1 if its"
                " rows are distinct samples"
            )
        else:
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r} captured {len(chunks)} tensor(s) of shapes {shapes} in one step; with"
                f" num_views={q} expected {q} forward calls (view_layout='calls'), one (B, {q}, D) tensor ('stacked') or one"
                f" ({q}·B, D) tensor ('concat')"
            )
    if layout == "calls":
        if len(chunks) != q or any(c.ndim != 2 for c in chunks):
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r}: view_layout='calls' expects {q} (B, D) tensors per step (one per forward"
                f" call, or a list of {q}), got {len(chunks)} of shapes {shapes}"
            )
        if len(set(shapes)) != 1:
            raise MonitorConfigurationError(f"RepresentationMonitor: the {q} views of tap {tap!r} differ in shape: {shapes}")
        return torch.stack(chunks, dim=1)
    if layout == "stacked":
        if len(chunks) != 1 or chunks[0].ndim != 3 or chunks[0].shape[1] != q:
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r}: view_layout='stacked' expects one (B, {q}, D) tensor per step, got shapes {shapes}"
            )
        return chunks[0]
    if layout == "concat":
        if len(chunks) != 1 or chunks[0].ndim != 2:
            raise MonitorConfigurationError(
                f"RepresentationMonitor: tap {tap!r}: view_layout='concat' expects one ({q}·B, D) tensor per step, got"
                f" {len(chunks)} of shapes {shapes}"
            )
        rows = chunks[0].shape[0]
        if rows % q:
            raise _UngroupableBatch(f"a batch of {rows} rows cannot be split into {q} views", samples=rows // q)
        return rearrange(chunks[0], "(q b) d -> b q d", q=q)
    raise MonitorConfigurationError(f"RepresentationMonitor: `view_layout` must be one of {VIEW_LAYOUTS}, got {layout!r}")


class _CaptureCounts(Metric):
    """Samples used, non-finite and dropped (ungroupable), width and views: sum/max-reduced across ranks,
    so every rank makes the same report-or-withhold decision."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("used", "nonfinite", "dropped"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("width", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("views", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("reference_width", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        # The least-filled training buffer of the ranks that captured anything (1: full, or nothing captured).
        self.add_state("fill", torch.tensor(1.0, dtype=torch.float64), dist_reduce_fx="min")

    def update(
        self, used: int | Tensor = 0, nonfinite: int | Tensor = 0, dropped: int = 0, width: int = 0, views: int = 0,
        reference_width: int = 0, fill: float = 1.0,
    ) -> None:
        self.used += used
        self.nonfinite += nonfinite
        self.dropped += dropped
        self.width.clamp_(min=float(width))
        self.views.clamp_(min=float(views))
        self.reference_width.clamp_(min=float(reference_width))
        self.fill.clamp_(max=float(fill))

    def compute(self) -> Tensor:
        return torch.stack([self.used, self.nonfinite, self.dropped, self.width, self.views, self.reference_width, self.fill])


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

    def recent(self) -> Tensor | None:
        """The most recent ``capacity`` samples (kept: the next computation reads the most recent again)."""
        if not self.chunks:
            return None
        views = torch.cat(self.chunks)[-self.capacity :]
        self.chunks = [views]
        return views

    def fill(self) -> float:
        """Stored samples over capacity, at most 1; 1 when empty (a rank that captured nothing waits for no one)."""
        stored = sum(len(c) for c in self.chunks)
        return 1.0 if stored == 0 else min(1.0, stored / self.capacity)

    def state(self) -> Tensor | None:
        return self.recent()

    def load(self, views: Tensor | None) -> None:
        self.chunks = [] if views is None else [views]


class RepresentationTracker:
    """Captures embeddings at taps and computes representation metrics on a schedule.

    Args:
        taps: tap names or :class:`Tap` objects. A name is a submodule of the model or a key of the
            dict the training/validation step returns; one that is neither by the end of the first
            training step (or evaluation pass) that could have produced it raises
            :class:`MonitorConfigurationError` with the closest submodule names and output keys.
        num_views: views per sample q (LiDAR and alignment need q ≥ 2).
        view_layout: how the q views of a step arrive: ``"calls"``, ``"concat"``, ``"stacked"`` or
            ``"auto"`` (see :func:`group_views`); captures that do not match raise.
        every_n_train_steps: compute training-stage metrics every this many training steps (0: never).
            A step is one training batch (with gradient accumulation, not an optimizer step). The
            default keeps the overhead on a small CPU model within 5 % (``benchmarks/bench_monitor.py``):
            one computation of the default set on 1,024 samples costs about 20 ms per tap there.
        train_buffer_size: the training-stage metrics read the most recent this many samples per tap,
            captured over the steps just before a scheduled step; other steps capture nothing.
        max_samples: cap on the points kept by point-based metrics (uniformity, LID) per evaluation.
            8,192, below the Metric classes' 25,600: the monitor computes every validation epoch, and
            those metrics cost O(N²·D).
        min_samples: a tap's metric values are reported only when at least this many samples (after
            dropping ungroupable batches and non-finite samples) reached them; ``num_samples`` is
            reported always. Each metric's own minimum (e.g. k + 1 for LID) applies on top.
        metrics: extra metrics: names from :func:`available_metrics` (opt-in ones such as
            ``["sigreg", "twonn"]``), or ``{name: Metric}`` cloned for every tap and stage (they receive
            ``(B, D)`` embeddings; LiDAR views, Alignment view pairs).
        default_metrics: include the default set (see :func:`default_metrics`): RankMe, α-ReQ
            (D ≥ 13), normalised std, uniformity, local intrinsic dimension, NESum, coding rate,
            Wasserstein uniformity, IsoScore, and with views LiDAR and alignment.
        strict: raise instead of warning once and skipping a metric that cannot be computed.
        rankme_diagnostics: also report RankMe's top singular value and condition number
            (``rankme_top_singular_value``, ``rankme_condition_number``; same eigendecomposition).
        reference: drift from a reference representation, logged as ``cka_to_reference`` (linear CKA
            over the whole evaluation pass, val stage only): ``"initial"`` keeps a frozen copy (eval
            mode, no grad) of each tapped submodule as it is at :meth:`attach` (Lightning: at the start
            of each fit, after the weights are synchronised across ranks; a resumed fit copies the
            resumed weights, so pass the pretrained module or checkpoint to keep the original);
            an ``nn.Module`` with the same submodule names (e.g. the pretrained model), or a path to a
            ``torch.save``-d state dict or Lightning checkpoint of the same model class, gives the
            reference weights. At each evaluation step the copy runs on the inputs the live submodule
            received (its forward hook sees them). Memory: one copy of each tapped submodule's
            parameters and buffers, on the live module's device; time: one extra forward of the tapped
            submodules per evaluation batch. Output-key taps read the reference embeddings from the
            key ``"{tap}_reference"`` of the same step output (same rows, same layout).

    Reported per tap and stage, besides the metrics: ``alpha_req_r2`` (the R² of α-ReQ's log-log fit:
    near 1, α describes the spectrum; much lower, it does not), ``num_samples`` (samples the metrics used) and
    ``nonfinite_fraction`` (of the samples captured, those with a NaN/inf value). When any captured
    sample is non-finite the run has diverged: every metric of that tap and stage is reported as NaN.
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
    ) -> None:
        if isinstance(taps, (str, Tap)):
            taps = [taps]
        self.taps = [t if isinstance(t, Tap) else Tap(t) for t in taps]
        if not self.taps:
            raise MonitorConfigurationError("RepresentationMonitor: give at least one tap")
        if len({t.name for t in self.taps}) != len(self.taps):
            raise MonitorConfigurationError("RepresentationMonitor: tap names must be unique")
        for value, name, low in (
            (num_views, "num_views", 1),
            (every_n_train_steps, "every_n_train_steps", 0),
            (train_buffer_size, "train_buffer_size", 2),
            (max_samples, "max_samples", 2),
            (min_samples, "min_samples", 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MonitorConfigurationError(f"RepresentationMonitor: `{name}` must be an integer >= {low}, got {value!r}")
        if view_layout not in VIEW_LAYOUTS:
            close = _closest(str(view_layout), VIEW_LAYOUTS)
            raise MonitorConfigurationError(f"RepresentationMonitor: `view_layout` must be one of {VIEW_LAYOUTS}, got {view_layout!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if view_layout in ("concat", "stacked") and num_views == 1:
            raise MonitorConfigurationError(f"RepresentationMonitor: view_layout={view_layout!r} needs num_views >= 2")
        if isinstance(metrics, str):
            metrics = [metrics]
        self.named_metrics = [] if metrics is None or isinstance(metrics, Mapping) else check_metric_names(metrics)
        metrics = metrics if isinstance(metrics, Mapping) else None
        if reference is not None and not isinstance(reference, (str, os.PathLike, nn.Module)):
            raise MonitorConfigurationError(f"RepresentationMonitor: `reference` must be 'initial', an nn.Module or a checkpoint path, got {type(reference).__name__}")
        if isinstance(reference, str) and reference != "initial" and not os.path.exists(reference):
            raise MonitorConfigurationError(f"RepresentationMonitor: `reference` is neither 'initial' nor an existing checkpoint file: {reference!r}")
        if not default_metrics and not metrics and not self.named_metrics:
            raise MonitorConfigurationError("RepresentationMonitor: no metrics to compute (default_metrics=False and no `metrics`)")
        for name, metric in (metrics or {}).items():
            if not isinstance(metric, Metric):
                raise MonitorConfigurationError(f"RepresentationMonitor: metric {name!r} must be a torchmetrics.Metric, got {type(metric).__name__}")
        self.num_views = num_views
        self.view_layout = view_layout
        self.every_n_train_steps = every_n_train_steps
        self.train_buffer_size = train_buffer_size
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.extra_metrics = dict(metrics or {})
        self.use_default_metrics = default_metrics
        self.strict = strict
        self.reference = reference
        self.rankme_diagnostics = bool(rankme_diagnostics)
        # Set by an adapter that knows an evaluation pass will come (Lightning: validation_step exists):
        # an output tap missing from the training outputs may still appear in the evaluation outputs.
        self.expect_eval = False

        self.train_steps = 0  # training steps seen (the schedule's clock)
        self.epoch = 0  # advanced by end_train_epoch(); warnings about empty captures are once per epoch
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.num_features: dict[str, int] = {}
        self.reports: dict[tuple[str, str], CaptureReport] = {}
        self._warned: set[str] = set()
        self._metric_sets: dict[tuple[str, str], MetricSet] = {}
        self._counts = {(stage, t.name): _CaptureCounts() for stage in ("train", "val") for t in self.taps}
        self._buffers = {t.name: _RecentBuffer(train_buffer_size) for t in self.taps}
        self._captured: dict[str, list[Tensor]] = {t.name: [] for t in self.taps}
        self._train_dropped = {t.name: 0 for t in self.taps}
        self._epoch_train_captures = {t.name: 0 for t in self.taps}
        self._epoch_capture_steps = 0
        self._batch_size: int | None = None
        self._mode: str | None = None  # "train", "eval" or None (capture off)
        self._capture_thread = threading.get_ident()  # captures come from the thread that starts the step
        self._handles: list[Any] = []
        self._module_taps: set[str] = set()
        self._submodule_names: list[str] = []
        self._model: nn.Module | None = None
        self._found: set[str] = set()  # taps known to exist (a submodule, or a key seen in a step output)
        self._output_keys: dict[str, set[str]] = {"train": set(), "eval": set()}
        self._steps_seen = {"train": 0, "eval": 0}
        self._taps_checked = False
        self._capture_error: MonitorConfigurationError | None = None
        self.eval_passes = 0
        self._reference_modules: dict[str, nn.Module] = {}
        self._reference_captured: dict[str, list[Tensor]] = {t.name: [] for t in self.taps}
        self._drift: dict[str, Metric] = {}

    # ---- attaching -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register forward hooks on the module taps (idempotent; replaces earlier hooks).

        A tap with ``source="module"`` that the model lacks raises :class:`MonitorConfigurationError`
        naming the closest submodules; ``"auto"`` taps that are not submodules become output taps.
        """
        self.detach()
        self._model = model
        self._module_taps = set()
        self._submodule_names = [name for name, _ in model.named_modules() if name]
        if self.reference is not None and not self._reference_modules:
            self._reference_modules = self._reference_submodules(model)  # before our hooks exist: copies carry none
        for tap in self.taps:
            try:
                module = model.get_submodule(tap.name)
            except AttributeError:
                module = None
            if tap.source == "module" and module is None:
                close = _closest(tap.name, self._submodule_names)
                raise MonitorConfigurationError(
                    f"RepresentationMonitor: the model has no submodule {tap.name!r}; closest submodules: {_quoted(close)}"
                )
            if module is None or tap.source == "output":
                continue
            self._module_taps.add(tap.name)
            self._found.add(tap.name)
            self._handles.append(module.register_forward_hook(self._make_hook(tap, module), with_kwargs=True))

    def retake_reference(self, model: nn.Module) -> None:
        """Take the reference copies again from ``model`` (and re-attach): adapters call this when
        training starts, after the framework has synchronised the weights across ranks."""
        self._reference_modules = {}
        self.attach(model)

    def _reference_submodules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Frozen copies of the tapped submodules: of ``model`` now, or of the given reference."""
        if isinstance(self.reference, nn.Module):
            source = self.reference
        elif self.reference == "initial":
            source = model
        else:
            state = _load_weights(self.reference)
            source = copy.deepcopy(model)
            try:
                source.load_state_dict(state)
            except (RuntimeError, TypeError) as error:
                raise MonitorConfigurationError(f"RepresentationMonitor: the reference checkpoint {str(self.reference)!r} does not fit the model: {error}") from error
        names = [name for name, _ in source.named_modules() if name]
        frozen = {}
        for tap in self.taps:
            try:
                module = model.get_submodule(tap.name)
            except AttributeError:
                continue  # an output tap: its reference comes from the step output
            try:
                reference = source.get_submodule(tap.name) if source is not model else module
            except AttributeError:
                raise MonitorConfigurationError(
                    f"RepresentationMonitor: the reference model has no submodule {tap.name!r}; closest: {_quoted(_closest(tap.name, names))}"
                ) from None
            frozen[tap.name] = copy.deepcopy(reference).eval().requires_grad_(False)
        return frozen

    def detach(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, tap: Tap, attached: nn.Module) -> Callable[..., None]:
        # A deep copy of the model (an EMA teacher) copies its forward hooks too; they must not capture.
        owner = weakref.ref(attached)

        def embed(output: Any) -> Tensor:
            embeddings = tap.reduce(output) if tap.reduce is not None else _module_embeddings(output, tap.name)
            if not isinstance(embeddings, Tensor):
                raise MonitorConfigurationError(f"RepresentationMonitor: the `reduce` of tap {tap.name!r} returned {type(embeddings).__name__}, not a tensor")
            return embeddings.detach()

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self._mode is None or self._capture_error is not None:
                return  # off-schedule: costs one attribute read
            if threading.get_ident() != self._capture_thread:
                self._capture_error = MonitorConfigurationError(
                    f"RepresentationMonitor: tap {tap.name!r} ran in another thread than the training loop (e.g. torch.nn.DataParallel);"
                    " the order of captured views would depend on thread timing. Use DistributedDataParallel (one process per device)"
                )
                return
            if module is not owner():
                return  # a copy of the attached module (deepcopy carries hooks): not the monitored model
            with torch.no_grad():
                try:
                    self._captured[tap.name].append(embed(output))
                    reference = self._reference_modules.get(tap.name)
                    if reference is not None and self._mode == "eval":
                        _follow_device(reference, module)
                        self._reference_captured[tap.name].append(embed(reference(*args, **kwargs)))
                except MonitorConfigurationError as error:
                    self._capture_error = error  # raised from the next end_*_step, outside the model's forward

        # Under torch.compile the hook runs eagerly (a graph break): it reads Python state and threads.
        return torch.compiler.disable(hook)

    # ---- capture ---------------------------------------------------------------------------
    def observe(self, outputs: Any, stage: str = "train") -> None:
        """Read output taps from what a step returned (``stage``: ``"train"`` or ``"eval"``).

        Keys are recorded even when not capturing, so a misspelt tap is caught at the first step.
        """
        self._steps_seen[stage] += 1
        if isinstance(outputs, Mapping):
            if not self._taps_checked:
                self._output_keys[stage].update(str(k) for k in outputs.keys())
                self._found.update(t.name for t in self.taps if t.name in outputs)
        if self._mode is None or not isinstance(outputs, Mapping):
            return
        for tap in self.taps:
            if tap.name in self._module_taps or tap.name not in outputs:
                continue
            self._captured[tap.name].extend(self._output_tensors(tap, outputs[tap.name], tap.name))
            if self.reference is not None and self._mode == "eval":
                key = f"{tap.name}_reference"
                if key not in outputs:
                    raise MonitorConfigurationError(
                        f"RepresentationMonitor: with `reference`, output tap {tap.name!r} needs the reference embeddings under the key"
                        f" {key!r} of the validation step output (same rows and layout); keys seen: {_quoted(sorted(map(str, outputs)))}"
                    )
                self._reference_captured[tap.name].extend(self._output_tensors(tap, outputs[key], key))

    def _output_tensors(self, tap: Tap, value: Any, key: str) -> list[Tensor]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if tap.reduce is not None:
            values = [tap.reduce(v) for v in values]
        out = []
        for v in values:
            if not isinstance(v, Tensor):
                raise MonitorConfigurationError(f"RepresentationMonitor: output key {key!r} holds {type(v).__name__}; it must hold (B, D), (B, q, D) or a list of q (B, D) tensors")
            if v.ndim > 3 or (v.ndim == 3 and self.num_views == 1):
                raise MonitorConfigurationError(
                    f"RepresentationMonitor: output key {key!r} holds a tensor of shape {tuple(v.shape)}; embeddings must be (B, D)"
                    f"{' or (B, q, D) views' if self.num_views > 1 else ''}: {_FEATURE_MAP_HINT.format(name=tap.name)}"
                )
            out.append(v.detach())
        return out

    def _raise_capture_error(self) -> None:
        if self._capture_error is not None:
            error, self._capture_error = self._capture_error, None
            self._mode = None
            raise error

    def check_taps(self, stage: str) -> None:
        """Raise for taps that are neither submodules nor step-output keys (called by the step ends).

        After the first training step a tap not found is an error, unless ``expect_eval`` says an
        evaluation pass is still to come that could produce it and no evaluation step has been seen
        (Lightning's sanity check counts); after the first evaluation pass it is an error.
        """
        if self._taps_checked:
            return
        missing = [t for t in self.taps if t.name not in self._found]
        if not missing:
            self._taps_checked = True
            return
        if stage == "train" and self.expect_eval and not self._steps_seen["eval"] and not self.eval_passes:
            return  # the evaluation pass to come may produce them
        keys = sorted(self._output_keys["train"] | self._output_keys["eval"])
        lines = []
        for tap in missing:
            close_modules = _closest(tap.name, self._submodule_names)
            close_keys = _closest(tap.name, keys)
            lines.append(
                f"tap {tap.name!r} is neither a submodule of the model nor a key of any step output"
                f" (closest submodules: {_quoted(close_modules)}; closest output keys: {_quoted(close_keys)};"
                f" output keys seen: {_quoted(keys)})"
            )
        self._taps_checked = True
        raise MonitorConfigurationError("RepresentationMonitor: " + "; ".join(lines) + ". Fix the tap name, or return that key from the step.")

    def _group(self, stage: str) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Group this step's captures per tap (and their reference); count and skip batches the layout cannot split."""
        grouped = {}
        for tap in self.taps:
            chunks, self._captured[tap.name] = self._captured[tap.name], []
            reference_chunks, self._reference_captured[tap.name] = self._reference_captured[tap.name], []
            if not chunks:
                continue
            try:
                views = group_views(chunks, self.num_views, tap.name, self.view_layout)
                reference = group_views(reference_chunks, self.num_views, tap.name, self.view_layout) if reference_chunks else None
            except _UngroupableBatch as error:
                self._count_dropped(stage, tap.name, error.samples, str(error))
                continue
            if reference is not None and reference.shape[:2] != views.shape[:2]:
                raise MonitorConfigurationError(
                    f"RepresentationMonitor: tap {tap.name!r}: the reference gave {tuple(reference.shape[:2])} samples × views, the live model {tuple(views.shape[:2])}"
                )
            self.num_features[tap.name] = views.shape[-1]
            grouped[tap.name] = (views, reference)
        return grouped

    def _count_dropped(self, stage: str, tap: str, samples: int, reason: str) -> None:
        if stage == "train":
            self._train_dropped[tap] += samples
        else:
            self._counts[("val", tap)].update(dropped=samples)
        key = f"dropped/{stage}/{tap}"
        if key not in self._warned:
            self._warned.add(key)
            warn(f"reprmetrics monitor: tap {tap!r} ({stage}): {reason}; such batches are left out and counted (see num_samples)")

    # ---- training schedule -----------------------------------------------------------------
    def _capture_window(self) -> int:
        """How many steps before a scheduled step to capture, so the buffer fills with recent samples."""
        if self._batch_size is None:
            return 1
        return max(1, math.ceil(self.train_buffer_size / self._batch_size))

    def start_train_step(self) -> bool:
        """Call before each training step; returns whether this step captures embeddings.

        Training-stage values read the most recent ``train_buffer_size`` samples per tap, captured
        over the steps just before a scheduled step; the first value waits until the buffer is full
        (on every rank that captures), so the first value, the baseline of relative criteria, is as
        well founded as every later one. Until the buffer is full every step captures (one detached
        copy of the tapped outputs per step).
        """
        n = self.every_n_train_steps
        filling = self._batch_size is None or any(buffer.fill() < 1.0 for buffer in self._buffers.values())
        capture = n > 0 and (filling or (self.train_steps % n) >= n - self._capture_window())
        self._mode = "train" if capture else None
        self._capture_thread = threading.get_ident()
        self._epoch_capture_steps += capture
        return capture

    def end_train_step(self, outputs: Any = None) -> dict[str, Tensor] | None:
        """Call after each training step, with what the step returned when output taps are used.

        Returns ``{"tap/metric": value}`` on scheduled steps (every ``every_n_train_steps``), else
        ``None``. Raises :class:`MonitorConfigurationError` for a misconfigured tap.
        """
        self._raise_capture_error()
        self.observe(outputs, "train")
        self.check_taps("train")
        result = None
        if self._mode == "train":
            for tap, (views, _) in self._group("train").items():
                self._batch_size = views.shape[0]
                self._buffers[tap].add(views)
                self._epoch_train_captures[tap] += len(views)
            self._mode = None
            if (self.train_steps + 1) % self.every_n_train_steps == 0:
                result = self._compute_train()
        self.train_steps += 1
        return result

    def end_train_epoch(self) -> None:
        """Call at the end of each training epoch: warns about taps that captured nothing in it, and
        about training-stage values still waiting for a full buffer."""
        for tap, buffer in self._buffers.items():
            key = f"filling/train/{tap}"
            if self.every_n_train_steps and buffer.fill() < 1.0 and key not in self._warned:
                self._warned.add(key)
                stored = round(buffer.fill() * self.train_buffer_size)
                warn(
                    f"reprmetrics monitor: tap {tap!r}: no training-stage values yet: they start once its buffer holds"
                    f" train_buffer_size={self.train_buffer_size} samples, and it holds {stored} after epoch {self.epoch}."
                    " Lower train_buffer_size for small datasets"
                )
        if self._epoch_capture_steps:
            for tap in self.taps:
                if not self._epoch_train_captures[tap.name]:
                    warn(
                        f"reprmetrics monitor: tap {tap.name!r} captured nothing during the {self._epoch_capture_steps} capturing training"
                        f" steps of epoch {self.epoch} ({self._nothing_hint(tap, 'train')}); no train-stage values for it"
                    )
        self.epoch += 1
        self._epoch_capture_steps = 0
        self._epoch_train_captures = {t.name: 0 for t in self.taps}

    def _nothing_hint(self, tap: Tap, stage: str) -> str:
        if tap.name in self._module_taps:
            return "its module was never called"
        step = "training_step" if stage == "train" else "validation_step"
        return f"the key is missing from the {step} outputs"

    # ---- evaluation ------------------------------------------------------------------------
    def start_eval(self) -> None:
        """Call before an evaluation pass: metrics stream over all of its batches."""
        for (stage, _), metric_set in self._metric_sets.items():
            if stage == "val":
                metric_set.reset()
        for (stage, _), counts in self._counts.items():
            if stage == "val":
                counts.reset()
        for drift in self._drift.values():
            drift.reset()
        self._captured = {t.name: [] for t in self.taps}
        self._reference_captured = {t.name: [] for t in self.taps}
        self._mode = "eval"
        self._capture_thread = threading.get_ident()

    def end_eval_step(self, outputs: Any = None) -> None:
        """Call after each evaluation batch, with what the step returned when output taps are used."""
        self._raise_capture_error()
        self.observe(outputs, "eval")
        if self._mode != "eval":
            return
        for tap, (views, reference) in self._group("val").items():
            self._feed("val", tap, views)
            if reference is not None:
                self._feed_drift(tap, views, reference)

    def end_eval(self) -> dict[str, Tensor]:
        """Values over the whole evaluation pass: ``{"tap/metric": value}``.

        Every rank must call it (metrics sync). Taps that captured nothing warn; see the class
        docstring for ``num_samples``, ``nonfinite_fraction`` and what is withheld.
        """
        self._raise_capture_error()
        self._mode = None
        self.eval_passes += 1
        self.check_taps("eval")
        values = {}
        for tap in self.taps:
            values.update(self._compute_tap("val", tap.name))
        self._record("val", values)
        return values

    # ---- metrics ---------------------------------------------------------------------------
    def metric_set(self, stage: str, tap: str, views: Tensor | None = None, width: int | None = None, num_views: int | None = None) -> MetricSet:
        """The metrics of ``tap`` at ``stage``, created from the first batch's width and views."""
        key = (stage, tap)
        if key not in self._metric_sets:
            d = views.shape[-1] if views is not None else width
            q = views.shape[1] if views is not None else num_views
            device = views.device if views is not None else self._device()
            options = {"rankme": {"diagnostics": True}} if self.rankme_diagnostics else None
            metrics = default_metrics(d, q, self.max_samples, options=options) if self.use_default_metrics else {}
            metrics.update(default_metrics(d, q, self.max_samples, names=self.named_metrics, options=options) if self.named_metrics else {})
            metrics.update({name: m.clone() for name, m in self.extra_metrics.items()})
            if self.rankme_diagnostics:  # for a RankMe given as a Metric too
                for metric in metrics.values():
                    if hasattr(metric, "diagnostics_reported"):
                        metric.diagnostics_reported = True
            metric_set = MetricSet(metrics, f"{stage}/{tap}", self.strict, self._warned, warn)
            try:  # each D×D float64 statistic, and as much again while its eigenvalues are computed
                check_memory(
                    2 * metric_set.dense_states() * (d + 3) * d * 8, device, "RepresentationMonitor", f"tap {tap!r} of width D = {d:,} ({stage})",
                    "tap a narrower layer, pool or project it with the Tap's `reduce`, or choose metrics that keep no D×D matrix",
                )
            except ValueError as error:
                raise MonitorConfigurationError(str(error)) from None
            self._metric_sets[key] = metric_set.to(device)  # embeddings stay where they are
        return self._metric_sets[key]

    def metric_sets(self, stage: str) -> dict[str, MetricSet]:
        """``{tap: MetricSet}`` of a stage (``"train"`` or ``"val"``)."""
        return {tap: s for (st, tap), s in self._metric_sets.items() if st == stage}

    def metric_names(self, stage: str) -> dict[str, list[str]]:
        """``{tap: [names it reports]}`` for the taps of a stage seen so far, the counts included."""
        drift = ["cka_to_reference"] if stage == "val" and self.reference is not None else []
        return {tap: [*s.value_names(), *drift, "num_samples", "nonfinite_fraction"] for tap, s in self.metric_sets(stage).items()}

    @staticmethod
    def _new_drift_metric(width: int, reference_width: int, device: torch.device) -> Metric:
        from reprmetrics.similarity import LinearCKA

        return LinearCKA(num_features=(width, reference_width)).to(device)

    def _feed_drift(self, tap: str, views: Tensor, reference: Tensor) -> None:
        live, ref = views[:, 0], reference[:, 0]
        finite = torch.isfinite(live).all(dim=1) & torch.isfinite(ref).all(dim=1)  # weighted out: no host sync
        zero = torch.zeros((), dtype=live.dtype, device=live.device)
        live, ref = torch.where(finite[:, None], live, zero), torch.where(finite[:, None], ref, zero.to(ref.dtype))
        if tap not in self._drift:
            self._drift[tap] = self._new_drift_metric(live.shape[-1], ref.shape[-1], live.device)
        self._counts[("val", tap)].update(reference_width=ref.shape[-1])
        self._drift[tap].accumulate(live, ref, finite.to(torch.float64))

    def _device(self) -> torch.device:
        if self._model is not None:
            for tensor in (*self._model.parameters(), *self._model.buffers()):
                return tensor.device
        return torch.device("cpu")

    def _feed(self, stage: str, tap: str, views: Tensor) -> None:
        used = self.metric_set(stage, tap, views).update(views)
        counts = self._counts[(stage, tap)].to(views.device)
        counts.update(used=used, nonfinite=len(views) - used, width=views.shape[-1], views=views.shape[1])

    def _buffer_ready(self, tap: str) -> bool:
        """Whether every rank that captured samples for ``tap`` has a full buffer (synced: the same answer everywhere)."""
        counts = self._counts[("train", tap)]
        counts.reset()
        counts.to(self._device())
        counts.update(fill=self._buffers[tap].fill())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            fill = float(counts.compute()[6])
        return fill >= 1.0

    def _compute_train(self) -> dict[str, Tensor]:
        values = {}
        for tap in self.taps:
            if not self._buffer_ready(tap.name):
                continue
            views = self._buffers[tap.name].recent()
            dropped, self._train_dropped[tap.name] = self._train_dropped[tap.name], 0
            counts = self._counts[("train", tap.name)]
            counts.reset()
            if ("train", tap.name) in self._metric_sets:  # on every rank: a rank without samples must not reuse the last state
                self._metric_sets[("train", tap.name)].reset()
            if views is not None:
                self._feed("train", tap.name, views)
            counts.update(dropped=dropped)
            values.update(self._compute_tap("train", tap.name))
        self._record("train", values)
        return values

    def _compute_tap(self, stage: str, tap: str) -> dict[str, Tensor]:
        """One tap's values. The counts are synced first, so every rank takes the same branch."""
        counts = self._counts[(stage, tap)]
        metric_set = self._metric_sets.get((stage, tap))
        counts.to(next(iter(metric_set.metrics.values())).device if metric_set is not None else self._device())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            used, nonfinite, dropped, width, num_views, reference_width, _ = (int(v) for v in counts.compute().tolist())
        report = CaptureReport(stage, tap, used, nonfinite, dropped)
        self.reports[(stage, tap)] = report
        label = {"train": "training", "val": "validation"}[stage]
        if report.seen == 0:
            if stage == "val":
                tap_obj = next(t for t in self.taps if t.name == tap)
                warn(
                    f"reprmetrics monitor: tap {tap!r} captured nothing during validation pass {self.eval_passes}"
                    f" ({self._nothing_hint(tap_obj, stage)}); no val-stage values for it"
                )
            return {}
        device = counts.used.device
        values = {
            f"{tap}/num_samples": torch.tensor(float(used), device=device),
            f"{tap}/nonfinite_fraction": torch.tensor(report.nonfinite_fraction, device=device),
        }
        if metric_set is None and width:  # nothing reached this rank but others have data: join their sync
            metric_set = self.metric_set(stage, tap, width=width, num_views=num_views)
        # Drift is computed wherever any rank saw reference embeddings (synced), so every rank joins its sync.
        has_drift = stage == "val" and reference_width > 0
        if has_drift and tap not in self._drift:
            self._drift[tap] = self._new_drift_metric(width, reference_width, device)
        if nonfinite:
            warn(
                f"reprmetrics monitor: divergence: tap {tap!r} produced non-finite embeddings ({report.nonfinite_fraction:.0%} of"
                f" {report.seen} samples, {label}); its metrics are reported as NaN"
            )
            names = metric_set.value_names() if metric_set is not None else []
            names += ["cka_to_reference"] if has_drift else []
            values.update({f"{tap}/{name}": torch.tensor(float("nan"), device=device) for name in names})
            return values
        if dropped:
            warn(
                f"reprmetrics monitor: tap {tap!r} ({label}): only {used} of {report.seen} samples were usable; {dropped} were in"
                f" batches that could not be grouped into {self.num_views} views (view_layout={self.view_layout!r})"
            )
        if used < self.min_samples:
            warn(
                f"reprmetrics monitor: tap {tap!r} ({label}): {used} usable samples, fewer than min_samples={self.min_samples};"
                " its metrics are not reported (num_samples is). Use more or larger batches, or lower min_samples"
            )
            return values
        if metric_set is not None:
            values.update({f"{tap}/{name}": value for name, value in metric_set.compute().items()})
        if has_drift:
            try:
                values[f"{tap}/cka_to_reference"] = self._drift[tap].compute().detach()
            except (ValueError, RuntimeError) as error:
                if self.strict:
                    raise
                warn(f"reprmetrics monitor: skipping {stage}/{tap}/cka_to_reference: {error}")
        return values

    def _record(self, stage: str, values: Mapping[str, Tensor]) -> None:
        for key, value in values.items():
            self.history.setdefault(f"{stage}/{key}", []).append((self.train_steps, float(value)))

    # ---- persistence -----------------------------------------------------------------------
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
            "batch_size": self._batch_size,
            "buffers": {tap: (None if (views := buffer.state()) is None else views.cpu()) for tap, buffer in self._buffers.items()},
            "train_dropped": dict(self._train_dropped),
            "epoch_capture_steps": self._epoch_capture_steps,
            "epoch_train_captures": dict(self._epoch_train_captures),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (buffers go back to the model's device at the next capture)."""
        self.train_steps = int(state["train_steps"])
        self.epoch = int(state.get("epoch", 0))
        self.eval_passes = int(state.get("eval_passes", self.eval_passes))
        self.history = {k: [tuple(x) for x in v] for k, v in state["history"].items()}
        self.num_features = dict(state.get("num_features", {}))
        self._batch_size = state.get("batch_size")
        device = self._device()
        for tap, views in state.get("buffers", {}).items():
            if tap in self._buffers:
                self._buffers[tap].load(None if views is None else views.to(device))
        self._train_dropped.update({k: int(v) for k, v in state.get("train_dropped", {}).items() if k in self._train_dropped})
        self._epoch_capture_steps = int(state.get("epoch_capture_steps", 0))
        self._epoch_train_captures.update({k: int(v) for k, v in state.get("epoch_train_captures", {}).items() if k in self._epoch_train_captures})
