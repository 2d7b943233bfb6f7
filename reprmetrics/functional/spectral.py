r"""Spectral metrics: RankMe, α-ReQ and the spectra they are computed from.

Every function takes an ``(N, D)`` tensor of embeddings (any floating dtype, any device), computes in
float64 outside autocast, and returns a result on the input's device in ``float32`` or, for float64
input, ``float64``. The ``_..._from_moments`` pieces are shared with the streaming Metric classes,
which accumulate the same second moments batch by batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reprmetrics._linalg import (
    centred_moments,
    eigvalsh_descending,
    gram_upper,
    no_autocast,
    nonzero_eigenvalue_tolerance,
)
from reprmetrics._validation import check_nonnegative_float, check_tensor, result_dtype

__all__ = ["alpha_req", "eigenspectrum", "rankme", "singular_values"]


# ----------------------------------------------------------------------------------------------
# shared pieces (functional and Metric classes)
# ----------------------------------------------------------------------------------------------


def _smaller_gram(z: Tensor) -> Tensor:
    """ZᵀZ or ZZᵀ, whichever is smaller (same non-zero eigenvalues), upper triangle valid."""
    return gram_upper(z) if z.shape[0] >= z.shape[1] else gram_upper(z.T)


def _singular_values_from_gram(gram_matrix: Tensor, num_samples: int) -> Tensor:
    """Singular values of Z from its Gram matrix ZᵀZ or ZZᵀ (upper triangle): the top min(N, D)."""
    eigenvalues = eigvalsh_descending(gram_matrix)
    return eigenvalues[: min(num_samples, gram_matrix.shape[0])].sqrt()


def _rankme_from_singular_values(sigma: Tensor, eps: float) -> Tensor:
    total = sigma.sum()
    # All-zero embeddings: every p_k is eps, so RankMe is 1 for eps = 0 (documented, finite).
    p = sigma / total.clamp_min(torch.finfo(sigma.dtype).tiny) + eps
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _covariance_from_moments(gram_matrix: Tensor, total: Tensor, num_samples: int) -> Tensor:
    """Unbiased covariance from un-centred ZᵀZ, Σz and N (cancels ‖μ‖²/λ digits; RankMe's helpers only)."""
    mean = total / num_samples
    centred = gram_matrix - num_samples * torch.outer(mean, mean)
    return centred / (num_samples - 1)


def _covariance_spectrum_from_state(state: Tensor, input_eps: float) -> tuple[Tensor, float, int]:
    """Covariance eigenvalues (descending, ``min(N, D)``), their zero tolerance and N of a packed
    centred-moments state (see :func:`reprmetrics._linalg.centred_moments_update_`)."""
    n, mean, scatter = centred_moments(state)
    d = scatter.shape[0]
    lam = eigvalsh_descending(scatter)[: min(n, d)] / (n - 1)
    tol = nonzero_eigenvalue_tolerance(lam, n, d, input_eps, float(mean.square().mean()))
    return lam, tol, n


def _centred_covariance_spectrum(z64: Tensor, input_eps: float) -> tuple[Tensor, float]:
    """Covariance eigenvalues and zero tolerance of float64 ``(N, D)`` data, centred directly."""
    n, d = z64.shape
    mean = z64.mean(dim=0, keepdim=True)
    lam = eigvalsh_descending(_smaller_gram(z64 - mean))[: min(n, d)] / (n - 1)
    return lam, nonzero_eigenvalue_tolerance(lam, n, d, input_eps, float(mean.square().mean()))


def _power_law_fit(
    eigenvalues: Tensor, fit_range: tuple[int, int], tolerance: float, metric: str = "alpha_req"
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    r"""Weighted (1/k) least-squares fit log λ_k ≈ slope·log k + intercept over fit_range.

    Returns ``(slope, intercept, r2, first, last)`` with ``last`` clipped to the non-zero eigenvalues.
    ``r2`` is the coefficient of determination of the fit in log-log space with the same 1/k weights,
    :math:`R^2 = 1 - \sum_k w_k (y_k - \hat y_k)^2 / \sum_k w_k (y_k - \bar y_w)^2` (1 for an exact power
    law; the weighted fit maximises it).
    """
    first, last = fit_range
    num_nonzero = int((eigenvalues > tolerance).sum())
    last = min(last, num_nonzero)
    if last - first + 1 < 3:
        raise ValueError(
            f"{metric}: the fit range {fit_range} keeps {max(last - first + 1, 0)} non-zero eigenvalue(s)"
            f" (the covariance has {num_nonzero} non-zero eigenvalues); at least 3 are needed. Use more"
            " samples, wider embeddings or a lower fit_range."
        )
    k = torch.arange(first, last + 1, dtype=eigenvalues.dtype, device=eigenvalues.device)
    log_k = k.log()
    log_lam = eigenvalues[first - 1 : last].log()
    w = 1.0 / k
    x_mean = (w * log_k).sum() / w.sum()
    y_mean = (w * log_lam).sum() / w.sum()
    slope = (w * (log_k - x_mean) * (log_lam - y_mean)).sum() / (w * (log_k - x_mean).square()).sum()
    intercept = y_mean - slope * x_mean
    residual = (w * (log_lam - (slope * log_k + intercept)).square()).sum()
    spread = (w * (log_lam - y_mean).square()).sum()
    # A perfectly flat spectrum (every λ equal) is fitted exactly: R² = 1 rather than 0/0.
    r2 = torch.where(spread > 0, 1 - residual / spread.clamp_min(torch.finfo(spread.dtype).tiny), torch.ones_like(spread))
    return slope, intercept, r2, first, last


def _alpha_req_from_eigenvalues(
    eigenvalues: Tensor, fit_range: tuple[int, int], tolerance: float, metric: str = "alpha_req"
) -> Tensor:
    """α = −slope of the weighted log-log fit (see :func:`_power_law_fit`)."""
    slope, _, _, _, _ = _power_law_fit(eigenvalues, fit_range, tolerance, metric)
    return -slope


def _check_fit_range(fit_range: tuple[int, int], metric: str) -> tuple[int, int]:
    ok = (
        isinstance(fit_range, (tuple, list))
        and len(fit_range) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in fit_range)
    )
    if not ok or fit_range[0] < 1 or fit_range[1] < fit_range[0] + 2:
        raise ValueError(
            f"{metric}: `fit_range` must be two 1-indexed ranks (first, last) with last >= first + 2, got {fit_range!r}"
        )
    return int(fit_range[0]), int(fit_range[1])


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def singular_values(embeddings: Tensor) -> Tensor:
    r"""Singular values of the un-centred ``(N, D)`` embedding matrix, descending (``min(N, D)`` of them).

    Computed from the eigenvalues of the smaller Gram matrix (ZᵀZ or ZZᵀ) in float64, so values below
    about 1e-8·σ₁ are at round-off level (they contribute nothing measurable to RankMe).
    """
    z = check_tensor(embeddings, "singular_values", min_rows=1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        g = _smaller_gram(z64)
        sigma = _singular_values_from_gram(g, z.shape[0])
    return sigma.to(result_dtype(z))


def eigenspectrum(embeddings: Tensor, center: bool = True) -> Tensor:
    r"""Eigenvalues of the covariance of the embeddings, descending, ``min(N, D)`` of them.

    ``center=True`` gives the eigenvalues of the unbiased covariance :math:`\frac{1}{N-1} Z_c^\top Z_c`
    (what α-ReQ fits); ``center=False`` gives those of :math:`\frac{1}{N} Z^\top Z`.
    """
    name = "eigenspectrum"
    z = check_tensor(embeddings, name, min_rows=2 if center else 1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        if center:
            z64 = z64 - z64.mean(dim=0, keepdim=True)
        g = _smaller_gram(z64)
        lam = eigvalsh_descending(g)[: min(z.shape)] / (z.shape[0] - 1 if center else z.shape[0])
    return lam.to(result_dtype(z))


def rankme(embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    r"""RankMe, the smooth effective rank of the embeddings (Garrido et al., ICML 2023).

    .. math::
        p_k = \frac{\sigma_k}{\sum_i \sigma_i} + \varepsilon, \qquad
        \operatorname{RankMe}(Z) = \exp\Big(-\sum_{k=1}^{\min(N,D)} p_k \log p_k\Big)

    where :math:`\sigma_k` are the singular values of the **un-centred** ``(N, D)`` matrix ``Z``.
    ``eps=0`` gives the effective rank of Roy & Vetterli (2007). Ranges over ``[1, min(N, D)]``
    (up to the ``eps`` terms); higher is better. All-zero embeddings give ``exp(min(N,D)·(−ε log ε))``,
    exactly 1 for ``eps=0``.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 1.
        eps: the constant added to each normalised singular value (the paper's 1e-7).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import rankme
        >>> z = torch.randn(1000, 4) @ torch.randn(4, 32)   # rank 4
        >>> 1.0 < rankme(z).item() <= 4.0
        True
    """
    eps = check_nonnegative_float(eps, "rankme", "eps")
    z = check_tensor(embeddings, "rankme", min_rows=1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        g = _smaller_gram(z64)
        value = _rankme_from_singular_values(_singular_values_from_gram(g, z.shape[0]), eps)
    return value.to(result_dtype(z))


def alpha_req(embeddings: Tensor, fit_range: tuple[int, int] = (11, 100)) -> Tensor:
    r"""α-ReQ, the decay rate of the covariance eigenspectrum (Agrawal et al., NeurIPS 2022).

    With :math:`\lambda_1 \ge \lambda_2 \ge \dots` the eigenvalues of the covariance of the centred
    embeddings, α is :math:`b_0` of the weighted least-squares fit

    .. math::
        \log \lambda_k \approx -b_0 \log k + b_1, \qquad k \in [k_{lo}, k_{hi}],\ \text{weights } 1/k.

    ``fit_range`` is 1-indexed and inclusive; its upper end is clipped to the number of non-zero
    eigenvalues: those above the noise that rounding the embeddings to their dtype creates (float32
    input of rank r is full-rank noise beyond r) and above float64 round-off; see
    ``reprmetrics._linalg.nonzero_eigenvalue_tolerance``. Fewer than 3 ranks left
    raise ``ValueError``. The paper finds the best downstream accuracy around α ≈ 1: much smaller means
    a flat, noisy spectrum; much larger means few dominant directions (towards collapse).

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 2.
        fit_range: ranks ``(first, last)`` of the fit.

    Returns:
        A scalar tensor, α.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import alpha_req
        >>> k = torch.arange(1, 129, dtype=torch.float64)
        >>> z = torch.randn(4000, 128, dtype=torch.float64) * k.pow(-0.5)   # λ_k ∝ k^-1
        >>> round(alpha_req(z).item(), 1)
        1.0
    """
    name = "alpha_req"
    fit_range = _check_fit_range(fit_range, name)
    z = check_tensor(embeddings, name, min_rows=2)
    with no_autocast(z.device):
        lam, tol = _centred_covariance_spectrum(z.to(torch.float64), torch.finfo(z.dtype).eps)
        value = _alpha_req_from_eigenvalues(lam, fit_range, tol, name)
    return value.to(result_dtype(z))
