r"""Streaming representation similarity: :class:`LinearCKA` and :class:`MinibatchCKA`.

Both compare two representations of the same samples (``x`` of shape ``(B, D1)``, ``y`` of shape
``(B, D2)``, rows paired) and keep only sums, so memory and a DDP sync do not grow with N.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import no_autocast
from reprmetrics.functional.similarity import (
    _MIN_ROWS_UNBIASED,
    _cka_from_hsic,
    _check_kernel,
    _check_pair,
    _hsic_terms,
)

__all__ = ["MinibatchCKA"]


class MinibatchCKA(ReprMetric):
    r"""Minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021), streamed over minibatches and ranks.

    Each ``update(x, y)`` is one minibatch :math:`b` of :math:`n_b \ge 4` paired rows; with
    :math:`\operatorname{HSIC}_1` the unbiased estimator of Song et al. (2012) on that minibatch's
    kernels :math:`K_b, L_b` (see :func:`reprmetrics.functional.cka`),

    .. math::
        \operatorname{CKA}_{\text{minibatch}} =
        \frac{\sum_b \operatorname{HSIC}_1(K_b, L_b)}
             {\sqrt{\sum_b \operatorname{HSIC}_1(K_b, K_b)\,\sum_b \operatorname{HSIC}_1(L_b, L_b)}}

    over every minibatch of every rank. Each minibatch's HSIC carries its own 1/(n(n − 3))
    normalisation, so minibatches count equally whatever their size (as in the paper, where they
    all have the same size). Because the estimator is unbiased, the value converges to the
    population CKA as minibatches accumulate, unlike the biased CKA of each minibatch averaged. For a
    single minibatch it equals ``cka(x, y, kernel, sigma, debiased=True)``.

    With ``kernel="rbf"`` the bandwidth is set per minibatch and per representation from that
    minibatch's median squared distance (the convention of :func:`reprmetrics.functional.cka`).

    States: three float64 sums and a minibatch count, sum-reduced across ranks (O(1) traffic).
    Compute cost per minibatch: two :math:`n_b \times n_b` kernels, so keep minibatches moderate.

    As input to ``update``:
        - ``x`` (:class:`~torch.Tensor`): ``(B, D1)``, B ≥ 4.
        - ``y`` (:class:`~torch.Tensor`): ``(B, D2)``, the same B samples.

    As output of ``compute``:
        - a scalar tensor (default dtype) in [−1, 1]; 1 for identical representations up to rotation
          and scale; higher is more similar. 0 when every minibatch of ``x`` or of ``y`` has zero
          variance (CKA undefined; see :mod:`reprmetrics.functional.similarity`).

    Args:
        kernel: ``"linear"`` (the paper's choice) or ``"rbf"``.
        sigma: RBF bandwidth as a fraction of the median pairwise distance (ignored for linear).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import MinibatchCKA
        >>> metric = MinibatchCKA()
        >>> rotation, _ = torch.linalg.qr(torch.randn(16, 16))
        >>> for _ in range(5):
        ...     x = torch.randn(64, 16)
        ...     metric.update(x, 2.0 * x @ rotation)
        >>> round(metric.compute().item(), 4)
        1.0
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    _reset_attributes = ("_widths",)

    hsic_xy: Tensor
    hsic_xx: Tensor
    hsic_yy: Tensor
    num_batches: Tensor

    def __init__(self, kernel: str = "linear", sigma: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sigma = _check_kernel(kernel, sigma, "MinibatchCKA")
        self.kernel = kernel
        for name in ("hsic_xy", "hsic_xx", "hsic_yy"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_batches", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._widths: tuple[int, int] | None = None  # (D1, D2) of earlier minibatches

    def _check_batch(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        return _check_pair(x, y, "MinibatchCKA", _MIN_ROWS_UNBIASED, widths=self._widths)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one minibatch of paired rows. Raises ``ValueError`` (state untouched) on bad input."""
        xs, ys = self._check_batch(x, y)
        with no_autocast(xs.device):
            # The RBF bandwidth check can still reject the batch, so compute before touching state.
            terms = _hsic_terms(xs, ys, self.kernel, self.sigma, True, "MinibatchCKA").to(self.hsic_xy.device)
        self.hsic_xy += terms[0]
        self.hsic_xx += terms[1]
        self.hsic_yy += terms[2]
        self.num_batches += 1
        self._widths = (xs.shape[1], ys.shape[1])

    def compute(self) -> Tensor:
        """Minibatch CKA over every minibatch seen so far."""
        if int(self.num_batches) == 0:
            raise ValueError("MinibatchCKA: compute() called before any update() (no minibatches seen)")
        return _cka_from_hsic(self.hsic_xy, self.hsic_xx, self.hsic_yy).to(torch.get_default_dtype())

    def reset(self) -> None:
        super().reset()
        self._widths = None
