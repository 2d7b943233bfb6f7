r"""Streaming intrinsic dimension: :class:`LocalIntrinsicDimension`, :class:`TwoNN`, :class:`MLEDimension`.

kNN estimators need the points themselves, so each class keeps a bounded uniform sample of at most
``max_samples`` embeddings (:class:`~reprmetrics._sampling.BoundedSampleMetric`: the same points on
every rank after a DDP sync) and, at ``compute()``, runs the estimator of
:mod:`reprmetrics.functional.intrinsic_dimension` on it with exact blocked kNN over all retained
points (each point excluded from its own neighbours). Every rank computes the same value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_positive_int
from reprmetrics.functional.intrinsic_dimension import (
    _check_discard_fraction,
    _check_estimator,
    _geometric_mean,
    _lid_from_distances,
    _mle_from_distances,
    _twonn_from_distances,
)
from reprmetrics.statistics import BoundedSample, cached, sample_knn

__all__ = ["LocalIntrinsicDimension", "MLEDimension", "TwoNN"]


class _SampledDimension(BoundedSample):
    """Shared attributes of the dimension estimators."""

    higher_is_better = True
    plot_lower_bound = 0.0


class LocalIntrinsicDimension(_SampledDimension):
    r"""Geometric mean of the per-sample local intrinsic dimensionality (LDReg, Huang et al., ICLR 2024).

    For each retained sample, with :math:`r_1 \le \dots \le r_k` its distances to its k nearest
    neighbours among the other retained samples,

    .. math::
        \text{mle:}\ \mathrm{LID}_i = -\frac{k}{\sum_{j=1}^{k-1} \log(r_j / r_k)}, \qquad
        \text{mom:}\ \mathrm{LID}_i = \frac{m}{r_k - m},\ m = \tfrac{1}{k-1}\textstyle\sum_{j<k} r_j,

    and the reported value is the geometric mean :math:`\exp\big(\frac{1}{N}\sum_i \log \mathrm{LID}_i\big)`,
    as LDReg reports it. Equals the geometric mean of
    :func:`reprmetrics.functional.local_intrinsic_dimension` on the retained sample; with fewer
    than ``max_samples`` points seen, on the concatenation of every batch of every rank.

    Dimensional collapse can be local: a representation can span many directions globally while each
    neighbourhood is nearly flat. Higher is better (``higher_is_better = True``).

    Degenerate neighbourhoods: a per-sample LID is 0 for a collapsed neighbourhood (with ``mle``, any
    exact duplicate among the neighbours) and :data:`~reprmetrics.functional.intrinsic_dimension.LID_CAP`
    ≈ 3.4e38 for equidistant neighbours. Before averaging, each log LID is clamped to ±log(LID_CAP)
    ≈ ±88.7, so the mean is finite: one duplicate lowers it by a factor exp(−88.7/N) (negligible),
    a fully collapsed sample gives 1/LID_CAP ≈ 2.9e-39.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor (any precision; upcast).

    As output of ``compute``:
        - a scalar tensor (``torch.get_default_dtype()``), the geometric-mean LID.

    :meth:`per_sample` returns the ``(N,)`` per-sample LIDs behind the last value, e.g. for a
    histogram.

    Args:
        k: number of neighbours, ≥ 2; ``compute()`` needs more than k retained samples.
        estimator: ``"mle"`` or ``"mom"``.
        max_samples: at most this many embeddings are kept (a uniform random subset, identical on
            every rank).
        seed: seeds the sampling keys (combined with the rank).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import LocalIntrinsicDimension
        >>> metric = LocalIntrinsicDimension(k=20)
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(4, 64, generator=g)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(500, 4, generator=g) @ basis)   # a 4-D subspace
        >>> 3.0 < metric.compute().item() < 5.0
        True
        >>> metric.per_sample().shape
        torch.Size([2000])
    """

    def __init__(
        self, k: int = 20, estimator: str = "mle", max_samples: int = 25_600, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        name = type(self).__name__
        self.k = check_positive_int(k, name, "k", minimum=2)
        self.estimator = _check_estimator(estimator, name)
        self._min_samples = self.k + 1
        self._per_sample: Tensor | None = None

    registry_name = "lid"
    in_default_set = True

    def _per_sample_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> Tensor:
        distances = sample_knn(stat, cache, "LocalIntrinsicDimension", self.k)
        with no_autocast(distances.device):
            return cached(
                cache, ("lid", self.k, self.estimator), lambda: _lid_from_distances(distances, self.estimator)
            )

    def values_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> dict[str, Tensor]:
        lid = self._per_sample_from(stat, cache)
        with no_autocast(lid.device):
            return {"": _geometric_mean(lid)}

    def artifacts_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> dict[str, Any]:
        return {"lid_per_sample": self._per_sample_from(stat, cache)}

    def compute(self) -> Tensor:
        """Geometric-mean LID of the retained samples; also sets what :meth:`per_sample` returns."""
        cache: dict[Any, Any] = {}
        value = self.values_from(self, cache)[""]
        self._per_sample = self._per_sample_from(self, cache).to(torch.get_default_dtype())
        return value.to(torch.get_default_dtype())

    def per_sample(self) -> Tensor:
        """``(N,)`` per-sample LIDs of the retained samples, as of the last :meth:`compute` (run if none
        since the last update; every rank must then call this together, as for ``compute()``)."""
        if self._per_sample is None:
            self.compute()
        assert self._per_sample is not None
        return self._per_sample

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        super().update(embeddings)
        self._per_sample = None

    def reset(self) -> None:
        super().reset()
        self._per_sample = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # torchmetrics moves states and the cached value with .to()/.cuda(); the per-sample values
        # behind that cached value must follow them.
        this = super()._apply(fn, *args, **kwargs)
        if getattr(this, "_per_sample", None) is not None:
            this._per_sample = fn(this._per_sample)
        return this


class TwoNN(_SampledDimension):
    r"""TwoNN intrinsic dimension (Facco et al., *Scientific Reports* 2017) of the retained sample.

    With :math:`\mu_i = r_2/r_1` (second over first neighbour distance) sorted ascending, N the
    points with :math:`r_1 > 0` and :math:`n = \lfloor N(1 - f) \rfloor` ratios kept,

    .. math::
        d = \frac{\sum_{i \le n} \log \mu_i \cdot (-\log(1 - i/N))}{\sum_{i \le n} (\log \mu_i)^2},

    exactly as scikit-dimension's ``TwoNN``; see :func:`reprmetrics.functional.twonn_dimension` for
    degenerate input (duplicates dropped; everything duplicated gives 0). Higher means the
    representation spans more dimensions (``higher_is_better = True``).

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor.

    As output of ``compute``:
        - a scalar tensor (``torch.get_default_dtype()``).

    Args:
        discard_fraction: fraction of the largest ratios left out of the fit, in (0, 1).
        max_samples, seed, kwargs: as for :class:`LocalIntrinsicDimension`.

    Example:
        >>> import torch
        >>> from reprmetrics import TwoNN
        >>> metric = TwoNN()
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(3, 64, generator=g)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(500, 3, generator=g) @ basis)   # a 3-D subspace
        >>> round(metric.compute().item())
        3
    """

    _min_samples = 3

    def __init__(self, discard_fraction: float = 0.1, max_samples: int = 25_600, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        self.discard_fraction = _check_discard_fraction(discard_fraction, type(self).__name__)

    registry_name = "twonn"  # opt-in

    def values_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> dict[str, Tensor]:
        distances = sample_knn(stat, cache, "TwoNN", 2)  # the first 2 of a larger k computed for LID serve
        with no_autocast(distances.device):
            return {"": _twonn_from_distances(distances[:, 0], distances[:, 1], self.discard_fraction)}

    def compute(self) -> Tensor:
        """TwoNN dimension of the retained samples."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())


