r"""Streaming :class:`NormalizedStd`, SimSiam's complete-collapse indicator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import (
    centred_moments_count,
    centred_moments_state,
    centred_moments_update_,
    merge_centred_moments,
    no_autocast,
)
from reprmetrics._validation import check_tensor
from reprmetrics._linalg import l2_normalize_rows
from reprmetrics.functional.collapse import _normalized_std_from_state

__all__ = ["NormalizedStd"]


class NormalizedStd(ReprMetric):
    r"""Mean per-dimension standard deviation of L2-normalised embeddings, streamed.

    .. math::
        \hat z_i = z_i / \lVert z_i \rVert_2, \qquad
        \operatorname{std} = \frac{1}{D} \sum_{d=1}^{D} \operatorname{std}_i(\hat z_{i,d})

    State: per-dimension shifted centred moments of ẑ (N, a shift, Σ(ẑ − c), Σ(ẑ − c)²; one ``(4, D)``
    float64 tensor) merged exactly across batches and ranks (Chan et al.; see
    :func:`reprmetrics._linalg.merge_centred_moments`), so collapse towards a point far from the
    origin does not cancel. Equals :func:`reprmetrics.functional.normalized_std` on the concatenation
    of all batches.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)``.

    As output of ``compute``:
        - a scalar float32 tensor: about :math:`1/\sqrt{D}` when healthy, 0 for complete collapse
          (SimSiam, Chen & He 2021); higher is better.

    Example:
        >>> import torch
        >>> from reprmetrics import NormalizedStd
        >>> metric = NormalizedStd()
        >>> metric.update(torch.ones(100, 32))   # every embedding identical
        >>> metric.compute().item()
        0.0
    """

    higher_is_better = True
    plot_lower_bound = 0.0

    moments: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("moments", centred_moments_state(diagonal=True), dist_reduce_fx=merge_centred_moments)

    def _check_batch(self, embeddings: Tensor) -> Tensor:
        known = self.moments.shape[1] if self.moments.numel() else None
        return check_tensor(embeddings, "NormalizedStd", min_rows=0, features=known)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch; bad input raises ``ValueError`` and leaves the state unchanged."""
        z = self._check_batch(embeddings)
        with no_autocast(z.device):
            zn = l2_normalize_rows(z.to(device=self.moments.device, dtype=torch.float64))
            self.moments = centred_moments_update_(self.moments, zn)

    def compute(self) -> Tensor:
        n = centred_moments_count(self.moments)
        if n == 0:
            raise ValueError("NormalizedStd: compute() called before any update() (no embeddings seen)")
        if n < 2:
            raise ValueError(f"NormalizedStd: needs at least 2 samples, got {n}")
        return _normalized_std_from_state(self.moments).to(torch.get_default_dtype())
