r"""Streaming representation similarity: :class:`LinearCKA` and :class:`MinibatchCKA`.

Both compare two representations of the same samples (``x`` of shape ``(B, D1)``, ``y`` of shape
``(B, D2)``, rows paired) and keep only sums, so memory and a DDP sync do not grow with N.
"""

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
from reprmetrics._validation import check_positive_int
from reprmetrics.functional.similarity import (
    _MIN_ROWS_BIASED,
    _MIN_ROWS_UNBIASED,
    _check_kernel,
    _check_pair,
    _cka_from_hsic,
    _hsic_terms,
    _linear_cka_from_moments,
)

__all__ = ["LinearCKA", "MinibatchCKA"]


class LinearCKA(ReprMetric):
    r"""Linear CKA (Kornblith et al., ICML 2019), streamed exactly over batches and ranks.

    .. math::
        \operatorname{CKA}(X, Y) =
        \frac{\lVert \tilde X^\top \tilde Y \rVert_F^2}
             {\lVert \tilde X^\top \tilde X \rVert_F \, \lVert \tilde Y^\top \tilde Y \rVert_F}

    over all rows seen, :math:`\tilde X, \tilde Y` column-centred. The state is the packed centred
    moments of ``concat([x, y], dim=1)`` (count, shift, Σ(z − c), Σ(z − c)(z − c)ᵀ with the shift c
    the first row seen; ``reprmetrics._linalg``), whose scatter blocks are X̃ᵀX̃, X̃ᵀỸ and ỸᵀỸ.
    Ranks and ``forward()`` merge it exactly (Chan et al.'s pairwise update, a custom
    ``dist_reduce_fx``): memory and DDP traffic O((D1 + D2)²), never O(N), and no cancellation when
    the embeddings sit far from the origin (tested at offsets of 1e8 × the spread). Equals
    :func:`reprmetrics.functional.linear_cka` on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``x`` (:class:`~torch.Tensor`): ``(B, D1)``, any floating dtype (upcast to float64).
        - ``y`` (:class:`~torch.Tensor`): ``(B, D2)``, the same B samples; D2 may differ from D1.

    As output of ``compute``:
        - a scalar tensor (default dtype) in [0, 1]; higher is more similar. 0 when x or y has zero
          variance over everything seen (CKA undefined; see :mod:`reprmetrics.functional.similarity`).

    Args:
        num_features: ``(D1, D2)``, if known up front. Otherwise taken from the first batch, and under
            DDP every rank must then see at least one batch before ``compute()``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import LinearCKA
        >>> metric = LinearCKA()
        >>> projection = torch.randn(32, 8)
        >>> for _ in range(4):
        ...     x = torch.randn(256, 32) + 1e3          # a large common offset is harmless
        ...     metric.update(x, x @ projection)
        >>> 0.0 < metric.compute().item() < 1.0
        True
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    moments: Tensor
    num_features_x: Tensor

    def __init__(self, num_features: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dx = 0
        total = None
        if num_features is not None:
            if not isinstance(num_features, (tuple, list)) or len(num_features) != 2:
                raise ValueError(f"LinearCKA: `num_features` must be a pair (D1, D2), got {num_features!r}")
            dx = check_positive_int(num_features[0], "LinearCKA", "num_features[0]")
            total = dx + check_positive_int(num_features[1], "LinearCKA", "num_features[1]")
        self.add_state("moments", centred_moments_state(total), dist_reduce_fx=merge_centred_moments)
        # D1, where the joint moments split into x and y; "max" carries it to ranks that saw nothing.
        self.add_state("num_features_x", torch.tensor(dx, dtype=torch.long), dist_reduce_fx="max")

    def _known_widths(self) -> tuple[int, int] | None:
        if self.moments.numel() == 0:
            return None
        dx = int(self.num_features_x)
        return dx, self.moments.shape[1] - dx

    def _check_batch(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        return _check_pair(x, y, "LinearCKA", 0, widths=self._known_widths())

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of paired rows. Raises ``ValueError`` (state untouched) on bad input."""
        xs, ys = self._check_batch(x, y)
        self.accumulate(xs, ys)

    def accumulate(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> None:
        """Add checked rows (no checks, no host sync); ``weights``: 0/1 per row, rows with 0 left out (they must be
        finite)."""
        with no_autocast(x.device):
            device = self.num_features_x.device
            joint = torch.cat(
                [x.to(device=device, dtype=torch.float64), y.to(device=device, dtype=torch.float64)], dim=1
            )
            self.moments = centred_moments_update_(self.moments, joint, weights)
        self.num_features_x.fill_(x.shape[1])

    def compute(self) -> Tensor:
        """Linear CKA of everything seen so far."""
        n = centred_moments_count(self.moments)
        if n == 0:
            raise ValueError("LinearCKA: compute() called before any update() (no samples seen)")
        if n < _MIN_ROWS_BIASED:
            raise ValueError(f"LinearCKA: needs at least {_MIN_ROWS_BIASED} samples, got {n}")
        with no_autocast(self.moments.device):
            value = _linear_cka_from_moments(self.moments, int(self.num_features_x))
        return value.to(torch.get_default_dtype())


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
        xs, ys = _check_pair(x, y, "MinibatchCKA", 0, widths=self._widths)
        if 0 < xs.shape[0] < _MIN_ROWS_UNBIASED:  # an empty batch (a rank without data) adds nothing
            _check_pair(x, y, "MinibatchCKA", _MIN_ROWS_UNBIASED, widths=self._widths)
        return xs, ys

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one minibatch of paired rows (an empty one adds nothing). Raises ``ValueError`` (state untouched) on
        bad input."""
        xs, ys = self._check_batch(x, y)
        if xs.shape[0] == 0:
            self._widths = (xs.shape[1], ys.shape[1])
            return
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
