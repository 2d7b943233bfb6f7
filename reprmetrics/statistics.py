r"""Shared streaming statistics: what the Metric classes are computed from.

Every Metric class *is* the statistic it reads (it inherits its states and its update) plus a way to
compute its value from it. Metrics that read the same statistic can therefore share one:

- :class:`RowMoments` — exact centred second moments of the rows (count, a shift, Σ(z − c),
  Σ(z − c)(z − c)ᵀ; ``normalize=True``: of the L2-normalised rows), merged exactly across batches and
  ranks. Read by RankMe (its un-centred Gram ZᵀZ = scatter + N·μμᵀ), α-ReQ, NESum, IsoScore, and on
  normalised rows by coding rate, Wasserstein uniformity and normalised std.
- :class:`BoundedSample` — a uniform random sample of at most ``max_samples`` rows, the same on
  every rank. Read by uniformity, LID, TwoNN and MLE.
- :class:`ViewMoments` — the within-sample scatter and the moments of the per-sample mean view.
  Read by LiDAR.
- :class:`PairDistances` — the sum of the views' pair distances. Read by alignment.

Alone, a Metric class keeps its own statistic (``RankMe().update(z)``). Where several metrics watch
the same rows — :class:`reprmetrics.metric_set.MetricSet`, used by the tracker and
:func:`reprmetrics.evaluate` — each batch is checked once, converted once (:class:`Batch`), and feeds
one instance per statistic; under DDP each statistic syncs once, and one eigendecomposition per
matrix serves every metric that reads it (the ``cache`` of :meth:`ReprMetric.values_from`). In a
torchmetrics ``MetricCollection(compute_groups=True)`` metrics of the same statistic have identical
states, so torchmetrics groups them too.

Non-finite rows: the shared path weights them out (a 0/1 ``weights`` vector, no host sync) instead of
indexing them out; a Metric's own ``update()`` raises on them, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import (
    add_gram_,
    centred_moments,
    centred_moments_count,
    centred_moments_state,
    centred_moments_update_,
    l2_normalize_rows,
    merge_centred_moments,
    no_autocast,
)
from reprmetrics._validation import check_positive_int, check_tensor, result_dtype

__all__ = ["Batch", "BoundedSample", "PairDistances", "RowMoments", "Statistic", "ViewMoments", "cached", "finite_rows"]


def cached(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, computed once by ``make()``: what metrics reading one statistic share at compute."""
    if key not in cache:
        cache[key] = make()
    return cache[key]


class Batch:
    """One batch, checked and converted once; each statistic reads the form it needs (computed on first use).

    Args:
        data: ``(B, D)`` rows or ``(B, q, D)`` views (q ≥ 2). Rows whose weight is 0 may hold anything
            (NaN): every form below except :attr:`raw_points` has them set to 0.
        weights: ``(B,)`` 0/1 tensor, or None when every row counts (and is finite).
    """

    def __init__(self, data: Tensor, weights: Tensor | None = None) -> None:
        self.data = data
        self.weights = weights
        self.input_eps = torch.finfo(data.dtype).eps if data.is_floating_point() else torch.finfo(torch.float32).eps

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @cached_property
    def raw_points(self) -> Tensor:
        """The rows (first view of each sample) in their own dtype, at least float32, as given: rows of
        weight 0 are not cleaned (the bounded sample keys them out instead of copying the batch)."""
        points = self.data if self.data.ndim == 2 else self.data[:, 0]
        return points.to(result_dtype(points))

    @cached_property
    def points64(self) -> Tensor:
        """The rows in float64, rows of weight 0 set to 0."""
        points = self.data if self.data.ndim == 2 else self.data[:, 0]
        return self._cleaned(points.to(torch.float64, copy=self.weights is not None))

    @cached_property
    def normalized64(self) -> Tensor:
        """The rows L2-normalised in float64 (a zero row, and a row of weight 0, stays zero)."""
        return l2_normalize_rows(self.points64)

    @cached_property
    def views64(self) -> Tensor:
        if self.data.ndim != 3:
            raise ValueError("Batch: views were asked of a batch of rows")
        return self._cleaned(self.data.to(torch.float64, copy=self.weights is not None))

    def _cleaned(self, x: Tensor) -> Tensor:
        if self.weights is not None:
            x.masked_fill_((self.weights == 0).view(-1, *([1] * (x.ndim - 1))), 0.0)
        return x

    def count(self) -> Tensor | int:
        """Rows that count: a tensor when weighted (no host sync), else an int."""
        return self.rows if self.weights is None else self.weights.sum()


