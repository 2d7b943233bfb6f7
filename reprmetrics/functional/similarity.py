r"""Representation similarity: centred kernel alignment (CKA).

- :func:`linear_cka`: linear CKA (Kornblith et al., ICML 2019) in feature form, from the centred
  (co)variance blocks of ``concat([x, y], dim=1)``: O(N·(D1 + D2)²) work, no N×N matrix. The
  streaming :class:`reprmetrics.LinearCKA` accumulates the same packed centred moments.
- :func:`cka`: the Gram-matrix form (N×N kernels, for moderate N) with a linear or RBF kernel and the
  biased HSIC (Kornblith et al.) or the unbiased HSIC estimator of Song et al. (JMLR 2012), as used by
  Nguyen, Raghu & Kornblith (ICLR 2021, "Do wide and deep networks learn the same things?").

Conventions shared by every CKA in this package:

- Work happens in float64 on column-centred features (the mean is subtracted first), so a common
  offset far larger than the spread does not cancel digits.
- A representation with zero variance (every row the same) makes CKA 0/0. We return **0** for it
  (and for any other case where a self-similarity term is 0): a constant representation keeps nothing
  of the other one, and a drift monitor must see a collapse to one point as maximal drift, not as an
  error. "Zero" means the centred Frobenius norm is at most ``4·√N·ε₆₄`` times the un-centred one,
  which is what float64 round-off of forming the mean leaves of identical rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reprmetrics._linalg import centred_moments, centred_moments_of, no_autocast
from reprmetrics._validation import check_nonnegative_float, check_tensor, result_dtype

__all__ = ["cka", "linear_cka"]

_KERNELS = ("linear", "rbf")
# Minimum rows: centring needs 2; the unbiased HSIC estimator divides by n(n − 3)(n − 1)(n − 2).
_MIN_ROWS_BIASED = 2
_MIN_ROWS_UNBIASED = 4


def _check_pair(
    x: object, y: object, metric: str, min_rows: int, widths: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Validate a ``(N, D1)``, ``(N, D2)`` pair (same N, both finite, at least ``min_rows`` rows).

    ``widths``: the (D1, D2) of earlier batches, which a streaming metric requires again.
    """
    x = check_tensor(x, metric, name="x", min_rows=0, features=None if widths is None else widths[0])
    y = check_tensor(y, metric, name="y", min_rows=0, features=None if widths is None else widths[1])
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{metric}: `x` and `y` must have the same number of rows (the same N samples), got {x.shape[0]} and"
            f" {y.shape[0]}"
        )
    if x.shape[0] < min_rows:
        why = " (the unbiased HSIC estimator divides by N(N − 3))" if min_rows == _MIN_ROWS_UNBIASED else ""
        raise ValueError(f"{metric}: needs at least {min_rows} rows (samples){why}, got {x.shape[0]}")
    if x.device != y.device:
        raise ValueError(f"{metric}: `x` and `y` must be on the same device, got {x.device} and {y.device}")
    return x, y


def _check_kernel(kernel: object, sigma: object, metric: str) -> float:
    if kernel not in _KERNELS:
        raise ValueError(f"{metric}: `kernel` must be 'linear' or 'rbf', got {kernel!r}")
    return check_nonnegative_float(sigma, metric, "sigma", strictly_positive=True)


def _is_constant(centred_sq_norm: Tensor | float, uncentred_sq_norm: Tensor | float, num_samples: int) -> bool:
    """Whether a centred block is only round-off of forming the mean (every row identical)."""
    ratio = 4.0 * math.sqrt(num_samples) * torch.finfo(torch.float64).eps
    return float(centred_sq_norm) <= ratio**2 * float(uncentred_sq_norm)


def _centre(x: Tensor) -> Tensor:
    """Column-centred float64 copy of ``x``; exactly 0 when ``x`` has zero variance."""
    x = x.to(torch.float64)
    centred = x - x.mean(dim=0, keepdim=True)
    if _is_constant(centred.square().sum(), x.square().sum(), x.shape[0]):
        centred.zero_()
    return centred


