r"""Streaming isotropy metrics: :class:`WassersteinUniformity`, :class:`SIGReg` and :class:`IsoScore`.

Each keeps sufficient statistics, not embeddings, all reduced exactly across DDP ranks, so every rank
computes the same value as one process would on the concatenation of every batch:

- :class:`SIGReg`: per direction and per node, the sums of cos(t·y) and sin(t·y), and N (K × num_points
  numbers, sum-reduced).
- :class:`WassersteinUniformity`, :class:`IsoScore`: the exact centred moments (mean and scatter
  matrix) of the (normalised) embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_positive_int, check_tensor
from reprmetrics.functional.isotropy import (
    _add_characteristic_sums_,
    _check_isoscore_width,
    _check_sigreg_arguments,
    _epps_pulley_grid,
    _isoscore_from_state,
    _normalized_directions,
    _seeded_directions,
    _sigreg_from_sums,
    _wasserstein_uniformity_from_parts,
)
from reprmetrics.statistics import Batch, RowMoments, Statistic, moments_checked, scatter_eigenvalues

__all__ = ["IsoScore", "SIGReg", "WassersteinUniformity"]


class SIGReg(Statistic):
    r"""SIGReg, LeJEPA's sliced Epps–Pulley statistic (Balestriero & LeCun, 2025), streamed over batches.

    For K unit directions :math:`a_j` and the projections :math:`y_{ij} = z_i^\top a_j` of all
    embeddings seen,

    .. math::
        \mathrm{EP}_j = N \sum_{t} w_t \Big[\big(\tfrac1N \textstyle\sum_i \cos(t y_{ij}) - e^{-t^2/2}\big)^2
        + \big(\tfrac1N \textstyle\sum_i \sin(t y_{ij})\big)^2\Big], \qquad
        \mathrm{SIGReg} = \frac1K \sum_{j} \mathrm{EP}_j

    over the nodes :math:`t = 0, \Delta, \dots, t_{max}` with trapezoid weights
    :math:`(\Delta, 2\Delta, \dots, 2\Delta, \Delta) \cdot e^{-t^2/2}` (see
    :func:`reprmetrics.functional.sigreg`, which this equals on the concatenation of every batch of
    every rank). States: :math:`\sum_i \cos(t y_{ij})` and :math:`\sum_i \sin(t y_{ij})` (K × num_points
    each, float64) and N, all sum-reduced, so the statistic is exact for any split of the data over
    batches and ranks (LeJEPA's own DDP reduction averages per-rank means, which is exact only for
    equal per-rank batch sizes).

    The directions are drawn once from a CPU generator seeded with ``seed`` (identical on every rank
    and device; the global RNG is untouched) when the width D is known, or given as a ``(D, K)``
    ``directions`` tensor (columns normalised).

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor (any precision; upcast).

    As output of ``compute``:
        - a scalar float32 tensor ≥ 0; lower is closer to an isotropic standard Gaussian. Its expectation
          for N(0, I) samples is :math:`\sum_t w_t (1 - e^{-t^2})` ≈ 1.05 at the defaults, whatever N;
          for collapsed embeddings it grows like N.

    Args:
        num_slices: K, the number of random directions.
        seed: seed of the directions' generator.
        directions: optional ``(D, K)`` tensor of directions (replaces ``num_slices`` and ``seed``).
        t_max: the last node.
        num_points: the number of nodes (≥ 2), 0 included.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import SIGReg
        >>> metric = SIGReg()
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(1024, 64, generator=g))
        >>> metric.compute().item() < 1.5
        True
    """

    registry_name = "sigreg"  # opt-in: K projections per row cost more than a D×D update at small D
    higher_is_better = False
    plot_lower_bound = 0.0
    _reset_attributes = ("_num_features",)
    statistic_name = "characteristic_sums"

    cos_sum: Tensor
    sin_sum: Tensor
    num_samples: Tensor

    def __init__(
        self,
        num_slices: int = 256,
        seed: int = 0,
        directions: Tensor | None = None,
        t_max: float = 3.0,
        num_points: int = 17,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.num_slices, self.seed, self.t_max, self.num_points = _check_sigreg_arguments(
            num_slices, seed, t_max, num_points, name
        )
        self._given_directions: Tensor | None = None
        if directions is not None:
            self._given_directions = _normalized_directions(directions, name).detach().clone()
            self.num_slices = self._given_directions.shape[1]
        self._num_features: int | None = None if directions is None else self._given_directions.shape[0]
        self._directions: Tensor | None = None  # the (D, K) directions on the states' device, once D is known
        k = self.num_slices
        self.add_state("cos_sum", torch.zeros(k, self.num_points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sin_sum", torch.zeros(k, self.num_points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _check_batch(self, embeddings: Tensor) -> Tensor:
        return check_tensor(embeddings, type(self).__name__, min_rows=0, features=self._num_features)

    def directions(self) -> Tensor:
        """The ``(D, K)`` unit directions (float64), once D is known (given, or after the first batch)."""
        if self._num_features is None:
            raise ValueError(
                f"{type(self).__name__}: the directions are drawn when the width is known; call update() first"
                " or pass `directions`"
            )
        device = self.cos_sum.device
        if (
            self._directions is None
            or self._directions.device != device
            or self._directions.shape[0] != self._num_features
        ):
            if self._given_directions is not None:
                self._directions = self._given_directions.to(device)
            else:
                self._directions = _seeded_directions(self._num_features, self.num_slices, self.seed, device)
        return self._directions

    def statistic_key(self) -> tuple[Any, ...]:
        given = None if self._given_directions is None else id(self._given_directions)
        return (self.statistic_name, self.num_slices, self.seed, self.t_max, self.num_points, given)

    def new_statistic(self) -> SIGReg:
        return SIGReg(self.num_slices, self.seed, self._given_directions, self.t_max, self.num_points)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        self.accumulate(Batch(self._check_batch(embeddings)))

    def accumulate(self, batch: Batch) -> None:
        z = batch.points64 if batch.weights is not None else batch.raw_points
        with no_autocast(z.device):
            if self._num_features is None:
                self._num_features = z.shape[1]
            a = self.directions()
            delta = self.t_max / (self.num_points - 1)
            _add_characteristic_sums_(self.cos_sum, self.sin_sum, z.to(device=a.device), a, delta, batch.weights)
            count = batch.count()
            self.num_samples += count if isinstance(count, int) else count.to(torch.long)

    def rows_seen(self) -> int:
        return int(self.num_samples)

    def values_from(self, stat: SIGReg, cache: dict[Any, Any]) -> dict[str, Tensor]:
        n = stat.rows_seen()
        if n == 0:
            raise ValueError(f"{type(self).__name__}: compute() called before any update() (no embeddings seen)")
        with no_autocast(stat.cos_sum.device):
            _, phi, weights = _epps_pulley_grid(stat.t_max, stat.num_points, stat.cos_sum.device)
            return {"": _sigreg_from_sums(stat.cos_sum, stat.sin_sum, n, phi, weights)}

    def compute(self) -> Tensor:
        """SIGReg of everything seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())

    def reset(self) -> None:
        super().reset()
        if self._given_directions is None:
            self._num_features = None


