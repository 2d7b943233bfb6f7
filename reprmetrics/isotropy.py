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

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_tensor
from reprmetrics.functional.isotropy import (
    _add_characteristic_sums_,
    _check_sigreg_arguments,
    _epps_pulley_grid,
    _normalized_directions,
    _seeded_directions,
    _sigreg_from_sums,
)

__all__ = ["SIGReg"]


class SIGReg(ReprMetric):
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

    higher_is_better = False
    plot_lower_bound = 0.0
    _reset_attributes = ("_num_features",)

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
        self.num_slices, self.seed, self.t_max, self.num_points = _check_sigreg_arguments(num_slices, seed, t_max, num_points, name)
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
        return check_tensor(embeddings, type(self).__name__, min_rows=1, features=self._num_features)

    def directions(self) -> Tensor:
        """The ``(D, K)`` unit directions (float64), once D is known (given, or after the first batch)."""
        if self._num_features is None:
            raise ValueError(f"{type(self).__name__}: the directions are drawn when the width is known; call update() first or pass `directions`")
        device = self.cos_sum.device
        if self._directions is None or self._directions.device != device or self._directions.shape[0] != self._num_features:
            if self._given_directions is not None:
                self._directions = self._given_directions.to(device)
            else:
                self._directions = _seeded_directions(self._num_features, self.num_slices, self.seed, device)
        return self._directions

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        z = self._check_batch(embeddings)
        with no_autocast(z.device):
            if self._num_features is None:
                self._num_features = z.shape[1]
            a = self.directions()
            t, _, _ = _epps_pulley_grid(self.t_max, self.num_points, a.device)
            _add_characteristic_sums_(self.cos_sum, self.sin_sum, z.to(device=a.device, dtype=torch.float64), a, t)
            self.num_samples += z.shape[0]

    def compute(self) -> Tensor:
        """SIGReg of everything seen so far."""
        n = int(self.num_samples)
        if n == 0:
            raise ValueError(f"{type(self).__name__}: compute() called before any update() (no embeddings seen)")
        with no_autocast(self.cos_sum.device):
            _, phi, weights = _epps_pulley_grid(self.t_max, self.num_points, self.cos_sum.device)
            value = _sigreg_from_sums(self.cos_sum, self.sin_sum, n, phi, weights)
        return value.to(torch.get_default_dtype())

    def reset(self) -> None:
        super().reset()
        if self._given_directions is None:
            self._num_features = None