def finite_rows(x: Tensor) -> Tensor:
    """``(B,)`` bool: rows (or samples of views) whose every value is finite, in one pass."""
    # x·0 is exactly 0 where x is finite and NaN where it is ±inf or NaN: the row sum is finite exactly
    # when every value is, and (unlike a sum of x) cannot overflow.
    return torch.isfinite(x.mul(0).sum(dim=tuple(range(1, x.ndim))))


class Statistic(ReprMetric):
    """A streamed statistic that Metric classes read. Subclasses define the states and :meth:`accumulate`.

    Traits: ``input_kind`` (``"points"``: ``(B, D)``; ``"views"``: ``(B, q, D)``; ``"pairs"``: two
    views of the same samples) and ``statistic_name``.
    """

    input_kind: ClassVar[str] = "points"
    statistic_name: ClassVar[str] = ""

    def statistic_key(self) -> tuple[Any, ...]:
        """Metrics with equal keys read the same statistic (and can share one instance)."""
        return (self.statistic_name,)

    def new_statistic(self) -> Statistic:
        """A fresh, empty instance of the plain statistic this metric reads (for sharing)."""
        raise NotImplementedError

    def accumulate(self, batch: Batch) -> None:
        """Add a batch that was already checked (no checks, no host sync)."""
        raise NotImplementedError

    def compute(self) -> Tensor:
        """The plain statistic's "value": rows accumulated (metrics override)."""
        return torch.as_tensor(float(self.rows_seen()))

    def rows_seen(self) -> int:
        raise NotImplementedError


