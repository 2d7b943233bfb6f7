"""Every label-free metric on saved embeddings, in one call: :func:`evaluate`.

The embeddings stream through the Metric classes batch by batch, so memory stays bounded whatever
the number of samples: sufficient-statistic metrics (RankMe, α-ReQ, normalised std, LiDAR,
alignment, CKA) see every row; point metrics (uniformity, LID, TwoNN, MLE) keep the documented
bounded uniform sample of at most ``max_samples`` rows. The default set, its names and its settings
are the registry's (:func:`reprmetrics.registry.default_metrics`), so the numbers match what a
``RepresentationMonitor`` logged on the same embeddings.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from reprmetrics._validation import SUPPORTED_FLOAT_DTYPES, check_device, check_memory
from reprmetrics.metric_set import MetricSet
from reprmetrics.registry import MONITOR_MAX_SAMPLES, available_metrics, default_metrics
from reprmetrics.spectral import _covariance_spectrum
from reprmetrics.statistics import BoundedSample, finite_rows

__all__ = ["HEALTHY_DIRECTION", "METRIC_NAMES", "NonFiniteRowsError", "evaluate"]

#: Default rows per batch when a tensor or array is streamed (also the CLI's ``--batch-size``).
DEFAULT_BATCH_SIZE = 4096
#: The monitor's default for the point metrics' bounded sample.
DEFAULT_MAX_SAMPLES = MONITOR_MAX_SAMPLES

_REFERENCE_METRIC = "cka"


def _known_names() -> list[str]:
    # The monitor's registry (default and opt-in metrics), so every name it logs is accepted here too.
    return [*available_metrics(), _REFERENCE_METRIC]


#: Every name ``metrics=[...]`` accepts (``"cka"`` needs ``reference``).
METRIC_NAMES: tuple[str, ...] = tuple(_known_names())

#: The healthy direction of each metric from the monitor's registry (↑ higher, ↓ lower, ≈1).
#: CKA is a similarity to the reference, not a health signal: no direction.
HEALTHY_DIRECTION: dict[str, str] = {name: spec.direction for name, spec in available_metrics().items()} | {
    _REFERENCE_METRIC: ""
}


class NonFiniteRowsError(ValueError):
    """Rows with NaN or infinite values were found (``drop_nonfinite=False``).

    Attributes: ``input_name`` (``"embeddings"``, ``"views"`` or ``"reference"``), ``bad_rows`` and
    ``total_rows`` (counted over the whole input).
    """

    def __init__(self, input_name: str, bad_rows: int, total_rows: int) -> None:
        self.input_name, self.bad_rows, self.total_rows = input_name, bad_rows, total_rows
        unit = "samples" if input_name == "views" else "rows"
        super().__init__(
            f"evaluate: {bad_rows:,} of {total_rows:,} {unit} of `{input_name}` contain NaN or infinite values;"
            " pass drop_nonfinite=True to skip them"
        )


# ---- inputs -------------------------------------------------------------------------------------
def _as_tensor(batch: Any, name: str, ndim: int) -> Tensor:
    if isinstance(batch, Tensor):
        x = batch
    else:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy ships with every supported setup
            np = None
        if np is None or not isinstance(batch, np.ndarray):
            raise ValueError(
                f"evaluate: `{name}` batches must be torch tensors or numpy arrays, got {type(batch).__name__}"
            )
        if batch.dtype.kind not in "fiub":
            raise ValueError(f"evaluate: `{name}` must hold real numbers, got numpy dtype {batch.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(batch))
    _check_tensor_kind(x, name)
    if x.ndim != ndim:
        shape = "(N, D)" if ndim == 2 else "(N, q, D)"
        raise ValueError(f"evaluate: `{name}` must have shape {shape}, got a batch of shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"evaluate: `{name}` has no features (shape {tuple(x.shape)}): there is nothing to measure")
    if ndim == 3 and x.shape[1] < 2:
        raise ValueError(
            f"evaluate: `{name}` must hold at least 2 views per sample (shape (N, q, D) with q >= 2), got shape"
            f" {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        x = x.float()
    return x


def _check_tensor_kind(x: Tensor, name: str) -> None:
    """Layout, device and dtype: what no slicing or arithmetic can be asked of (checked before any)."""
    if x.layout != torch.strided:
        raise ValueError(f"evaluate: `{name}` must be a dense tensor, got layout {x.layout}; call .to_dense() first")
    if x.device.type == "meta":
        raise ValueError(f"evaluate: `{name}` is on the 'meta' device and holds no values")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"evaluate: `{name}` must be real-valued, got dtype {x.dtype}")
    if x.is_floating_point() and x.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise ValueError(
            f"evaluate: `{name}` has dtype {x.dtype}, which is not supported; convert it with .float() first"
        )


def _is_array(value: Any) -> bool:
    return isinstance(value, Tensor) or type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "ndim")


def _batches(source: Any, name: str, ndim: int, batch_size: int) -> Iterator[Tensor]:
    """``(B, ...)`` tensors from a tensor, an array or an iterable of batches."""
    if _is_array(source):
        if isinstance(source, Tensor):
            _check_tensor_kind(source, name)
        if source.ndim != ndim:
            shape = "(N, D)" if ndim == 2 else "(N, q, D)"
            raise ValueError(f"evaluate: `{name}` must have shape {shape}, got shape {tuple(source.shape)}")
        if source.shape[0] == 0:
            _as_tensor(source[:0], name, ndim)  # a width or view count that cannot work raises first
            return
        for start in range(0, source.shape[0], batch_size):
            yield _as_tensor(source[start : start + batch_size], name, ndim)
        return
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise ValueError(
            f"evaluate: `{name}` must be a tensor, a numpy array or an iterable of batches, got {type(source).__name__}"
        )
    for batch in source:
        yield _as_tensor(batch, name, ndim)


def _view_batches(views: Any, batch_size: int) -> Iterator[Tensor]:
    """``(B, q, D)`` batches: from an (N, q, D) tensor/array, a sequence of q (N, D) views, or batches."""
    if isinstance(views, (list, tuple)) and views and all(_is_array(v) and v.ndim == 2 for v in views):
        if len(views) < 2:
            raise ValueError("evaluate: `views` as a list of (N, D) views needs at least 2 of them")
        if len({tuple(v.shape) for v in views}) != 1:
            raise ValueError(f"evaluate: the views differ in shape: {[tuple(v.shape) for v in views]}")
        for start in range(0, views[0].shape[0], batch_size):
            yield torch.stack([_as_tensor(v[start : start + batch_size], "views", 2) for v in views], dim=1)
        return
    yield from _batches(views, "views", 3, batch_size)


class _RowReader:
    """Hands out exactly ``n`` rows at a time from a stream of batches of any size."""

    def __init__(self, batches: Iterator[Tensor]) -> None:
        self._batches = batches
        self._pending: list[Tensor] = []
        self._pending_rows = 0

    def take(self, n: int) -> Tensor | None:
        """The next ``n`` rows (fewer when the stream ends; None when nothing is left)."""
        while self._pending_rows < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch)
            self._pending_rows += batch.shape[0]
        if not self._pending:
            return None
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        taken, rest = rows[:n], rows[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        return taken

    def remaining_rows(self) -> int:
        """Rows left (drains the stream)."""
        left = self._pending_rows
        for batch in self._batches:
            left += batch.shape[0]
        self._pending, self._pending_rows = [], 0
        return left


# ---- CKA ------------------------------------------------------------------------------------------
def _make_cka() -> Metric:
    from reprmetrics.similarity import LinearCKA  # noqa: PLC0415

    return LinearCKA()


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """What one evaluation saw and computed (the CLI reads more than the values)."""

    values: dict[str, float]
    num_samples: int = 0
    num_features: int = 0
    num_views: int = 1
    reference_features: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    spectrum: dict[str, Any] | None = None


def _check_names(metrics: str | Sequence[str], has_views: bool, has_reference: bool) -> list[str] | None:
    """The explicit names (None for the default set), checked before any data is read."""
    if isinstance(metrics, str):
        if metrics == "default":
            return None
        metrics = [metrics]
    if not isinstance(metrics, (list, tuple)) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"evaluate: `metrics` must be 'default' or a list of metric names, got {metrics!r}")
    known = _known_names()
    for name in metrics:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"evaluate: unknown metric {name!r}{hint} (known: {', '.join(known)})")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"evaluate: `metrics` names a metric twice: {list(metrics)}")
    specs = available_metrics()
    needs_views = [n for n in metrics if n in specs and specs[n].needs_views]
    if needs_views and not has_views:
        raise ValueError(
            f"evaluate: {', '.join(needs_views)} need(s) augmented views: pass `views` of shape (N, q, D), q >= 2"
        )
    if _REFERENCE_METRIC in metrics and not has_reference:
        raise ValueError("evaluate: 'cka' needs a `reference` embedding set of the same rows")
    if not metrics and not has_reference:
        raise ValueError("evaluate: no metrics to compute (empty `metrics` and no `reference`)")
    return [n for n in metrics if n != _REFERENCE_METRIC]


def _build(names: list[str] | None, num_features: int, num_views: int, max_samples: int) -> dict[str, Metric]:
    """The monitor's default set for this D and q, or exactly the named metrics.

    A named metric that this D cannot support (α-ReQ below 13 features) is still built, so that its
    compute() raises an error that names it instead of the name being dropped silently.
    """
    if names is None:
        return default_metrics(num_features, num_views, max_samples)
    specs = available_metrics()
    return {name: specs[name].factory(max_samples) for name in names}


def _num_views_hint(views: Any) -> int:
    """q as far as it is known before reading: enough for the default set, which only asks q >= 2."""
    if isinstance(views, (list, tuple)) and views and all(_is_array(v) and v.ndim == 2 for v in views):
        return len(views)
    if _is_array(views) and views.ndim == 3:
        return int(views.shape[1])
    return 2


class _Evaluation:
    """One streamed evaluation: builds the metric set at the first batch, feeds it, counts bad rows.

    Non-finite rows are weighted out and counted as device tensors (no host sync per batch); without
    ``drop_nonfinite`` their count is raised at the end, over the whole input.
    """

    _SPECTRUM = "__spectrum__"  # a hidden α-ReQ reader for the plot when alpha_req is not asked for

    def __init__(
        self, names: list[str] | None, with_reference: bool, max_samples: int, drop_nonfinite: bool, with_spectrum: bool
    ) -> None:
        self.names = names
        self.max_samples = max_samples
        self.drop_nonfinite = drop_nonfinite
        self.with_spectrum = with_spectrum
        self.metric_set: MetricSet | None = None
        self.cka = _make_cka() if with_reference else None
        self.bad: dict[str, Any] = {"embeddings": 0, "views": 0, "reference": 0}
        self.used: Any = 0
        self.seen = {"embeddings": 0, "views": 0}
        self.result = EvaluationResult(values={})

    @property
    def metrics(self) -> dict[str, Metric] | None:
        return None if self.metric_set is None else self.metric_set.metrics

    def build(self, num_features: int, num_views: int, device: torch.device) -> None:
        if self.metric_set is not None:
            return
        metrics = _build(self.names, num_features, num_views, self.max_samples)
        if self.with_spectrum and "alpha_req" not in metrics:
            metrics[self._SPECTRUM] = available_metrics()["alpha_req"].factory()  # shares the rows' moments: free
        metric_set = MetricSet(metrics, "evaluate", strict=False, warn=lambda message: None)
        matrices = metric_set.dense_states() + (1 if self.cka is not None else 0)
        dense = [n for n, m in metrics.items() if getattr(m, "dense_states", 0) and n != self._SPECTRUM] + (
            ["cka"] if self.cka is not None else []
        )
        # Each D×D float64 statistic, and about as much again while its eigenvalues are computed.
        check_memory(
            2 * matrices * (num_features + 3) * num_features * 8,
            device,
            "evaluate",
            f"D = {num_features:,} for the D×D statistics of {', '.join(dense)}",
            "pick metrics that keep no D×D matrix (uniformity, lid, twonn, mle_dimension, alignment, sigreg,"
            " normalized_std) or reduce the width first (e.g. PCA)",
        )
        self.metric_set = metric_set.to(device)
        if self.cka is not None:
            self.cka = self.cka.to(device)
        self.result.num_features, self.result.num_views = num_features, num_views

    def screen(self, x: Tensor, name: str, ref: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """The batch, and 0/1 weights of its rows that count (where x and ref are finite); counts the others.

        One reduction pass per input and device tensors only: no host sync per batch.
        """
        keep = finite_rows(x)
        self.bad[name] = self.bad[name] + (~keep).sum()
        if ref is not None:
            ref_keep = finite_rows(ref)
            self.bad["reference"] = self.bad["reference"] + (~ref_keep).sum()
            keep = keep & ref_keep
        return x, ref, keep.to(torch.float64)

    def update_points(self, z: Tensor, ref: Tensor | None, weights: Tensor) -> None:
        assert self.metric_set is not None
        self.metric_set.update_points(z, weights)
        self.used = self.used + weights.sum()
        if self.cka is not None and ref is not None:
            keep = weights[:, None] > 0  # CKA's moments take rows of weight 0 as zeros
            zero = torch.zeros((), dtype=z.dtype, device=z.device)
            self.cka.accumulate(torch.where(keep, z, zero), torch.where(keep, ref, zero.to(ref.dtype)), weights)
            self.result.reference_features = ref.shape[-1]

    def update_views(self, v: Tensor, weights: Tensor) -> None:
        assert self.metric_set is not None
        self.metric_set.update_views(v, weights)

    def phase_message(self) -> str:
        """What :meth:`finish` is about to do, for a progress line."""
        assert self.metric_set is not None
        names = [n for n in self.metric_set.metrics if n != self._SPECTRUM]
        sampled = [
            n
            for key, readers in self.metric_set.readers.items()
            if isinstance(self.metric_set.statistics[key], BoundedSample)
            for n in readers
        ]
        rows = min(int(self.used), self.max_samples)
        if sampled:
            return f"computing {', '.join(names)} ({', '.join(sampled)} on {rows:,} sampled rows)"
        return f"computing {', '.join(names)}"

    def check(self, points_name: str) -> dict[str, int]:
        """After the pass over the rows: raise for non-finite rows (without ``drop_nonfinite``) or nothing to
        evaluate."""
        bad = {k: int(v) for k, v in self.bad.items()}
        totals = {
            "embeddings": self.seen["embeddings"],
            "views": self.seen["views"] or self.seen["embeddings"],
            "reference": self.seen["embeddings"],
        }
        for name in ("embeddings", "views", "reference"):
            if bad[name] and not self.drop_nonfinite:
                raise NonFiniteRowsError(name, bad[name], totals[name])
        if self.seen["embeddings"] == 0:
            raise ValueError(f"evaluate: `{points_name}` has no rows")
        if self.metric_set is None or int(self.used) == 0:
            raise ValueError("evaluate: every row contains NaN or infinite values; nothing left to evaluate")
        return bad

    def finish(self, points_name: str) -> EvaluationResult:
        bad = self.check(points_name)
        assert self.metric_set is not None
        self.result.dropped = {k: v for k, v in bad.items() if v}
        self.result.num_samples = int(self.used)
        values = self.metric_set.compute()
        failures = self.metric_set.failures
        for name in self.metric_set.metrics:
            if name in failures and name != self._SPECTRUM:
                raise ValueError(f"evaluate: {name}: {failures[name]}")
        # One value per metric, as the metric's own compute() gives it (extras such as alpha_req_r2 are the tracker's).
        self.result.values = {
            name: float(values[name]) for name in self.metric_set.metrics if name != self._SPECTRUM and name in values
        }
        if self.with_spectrum:
            self.result.spectrum = self._spectrum()
        self.metric_set.reset()  # frees the point sample
        if self.cka is not None:
            self.result.values[_REFERENCE_METRIC] = _compute(_REFERENCE_METRIC, self.cka)
        return self.result

    def _spectrum(self) -> dict[str, Any]:
        """Covariance eigenvalues and, when the fit range allows, the α-ReQ fit (for plotting)."""
        assert self.metric_set is not None
        fit = self.metric_set.last_artifacts.get("spectrum")
        if fit is not None:
            return {**fit, "eigenvalues": fit["eigenvalues"].cpu()}
        name = "alpha_req" if "alpha_req" in self.metric_set.metrics else self._SPECTRUM
        stat = self.metric_set.statistics[self.metric_set.metrics[name].statistic_key()]
        with stat.sync_context(dist_sync_fn=stat.dist_sync_fn, should_sync=stat._to_sync):
            eigenvalues = _covariance_spectrum(stat, {}, "evaluate")[0]
        return {"eigenvalues": eigenvalues.cpu(), "alpha": None}


def _run(
    embeddings: Any,
    views: Any = None,
    metrics: str | Sequence[str] = "default",
    reference: Any = None,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    drop_nonfinite: bool = False,
    progress: bool = False,
    with_spectrum: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """:func:`evaluate`, returning what the run saw as well (row counts, dropped rows, the spectrum).

    ``on_phase(message)`` is called once after the pass over the rows, before the metrics are
    computed, with what happens next (e.g. "computing uniformity, lid on 8,192 sampled rows"), so a
    caller (the CLI) can show it.
    """
    for value, label in ((max_samples, "max_samples"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"evaluate: `{label}` must be an integer >= 2, got {value!r}")
    if embeddings is None and views is None:
        raise ValueError("evaluate: pass `embeddings` (N, D), or `views` (N, q, D) to use their first view")
    names = _check_names(metrics, views is not None, reference is not None)
    target = check_device(device, "evaluate")
    run = _Evaluation(names, reference is not None, max_samples, drop_nonfinite, with_spectrum)
    first_view_only = embeddings is None
    points_name = "views" if first_view_only else "embeddings"

    def place(x: Tensor) -> Tensor:
        return x if target is None else x.to(target)

    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        sizes = [int(s.shape[0]) for s in (embeddings, None if first_view_only else views) if _is_array(s)]
        bar = tqdm(total=sum(sizes) if sizes else None, unit="rows", desc="evaluate", leave=False)

    with torch.no_grad():
        # Pass 1: the point embeddings (the first view when only views are given), with the reference.
        points = (
            _view_batches(views, batch_size) if first_view_only else _batches(embeddings, "embeddings", 2, batch_size)
        )
        reference_rows = _RowReader(_batches(reference, "reference", 2, batch_size)) if reference is not None else None
        for batch in points:
            batch = place(batch)
            ref = None
            if reference_rows is not None:
                ref = reference_rows.take(batch.shape[0])
                if ref is None or ref.shape[0] != batch.shape[0]:
                    have = run.seen["embeddings"] + (0 if ref is None else ref.shape[0])
                    raise ValueError(
                        f"evaluate: `reference` has {have:,} rows but `{points_name}` has more;"
                        " CKA compares the same samples, row by row"
                    )
                ref = place(ref)
            if run.metrics is not None and batch.shape[-1] != run.result.num_features:
                raise ValueError(
                    f"evaluate: a batch of `{points_name}` has {batch.shape[-1]} features but the batches before it"
                    f" have {run.result.num_features}; every batch must have the same width D"
                )
            run.seen["embeddings"] += batch.shape[0]
            if bar is not None:
                bar.update(batch.shape[0])
            batch, ref, weights = run.screen(batch, points_name, ref)
            if first_view_only:
                run.build(batch.shape[-1], batch.shape[1], batch.device)
                run.update_points(batch[:, 0], ref, weights)
                run.update_views(batch, weights)
            else:
                run.build(batch.shape[-1], 1 if views is None else _num_views_hint(views), batch.device)
                run.update_points(batch, ref, weights)
        if reference_rows is not None:
            extra = reference_rows.remaining_rows()
            if extra:
                raise ValueError(
                    f"evaluate: `reference` has {run.seen['embeddings'] + extra:,} rows but `{points_name}` has"
                    f" {run.seen['embeddings']:,}; CKA compares the same samples, row by row"
                )
        # Pass 2: views of their own for LiDAR and alignment.
        if views is not None and not first_view_only:
            for v in _view_batches(views, batch_size):
                v = place(v)
                run.seen["views"] += v.shape[0]
                if bar is not None:
                    bar.update(v.shape[0])
                if run.metrics is None:
                    continue
                if v.shape[-1] != run.result.num_features:
                    raise ValueError(
                        f"evaluate: `views` have {v.shape[-1]} features but `embeddings` have {run.result.num_features}"
                    )
                v, _, weights = run.screen(v, "views")
                run.update_views(v, weights)
            if run.seen["views"] == 0:
                raise ValueError("evaluate: `views` has no rows")
    if bar is not None:
        bar.close()
    run.check(points_name)
    if on_phase is not None:
        on_phase(run.phase_message())
    return run.finish(points_name)


def _compute(name: str, metric: Metric) -> float:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            return float(metric.compute())
    except ValueError as error:
        raise ValueError(f"evaluate: {name}: {error}") from error


def evaluate(
    embeddings: Any,
    views: Any = None,
    metrics: str | Sequence[str] = "default",
    reference: Any = None,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    drop_nonfinite: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Every label-free metric of the toolkit on one set of embeddings, streamed.

    Args:
        embeddings: ``(N, D)`` embeddings: a torch tensor, a numpy array (a memory-mapped one is read
            ``batch_size`` rows at a time), or an iterable of ``(B, D)`` batches (tensors or arrays).
            ``None`` with ``views`` given: the first view of each sample, as the monitor does.
        views: augmented views for LiDAR and alignment: an ``(N, q, D)`` tensor or array (q ≥ 2),
            a list of q ``(N, D)`` tensors (view j of every sample), or an iterable of ``(B, q, D)``
            batches. They need not be the samples of ``embeddings``; each group must arrive whole.
        metrics: ``"default"``, the monitor's set for this D and q (:func:`reprmetrics.registry.default_metrics`:
            rankme, alpha_req for D ≥ 13, normalized_std, uniformity, lid, nesum, coding_rate,
            wasserstein_uniformity, isoscore, and with views lidar and alignment), or a list of names
            from :data:`METRIC_NAMES` (the monitor's registry, with the opt-in sigreg, twonn and
            mle_dimension, plus cka).
            An unknown name raises ``ValueError`` naming the closest known ones.
        reference: embeddings of the *same N samples* in the same row order, any width, in any of the
            forms ``embeddings`` takes: adds ``"cka"``, linear CKA between the two sets.
        max_samples: the bounded uniform sample kept by uniformity, LID, TwoNN and MLE (the monitor's
            8,192 by default); with N ≤ max_samples every row is used.
        batch_size: rows per batch when a tensor or array is streamed (iterables keep their batches).
        device: where to compute (``"cuda"``); default: where each batch is (numpy: CPU).
        drop_nonfinite: skip rows with NaN/inf (in embeddings or reference; samples with any
            non-finite view). By default they raise :class:`NonFiniteRowsError`, which counts them.
        progress: a tqdm progress bar over the rows.

    Returns:
        ``{name: value}`` as Python floats.

    Raises:
        ValueError: bad arguments, wrong shapes, mismatched rows for ``reference``, non-finite rows,
            or a metric that cannot be computed on this input (too few samples for LID's k, ...),
            named in the message.

    Example:
        >>> import torch
        >>> from reprmetrics import evaluate
        >>> values = evaluate(torch.randn(1000, 32), metrics=["rankme", "normalized_std"])
        >>> sorted(values), 25 < values["rankme"] <= 32
        (['normalized_std', 'rankme'], True)
    """
    return _run(
        embeddings,
        views,
        metrics,
        reference,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        drop_nonfinite=drop_nonfinite,
        progress=progress,
    ).values
