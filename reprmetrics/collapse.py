r"""Streaming :class:`NormalizedStd`, SimSiam's complete-collapse indicator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_tensor
from reprmetrics.functional.collapse import _l2_normalize, _normalized_std_from_sums

__all__ = ["NormalizedStd"]


class NormalizedStd(ReprMetric):
    r"""Mean per-dimension standard deviation of L2-normalised embeddings, streamed.

    .. math::
        \hat z_i = z_i / \lVert z_i \rVert_2, \qquad
        \operatorname{std} = \frac{1}{D} \sum_{d=1}^{D} \operatorname{std}_i(\hat z_{i,d})

    States: Σẑ and Σẑ² (D each, float64) and N, sum-reduced across ranks. Equals
    :func:`reprmetrics.functional.normalized_std` on the concatenation of all batches.

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

    total: Tensor
    total_sq: Tensor
    num_samples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _check_batch(self, embeddings: Tensor) -> Tensor:
        known = self.total.shape[0] if self.total.numel() else None
        return check_tensor(embeddings, "NormalizedStd", features=known)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch; bad input raises ``ValueError`` and leaves the state unchanged."""
        known = self.total.shape[0] if self.total.numel() else None
        z = self._check_batch(embeddings)
        with no_autocast(z.device):
            zn = _l2_normalize(z.to(device=self.total.device, dtype=torch.float64))
            if known is None:
                self.total = torch.zeros(z.shape[1], dtype=torch.float64, device=self.total.device)
                self.total_sq = torch.zeros_like(self.total)
            self.total += zn.sum(0)
            self.total_sq += zn.square().sum(0)
            self.num_samples += z.shape[0]

    def compute(self) -> Tensor:
        n = int(self.num_samples)
        if n == 0:
            raise ValueError("NormalizedStd: compute() called before any update() (no embeddings seen)")
        if n < 2:
            raise ValueError(f"NormalizedStd: needs at least 2 samples, got {n}")
        return _normalized_std_from_sums(self.total, self.total_sq, n).to(torch.get_default_dtype())