# ---- centred moments of the rows ----------------------------------------------------------------------
class RowMoments(Statistic):
    """Exact centred second moments of the rows (or of the L2-normalised rows), streamed and merged exactly.

    States: ``moments``, the packed ``(D + 3, D)`` centred moments of
    :func:`reprmetrics._linalg.centred_moments_update_` (``diagonal=True``: ``(4, D)``, per-feature
    variances only), merged across ranks by :func:`reprmetrics._linalg.merge_centred_moments`; and
    ``input_eps``, the machine epsilon of the coarsest input seen (what counts as a zero eigenvalue
    depends on it).

    Args:
        normalize: accumulate the L2-normalised rows (a zero row stays zero).
        num_features: D, if known up front (otherwise taken from the first batch).
        accumulate_dtype: float64 (default) or float32.
        diagonal: keep only the per-feature variances (O(D) instead of O(D²)).
    """

    statistic_name = "row_moments"
    _min_samples = 1
    dense_states = 1
    #: A reader that only needs the per-feature variances (normalised std) sets this to False.
    needs_full_moments: ClassVar[bool] = True

    moments: Tensor
    input_eps: Tensor

    def __init__(
        self,
        normalize: bool = False,
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        diagonal: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if num_features is not None:
            check_positive_int(num_features, name, "num_features")
        if accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{name}: `accumulate_dtype` must be torch.float32 or torch.float64, got {accumulate_dtype}"
            )
        if not isinstance(normalize, bool):
            raise ValueError(f"{name}: `normalize` must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.accumulate_dtype = accumulate_dtype
        self.diagonal = bool(diagonal)
        if self.diagonal:
            self.dense_states = 0
        self.add_state(
            "moments",
            centred_moments_state(num_features, dtype=accumulate_dtype, diagonal=self.diagonal),
            dist_reduce_fx=merge_centred_moments,
        )
        self.add_state("input_eps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def statistic_key(self) -> tuple[Any, ...]:
        return (self.statistic_name, self.normalize, self.accumulate_dtype)

    def new_statistic(self, diagonal: bool = False) -> RowMoments:
        return RowMoments(normalize=self.normalize, accumulate_dtype=self.accumulate_dtype, diagonal=diagonal)

    def known_features(self) -> int | None:
        return self.moments.shape[1] if self.moments.numel() else None

    def _check_batch(self, embeddings: Any) -> Tensor:
        return check_tensor(embeddings, type(self).__name__, min_rows=0, features=self.known_features())

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        self.accumulate(Batch(self._check_batch(embeddings)))

    def accumulate(self, batch: Batch) -> None:
        with no_autocast(batch.data.device):
            rows = batch.normalized64 if self.normalize else batch.points64
            self.moments = centred_moments_update_(self.moments, rows, batch.weights)
            self.input_eps.clamp_(min=batch.input_eps)

    def rows_seen(self) -> int:
        return centred_moments_count(self.moments)


def moments_checked(stat: RowMoments, metric: str, min_samples: int) -> int:
    """N of a row-moments statistic, or the ``ValueError`` a metric gives when it cannot compute."""
    n = stat.rows_seen()
    if n == 0:
        raise ValueError(f"{metric}: compute() called before any update() (no embeddings seen)")
    if n < min_samples:
        raise ValueError(f"{metric}: needs at least {min_samples} samples, got {n}")
    return n


def scatter_eigenvalues(stat: RowMoments, cache: dict[Any, Any]) -> tuple[int, Tensor, Tensor, Tensor]:
    """``(n, mean, scatter, eigenvalues of the scatter, descending ≥ 0)``: one eigendecomposition, shared."""
    from reprmetrics._linalg import eigvalsh_descending

    def make() -> tuple[int, Tensor, Tensor, Tensor]:
        n, mean, scatter = centred_moments(stat.moments.to(torch.float64))
        return n, mean, scatter, eigvalsh_descending(scatter)

    return cached(cache, "scatter_eigenvalues", make)


def uncentred_singular_values(stat: RowMoments, cache: dict[Any, Any]) -> Tensor:
    """Singular values of the un-centred matrix of the rows, from ZᵀZ = scatter + N·μμᵀ (one eigendecomposition)."""
    from reprmetrics.functional.spectral import _singular_values_from_gram

    def make() -> Tensor:
        n, mean, scatter = centred_moments(stat.moments.to(torch.float64))
        gram = scatter + n * torch.outer(mean, mean)
        return _singular_values_from_gram(gram, n, gram.shape[0], torch.finfo(stat.accumulate_dtype).eps)

    return cached(cache, "uncentred_singular_values", make)


# ---- a bounded uniform sample ------------------------------------------------------------------------
class BoundedSample(Statistic):
    """A uniform random sample of at most ``max_samples`` rows, the same on every rank after a sync.

    *Bottom-k sampling*: every incoming row gets a random key in [0, 1) and the rows with the
    ``max_samples`` smallest keys are kept. Each rank keeps its own bottom-k (memory bounded by about
    4·``max_samples`` rows per rank); at ``compute()`` the gathered rows of all ranks are reduced to
    the global bottom-k — a uniform random subset of every row seen by every rank, the same on every
    rank, because the keys travel with the rows. Rows weighted out get key +∞ and are never kept.
    Keys come from a CPU generator seeded with ``seed`` and the process's rank, so runs are
    reproducible and a CPU and a GPU run keep the same rows.

    States: ``samples`` and ``keys`` (lists, concatenated across ranks).
    """

    statistic_name = "bounded_sample"
    _min_samples = 1
    _reset_attributes = ("_num_features",)

    samples: list[Tensor]
    keys: list[Tensor]

    def __init__(self, max_samples: int = 25_600, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.max_samples = check_positive_int(max_samples, name, "max_samples")
        self.seed = check_positive_int(seed, name, "seed", minimum=0)
        self.add_state("samples", [], dist_reduce_fx="cat")
        self.add_state("keys", [], dist_reduce_fx="cat")
        self._generator: torch.Generator | None = None
        self._num_features: int | None = None

    def statistic_key(self) -> tuple[Any, ...]:
        return (self.statistic_name, self.max_samples, self.seed)

    def new_statistic(self) -> BoundedSample:
        return BoundedSample(max_samples=self.max_samples, seed=self.seed)

    def _keys_for(self, count: int, device: torch.device) -> Tensor:
        if self._generator is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        keys = torch.rand(count, generator=self._generator, dtype=torch.float64)
        if device.type == "cuda":  # a pinned, non-blocking copy does not stall the training stream
            return keys.pin_memory().to(device, non_blocking=True)
        return keys.to(device)

    def _check_batch(self, embeddings: Any) -> Tensor:
        return check_tensor(embeddings, type(self).__name__, min_rows=0, features=self._num_features)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        self.accumulate(Batch(self._check_batch(embeddings).detach()))

    def accumulate(self, batch: Batch) -> None:
        x = batch.raw_points.detach()  # half precision is stored as float32; rows keyed out need no cleaning
        keys = self._keys_for(x.shape[0], x.device)
        if batch.weights is not None:
            keys = torch.where(batch.weights > 0, keys, torch.full_like(keys, float("inf")))
        self._num_features = x.shape[1]
        self.samples.append(x)
        self.keys.append(keys)
        stored = sum(len(k) for k in self.keys)
        if stored > 4 * self.max_samples:  # compact: amortised O(D) work per row, each row copied about once
            samples, keys = self._bottom_k(dim_zero_cat(self.samples), dim_zero_cat(self.keys))
            self.samples, self.keys = [samples], [keys]

    def _bottom_k(self, samples: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        if len(keys) <= self.max_samples:
            return samples, keys
        keep = torch.topk(keys, self.max_samples, largest=False).indices.sort().values
        return samples[keep], keys[keep]

    def _sample(self) -> Tensor:
        """The kept rows (at most ``max_samples``; after a sync, the same on every rank)."""
        return sample_points(self, {}, type(self).__name__, self._min_samples)

    def rows_seen(self) -> int:
        """Rows kept (at most ``max_samples`` after a sync or compaction; weighted-out rows excluded)."""
        if isinstance(self.keys, list) and not self.keys:
            return 0
        return int(torch.isfinite(dim_zero_cat(self.keys)).sum())

    def reset(self) -> None:
        # The key generator is kept: forward() resets too, and restarting the stream would repeat keys.
        super().reset()
        self._num_features = None

    # With persistent states the key generator travels too: a resumed stream draws new keys, not the first ones again.
    _GENERATOR_KEY = "key_generator_state"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._persistent.get("keys") and self._generator is not None:
            destination[prefix + self._GENERATOR_KEY] = self._generator.get_state()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        saved = state_dict.get(prefix + self._GENERATOR_KEY)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + self._GENERATOR_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + self._GENERATOR_KEY)
        if saved is not None:
            self._generator = torch.Generator()
            self._generator.set_state(saved.to(torch.uint8).cpu())


def sample_points(stat: BoundedSample, cache: dict[Any, Any], metric: str, min_samples: int) -> Tensor:
    """The kept rows (at most ``max_samples``, identical on every rank after a sync), or the metric's error."""

    def make() -> Tensor:
        # Lists while accumulating; one tensor each after a sync (torchmetrics concatenates them).
        if isinstance(stat.samples, list) and not stat.samples:
            return torch.empty(0)
        samples, keys = dim_zero_cat(stat.samples), dim_zero_cat(stat.keys)
        if keys.numel() == 0:
            return torch.empty(0)
        finite = torch.isfinite(keys)
        if not bool(finite.all()):
            samples, keys = samples[finite], keys[finite]
        return stat._bottom_k(samples, keys)[0]

    points = cached(cache, "sample", make)
    if points.shape[0] == 0:
        raise ValueError(f"{metric}: compute() called before any update() (no embeddings seen)")
    if points.shape[0] < min_samples:
        raise ValueError(f"{metric}: needs at least {min_samples} samples, got {points.shape[0]}")
    return points


def sample_knn(stat: BoundedSample, cache: dict[Any, Any], metric: str, k: int) -> Tensor:
    """``(N, k)`` distances to each kept row's k nearest other kept rows; a larger k computed before serves."""
    from reprmetrics._knn import knn

    points = sample_points(stat, cache, metric, k + 1)
    known = cache.get("knn")
    if known is None or known.shape[1] < k:
        with no_autocast(points.device):
            known, _ = knn(points, k)
        cache["knn"] = known
    return known[:, :k]


# ---- views: LiDAR's scatter matrices -------------------------------------------------------------------
class ViewMoments(Statistic):
    """The within-sample scatter of whole groups of views and the exact centred moments of the group means.

    States (float64): ``within`` = Σ_ij (z_ij − μ_i)(z_ij − μ_i)ᵀ (each group centred on its own mean
    inside its batch, sum-reduced), ``means_moments`` (packed centred moments of the μ_i, merged
    exactly), ``num_groups``, ``num_views`` (q, max-reduced), ``total_views`` (n·q, which checks that
    ranks agree on q) and ``input_eps``.
    """

    statistic_name = "view_moments"
    input_kind = "views"
    dense_states = 2
    _reset_attributes = ("_known_views",)

    within: Tensor
    means_moments: Tensor
    num_groups: Tensor
    num_views: Tensor
    total_views: Tensor
    input_eps: Tensor

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if num_features is not None:
            check_positive_int(num_features, name, "num_features")
        d = num_features or 0
        self.add_state("within", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("means_moments", centred_moments_state(num_features), dist_reduce_fx=merge_centred_moments)
        self.add_state("num_groups", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_views", torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")
        self.add_state("total_views", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("input_eps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self._known_views: int | None = None  # q of earlier batches, checked without a device sync

    def new_statistic(self) -> ViewMoments:
        return ViewMoments()

    def _check_batch(self, views: Any) -> Tensor:
        from reprmetrics.functional.multiview import _check_views

        known = self.within.shape[0] if self.within.numel() else None
        return _check_views(views, type(self).__name__, min_groups=0, features=known, num_views=self._known_views)

    def update(self, views: Tensor) -> None:
        """Add a ``(B, q, d)`` batch of whole groups. Raises ``ValueError`` (state untouched) on bad input."""
        self.accumulate(Batch(self._check_batch(views)))

    def accumulate(self, batch: Batch) -> None:
        b, q, d = batch.data.shape
        with no_autocast(batch.data.device):
            if self.within.numel() == 0:
                self.within = torch.zeros(d, d, dtype=torch.float64, device=self.within.device)
            views = batch.views64.to(self.within.device)
            means = views.mean(dim=1)
            centred = views - means.unsqueeze(1)  # groups of weight 0 are zero: so are their means and deviations
            add_gram_(self.within, centred.flatten(0, 1))
            self.means_moments = centred_moments_update_(self.means_moments, means, batch.weights)
            self.input_eps.clamp_(min=batch.input_eps)
            groups = batch.count()
            self.num_groups += groups if isinstance(groups, int) else groups.to(torch.long)
            self.num_views.fill_(q)
            self.total_views += groups * q if isinstance(groups, int) else (groups * q).to(torch.long)
        self._known_views = q

    def rows_seen(self) -> int:
        return int(self.num_groups)

    def reset(self) -> None:
        super().reset()
        self._known_views = None


# ---- views: alignment's pair distances ------------------------------------------------------------------
class PairDistances(Statistic):
    """Σ ‖x̂_i − ŷ_i‖^α over pairs of views (rows L2-normalised when ``normalize``) and the pair count."""

    statistic_name = "pair_distances"
    input_kind = "pairs"
    _reset_attributes = ("_num_features",)

    sum_distances: Tensor
    num_pairs: Tensor

    def __init__(self, alpha: float = 2.0, normalize: bool = True, **kwargs: Any) -> None:
        from reprmetrics._validation import check_nonnegative_float

        super().__init__(**kwargs)
        name = type(self).__name__
        self.alpha = check_nonnegative_float(alpha, name, "alpha", strictly_positive=True)
        self.normalize = bool(normalize)
        self.add_state("sum_distances", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._num_features: int | None = None

    def statistic_key(self) -> tuple[Any, ...]:
        return (self.statistic_name, self.alpha, self.normalize)

    def new_statistic(self) -> PairDistances:
        return PairDistances(alpha=self.alpha, normalize=self.normalize)

    def _check_batch(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        from reprmetrics.functional.multiview import _check_pair

        return _check_pair(x, y, type(self).__name__, features=self._num_features, min_rows=0)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of ``(B, D)`` pairs. Raises ``ValueError`` (state untouched) on bad input."""
        xs, ys = self._check_batch(x, y)
        self.accumulate(Batch(torch.stack([xs, ys.to(xs.dtype)], dim=1)))

    def accumulate(self, batch: Batch) -> None:
        from reprmetrics.functional.multiview import _alignment_distances

        views = batch.views64 if batch.weights is not None else batch.data
        with no_autocast(views.device):
            distances = _alignment_distances(views[:, 0], views[:, 1], self.alpha, self.normalize, type(self).__name__)
            if batch.weights is not None:
                distances = distances * batch.weights.to(distances)
        self.sum_distances += distances.sum().to(self.sum_distances.device)
        count = batch.count()
        self.num_pairs += count if isinstance(count, int) else count.to(self.num_pairs)
        self._num_features = views.shape[-1]

    def rows_seen(self) -> int:
        return int(self.num_pairs)

    def reset(self) -> None:
        super().reset()
        self._num_features = None