class MLEDimension(_SampledDimension):
    r"""Global MLE intrinsic dimension (Levina & Bickel 2004, harmonic pooling of MacKay & Ghahramani).

    .. math::
        \hat m_i = \frac{k - 1}{\sum_{j=1}^{k-1} \log(r_k / r_j)}, \qquad
        d = \Big(\frac{1}{N} \sum_i \hat m_i^{-1}\Big)^{-1},

    as scikit-dimension's ``MLE().fit(X, n_neighbors=k)``, over the retained sample; see
    :func:`reprmetrics.functional.mle_dimension` for degenerate input (any exact duplicate gives 0,
    as in scikit-dimension). Higher is better (``higher_is_better = True``).

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor.

    As output of ``compute``:
        - a scalar tensor (``torch.get_default_dtype()``).

    Args:
        k: number of neighbours, ≥ 2; ``compute()`` needs more than k retained samples.
        max_samples, seed, kwargs: as for :class:`LocalIntrinsicDimension`.

    Example:
        >>> import torch
        >>> from reprmetrics import MLEDimension
        >>> metric = MLEDimension(k=20)
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(5, 64, generator=g)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(500, 5, generator=g) @ basis)   # a 5-D subspace
        >>> 4.0 < metric.compute().item() < 6.0
        True
    """

    def __init__(self, k: int = 20, max_samples: int = 25_600, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        self.k = check_positive_int(k, type(self).__name__, "k", minimum=2)
        self._min_samples = self.k + 1

    registry_name = "mle_dimension"  # opt-in

    def values_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> dict[str, Tensor]:
        distances = sample_knn(stat, cache, "MLEDimension", self.k)
        with no_autocast(distances.device):
            return {"": _mle_from_distances(distances)}

    def compute(self) -> Tensor:
        """MLE dimension of the retained samples."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())