class WassersteinUniformity(RowMoments):
    r"""Wasserstein uniformity (Fang et al., ICLR 2024), streamed over batches.

    With :math:`\hat z_i = z_i / \lVert z_i \rVert_2` for all embeddings seen, their mean μ and
    covariance Σ (divided by N),

    .. math::
        W_2 = \sqrt{\lVert \mu \rVert^2 + 1 + \operatorname{tr} \Sigma -
            \tfrac{2}{\sqrt D} \operatorname{tr} \Sigma^{1/2}},

    the 2-Wasserstein distance between :math:`\mathcal N(\mu, \Sigma)` and :math:`\mathcal N(0, I_D/D)`
    (see :func:`reprmetrics.functional.wasserstein_uniformity`, which this equals on the concatenation
    of every batch of every rank). State: the packed centred moments of the normalised rows, merged
    exactly across batches and ranks (:func:`reprmetrics._linalg.merge_centred_moments`).

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor (zero rows stay zero).

    As output of ``compute``:
        - a scalar float32 tensor in ``[0, √2]``; lower is better (about 0 for points uniform on the
          sphere, √2 when they all point one way).

    Args:
        num_features: D, if known up front (otherwise taken from the first batch).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import WassersteinUniformity
        >>> metric = WassersteinUniformity()
        >>> for _ in range(4):
        ...     metric.update(torch.randn(1000, 16))
        >>> metric.compute().item() < 0.1
        True
    """

    registry_name = "wasserstein_uniformity"
    in_default_set = True
    higher_is_better = False
    plot_lower_bound = 0.0

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(normalize=True, num_features=num_features, **kwargs)

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "WassersteinUniformity", 1)
        with no_autocast(stat.moments.device):
            n, mean, scatter, eigenvalues = scatter_eigenvalues(stat, cache)
            return {"": _wasserstein_uniformity_from_parts(n, mean, scatter, eigenvalues)}

    def compute(self) -> Tensor:
        """Wasserstein uniformity of everything seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())


class IsoScore(RowMoments):
    r"""IsoScore (Rudman et al., Findings of ACL 2022), streamed over batches.

    .. math::
        \operatorname{IsoScore} = \frac{k - 1}{D - 1}, \qquad
        k = \frac{(\operatorname{tr}\Sigma)^2}{\lVert\Sigma\rVert_F^2} =
            \frac{(\sum_k \lambda_k)^2}{\sum_k \lambda_k^2},

    with Σ the covariance of all embeddings seen: the paper's steps (PCA rotation, normalised
    diagonal, isotropy defect, dimensions used k) in closed form (see
    :func:`reprmetrics.functional.isoscore`, which this equals on the concatenation of every batch of
    every rank). State: the packed centred moments, merged exactly across batches and ranks. O(D²) at
    compute: no eigendecomposition.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor, D ≥ 2.

    As output of ``compute``:
        - a scalar float32 tensor in ``[0, 1]``; higher is more isotropic (1: isotropic covariance;
          0: one line, or no spread above the rounding of the input's dtype).

    Args:
        num_features: D, if known up front (otherwise taken from the first batch).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import IsoScore
        >>> metric = IsoScore()
        >>> for _ in range(4):
        ...     metric.update(torch.randn(1000, 8))
        >>> metric.compute().item() > 0.98
        True
    """

    registry_name = "isoscore"
    in_default_set = True
    min_features = 2
    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        if num_features is not None:
            check_positive_int(num_features, "IsoScore", "num_features")
            _check_isoscore_width(num_features, "IsoScore")
        super().__init__(normalize=False, num_features=num_features, **kwargs)

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "IsoScore", 2)
        _check_isoscore_width(stat.moments.shape[1], "IsoScore")
        with no_autocast(stat.moments.device):
            return {"": _isoscore_from_state(stat.moments.to(torch.float64), float(stat.input_eps))}

    def compute(self) -> Tensor:
        """IsoScore of everything seen so far (D = 1 raises here: every batch is accepted alike, as by
        the other metrics, so a ``MetricCollection`` never applies a batch to some members only)."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())