def _frobenius_sq_from_upper(block: Tensor) -> Tensor:
    """‖S‖²_F of a symmetric matrix of which only the upper triangle (diagonal included) is valid."""
    upper = torch.triu(block)
    return 2.0 * upper.square().sum() - torch.diagonal(block).square().sum()


def _linear_cka_from_moments(state: Tensor, num_features_x: int) -> Tensor:
    r"""Linear CKA from the packed centred moments of ``concat([x, y], dim=1)`` (see ``reprmetrics._linalg``).

    The joint scatter's blocks are X̃ᵀX̃, X̃ᵀỸ and ỸᵀỸ (upper triangle valid); CKA is
    ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F), and 0 when x or y has zero variance.
    """
    n, mean, scatter = centred_moments(state)
    dx = num_features_x
    sxx, syy, sxy = scatter[:dx, :dx], scatter[dx:, dx:], scatter[:dx, dx:]
    for block, block_mean in ((sxx, mean[:dx]), (syy, mean[dx:])):
        centred_sq = torch.diagonal(block).sum()
        if _is_constant(centred_sq, centred_sq + n * block_mean.square().sum(), n):
            return torch.zeros((), dtype=scatter.dtype, device=scatter.device)
    denominator = (_frobenius_sq_from_upper(sxx) * _frobenius_sq_from_upper(syy)).sqrt()
    return sxy.square().sum() / denominator


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear centred kernel alignment (Kornblith et al., ICML 2019), feature form.

    .. math::
        \operatorname{CKA}(X, Y) =
        \frac{\lVert \tilde X^\top \tilde Y \rVert_F^2}
             {\lVert \tilde X^\top \tilde X \rVert_F \, \lVert \tilde Y^\top \tilde Y \rVert_F}

    with :math:`\tilde X, \tilde Y` the column-centred matrices (rows are the same N samples seen by
    two representations). Equals :func:`cka` with the linear kernel and the biased HSIC. In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either input, not to general
    invertible linear maps. Computed in float64 after subtracting the column means, so a large common
    offset does not cost accuracy. Zero-variance input (all rows identical) gives 0 (see the module
    docstring).

    Args:
        x: ``(N, D1)`` tensor, N ≥ 2.
        y: ``(N, D2)`` tensor; D2 may differ from D1.

    Returns:
        A scalar tensor in the inputs' floating dtype (at least float32).

    Example:
        >>> import torch
        >>> from reprmetrics.functional import linear_cka
        >>> x = torch.randn(500, 32, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
        >>> round(linear_cka(x, 3.0 * x @ q + 7.0).item(), 6)   # rotation, scaling, offset
        1.0
        >>> linear_cka(x, torch.ones(500, 8)).item()   # constant representation
        0.0
    """
    x, y = _check_pair(x, y, "linear_cka", _MIN_ROWS_BIASED)
    with no_autocast(x.device):
        joint = torch.cat([x.to(torch.float64), y.to(torch.float64)], dim=1)
        value = _linear_cka_from_moments(centred_moments_of(joint), x.shape[1])
    return value.to(torch.promote_types(result_dtype(x), result_dtype(y)))


def _squared_distances(centred: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances of centred rows, ≥ 0, with an exact zero diagonal."""
    sq_norms = centred.square().sum(dim=1)
    dist = centred @ centred.T  # in place from here: one N×N matrix
    dist.mul_(-2.0).add_(sq_norms[:, None]).add_(sq_norms[None, :])
    dist.clamp_(min=0).fill_diagonal_(0)
    return dist


def _median_all_entries(values: Tensor) -> Tensor:
    """Median of every entry, averaging the two middle ones for an even count (numpy's convention)."""
    flat = values.reshape(-1)
    m = flat.numel()
    upper = torch.kthvalue(flat, m // 2 + 1).values
    if m % 2:
        return upper
    return 0.5 * (torch.kthvalue(flat, m // 2).values + upper)


def _gram(centred: Tensor, kernel: str, sigma: float, metric: str) -> Tensor:
    """N×N kernel matrix of centred float64 features."""
    if kernel == "linear":
        return centred @ centred.T
    dist = _squared_distances(centred)
    if not bool(dist.any()):  # every row identical: a constant kernel, whose centred form is exactly 0
        return dist
    median = _median_all_entries(dist)
    if float(median) == 0.0:
        raise ValueError(
            f"{metric}: the RBF bandwidth is 0: at least half of the N² squared pairwise distances are 0 (many"
            " duplicate rows), so the median heuristic fails; remove duplicates or use kernel='linear'"
        )
    return dist.div_(-2.0 * sigma**2 * median).exp_()


def _double_centre_(gram: Tensor) -> Tensor:
    """H K H in place (H = I − 11ᵀ/N): the centred kernel of the biased HSIC."""
    row_means = gram.mean(dim=1)
    gram.sub_(row_means[:, None]).sub_(row_means[None, :]).add_(row_means.mean())
    return gram


def _u_centre_(gram: Tensor) -> Tensor:
    r"""U-centred kernel in place (Székely & Rizzo 2014): ⟨Ũ(K), Ũ(L)⟩ / (N(N − 3)) is Song et al.'s unbiased HSIC.

    Off the diagonal, :math:`\tilde K_{ij} = K_{ij} - \frac{r_i + r_j}{N-2} + \frac{\sum r}{(N-1)(N-2)}`
    with :math:`r` the row sums of K with its diagonal zeroed; the diagonal is 0.
    """
    n = gram.shape[0]
    gram.fill_diagonal_(0)
    row_sums = gram.sum(dim=1)
    shift = row_sums / (n - 2) - row_sums.sum() / (2 * (n - 1) * (n - 2))
    gram.sub_(shift[:, None]).sub_(shift[None, :]).fill_diagonal_(0)
    return gram


def _hsic_terms(x: Tensor, y: Tensor, kernel: str, sigma: float, debiased: bool, metric: str) -> Tensor:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) in float64, all with the same normalisation.

    Biased: ⟨HKH, HLH⟩ / (N − 1)². Unbiased: Song et al.'s estimator, ⟨Ũ(K), Ũ(L)⟩ / (N(N − 3)).
    """
    n = x.shape[0]
    xc, yc = _centre(x), _centre(y)
    centre_ = _u_centre_ if debiased else _double_centre_
    scale = 1.0 / (n * (n - 3)) if debiased else 1.0 / (n - 1) ** 2
    k = centre_(_gram(xc, kernel, sigma, metric))
    del xc
    l_ = centre_(_gram(yc, kernel, sigma, metric))
    del yc
    k, l_ = k.reshape(-1), l_.reshape(-1)
    terms = torch.stack([torch.dot(k, l_), torch.dot(k, k), torch.dot(l_, l_)])  # no N×N temporaries
    return terms * scale


def _cka_from_hsic(hsic_kl: Tensor, hsic_kk: Tensor, hsic_ll: Tensor) -> Tensor:
    """HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)); 0 where a self term is 0 (zero-variance input)."""
    denominator = hsic_kk * hsic_ll
    if float(denominator) <= 0.0:
        return torch.zeros((), dtype=hsic_kl.dtype, device=hsic_kl.device)
    return hsic_kl / denominator.sqrt()


def cka(x: Tensor, y: Tensor, kernel: str = "linear", sigma: float = 1.0, debiased: bool = False) -> Tensor:
    r"""Centred kernel alignment from N×N Gram matrices (Kornblith et al. 2019; Nguyen et al. 2021).

    .. math::
        \operatorname{CKA}(K, L) = \frac{\operatorname{HSIC}(K, L)}
                                        {\sqrt{\operatorname{HSIC}(K, K)\,\operatorname{HSIC}(L, L)}}

    with :math:`K_{ij} = k(x_i, x_j)`, :math:`L_{ij} = k(y_i, y_j)` and

    - ``debiased=False``: the biased HSIC, :math:`\operatorname{tr}(KHLH)/(N-1)^2`, with
      :math:`H = I - \tfrac{1}{N}\mathbf{1}\mathbf{1}^\top` (Kornblith et al.). With the linear kernel
      this equals :func:`linear_cka`.
    - ``debiased=True``: the unbiased estimator of Song et al. (JMLR 2012), as in Nguyen et al. 2021:
      with :math:`\bar K, \bar L` the kernels with their diagonals set to 0,

      .. math::
          \operatorname{HSIC}_1(K, L) = \frac{1}{N(N-3)}\Big[\operatorname{tr}(\bar K \bar L)
          + \frac{\mathbf{1}^\top \bar K \mathbf{1}\,\mathbf{1}^\top \bar L \mathbf{1}}{(N-1)(N-2)}
          - \frac{2}{N-2}\mathbf{1}^\top \bar K \bar L \mathbf{1}\Big]

      (computed through U-centred kernels; its self terms are sums of squares, so never negative). The
      debiased CKA lies in [−1, 1] and is less inflated by N ≪ D than the biased one.

    Kernels:

    - ``"linear"``: :math:`k(a, b) = a^\top b`.
    - ``"rbf"``: :math:`k(a, b) = \exp(-\lVert a - b\rVert^2 / (2\sigma^2))` with
      :math:`\sigma^2 = \texttt{sigma}^2 \times \operatorname{median}_{i,j} \lVert x_i - x_j\rVert^2`,
      the median taken over all N² entries, diagonal (zeros) included, averaging the two middle
      entries when N² is even: the convention of Kornblith et al.'s reference code (``np.median`` of
      the full matrix). ``sigma`` is thus a fraction of the median distance, set separately for x
      and y. The default 1.0 is the reference code's default, so values compare with the published
      notebook; the paper also reports 0.2, 0.4 and 0.8, and a large ``sigma`` approaches linear CKA.

    Features are centred in float64 before any kernel (it changes neither kernel's centred Gram
    matrix, and keeps a large common offset from cancelling digits). Memory is a few N×N float64
    matrices: use :func:`linear_cka` or :class:`reprmetrics.LinearCKA` for large N.

    Degenerate input: a zero-variance representation (every row identical) gives 0 (see the module
    docstring); with ``kernel="rbf"``, a median squared distance of 0 (at least half of the N²
    entries zero, i.e. many duplicate rows) raises ``ValueError``.

    Args:
        x: ``(N, D1)`` tensor.
        y: ``(N, D2)`` tensor, the same N samples.
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth as a fraction of the median pairwise distance (> 0; ignored for linear).
        debiased: use the unbiased HSIC estimator (needs N ≥ 4; otherwise N ≥ 2).

    Returns:
        A scalar tensor in the inputs' floating dtype (at least float32).

    Example:
        >>> import torch
        >>> from reprmetrics.functional import cka, linear_cka
        >>> x = torch.randn(200, 16, dtype=torch.float64)
        >>> y = x @ torch.randn(16, 8, dtype=torch.float64) + 0.5 * torch.randn(200, 8, dtype=torch.float64)
        >>> torch.allclose(cka(x, y), linear_cka(x, y))
        True
        >>> 0.0 < cka(x, y, kernel="rbf", sigma=0.8).item() < 1.0
        True
        >>> round(cka(x, x, debiased=True).item(), 6)
        1.0
    """
    min_rows = _MIN_ROWS_UNBIASED if debiased else _MIN_ROWS_BIASED
    x, y = _check_pair(x, y, "cka", min_rows)
    sigma = _check_kernel(kernel, sigma, "cka")
    with no_autocast(x.device):
        value = _cka_from_hsic(*_hsic_terms(x, y, kernel, sigma, bool(debiased), "cka"))
    return value.to(torch.promote_types(result_dtype(x), result_dtype(y)))
