r"""Streaming :class:`NormalizedStd`, SimSiam's complete-collapse indicator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import no_autocast
from reprmetrics.functional.collapse import _normalized_std_from_state
from reprmetrics.statistics import RowMoments, moments_checked

__all__ = ["NormalizedStd"]


class NormalizedStd(RowMoments):
    r"""Mean per-dimension standard deviation of L2-normalised embeddings, streamed.

    .. math::
        \hat z_i = z_i / \lVert z_i \rVert_2, \qquad
        \operatorname{std} = \frac{1}{D} \sum_{d=1}^{D} \operatorname{std}_i(\hat z_{i,d})

    State: per-dimension shifted centred moments of ẑ (N, a shift, Σ(ẑ − c), Σ(ẑ − c)²; one ``(4, D)``
    float64 tensor, :class:`~reprmetrics.statistics.RowMoments` with ``normalize=True``) merged exactly
    across batches and ranks (Chan et al.; see :func:`reprmetrics._linalg.merge_centred_moments`), so
    collapse towards a point far from the origin does not cancel. Beside coding rate or Wasserstein
    uniformity (in the tracker and ``evaluate``) it reads the diagonal of their shared full moments. Equals
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

    registry_name = "normalized_std"
    in_default_set = True
    higher_is_better = True
    plot_lower_bound = 0.0
    needs_full_moments = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(normalize=True, diagonal=True, **kwargs)

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "NormalizedStd", 2)
        with no_autocast(stat.moments.device):
            return {"": _normalized_std_from_state(stat.moments.to(torch.float64))}

    def compute(self) -> Tensor:
        return self.values_from(self, {})[""].to(torch.get_default_dtype())
