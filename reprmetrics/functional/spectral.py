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
    centred_moments_of,
    eigvalsh_descending,
    gram_upper,
    gram_zero_tolerance,
    l2_normalize_rows,
    no_autocast,
    nonzero_eigenvalue_tolerance,
    symmetric_from_upper,
)
from reprmetrics._validation import check_nonnegative_float, check_tensor, result_dtype

__all__ = [
    "alpha_req",
    "alpha_req_fit",
    "coding_rate",
    "eigenspectrum",
    "nesum",
    "rankme",
    "rankme_diagnostics",
    "singular_values",
]


# ----------------------------------------------------------------------------------------------
# shared pieces (functional and Metric classes)
# ----------------------------------------------------------------------------------------------


def _smaller_gram(z: Tensor) -> Tensor:
    """ZᵀZ or ZZᵀ, whichever is smaller (same non-zero eigenvalues), upper triangle valid."""
    return gram_upper(z) if z.shape[0] >= z.shape[1] else gram_upper(z.T)


def _singular_values_from_gram(
    gram_matrix: Tensor, num_samples: int, num_features: int, accumulate_eps: float = torch.finfo(torch.float64).eps
) -> Tensor:
    """Singular values of Z from its Gram matrix ZᵀZ or ZZᵀ (upper triangle): the top min(N, D).

    Eigenvalues at the Gram's own round-off level (:func:`reprmetrics._linalg.gram_zero_tolerance`)
    are exact zeros: otherwise a zero singular value would come out as about √ε₆₄·σ₁ ≈ 1e-8·σ₁.
    """
    eigenvalues = eigvalsh_descending(gram_matrix)[: min(num_samples, num_features)]
    tol = gram_zero_tolerance(float(eigenvalues.sum()), num_samples, num_features, accumulate_eps)
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()


def _spectrum_diagnostics(sigma: Tensor) -> dict[str, float | int]:
    """Top singular value, condition number over the non-zero singular values, and how many there are.

    ``condition_number`` is σ₁ / (smallest non-zero σ): finite even for rank-deficient input, where
    the zero singular values (see :func:`_singular_values_from_gram`) are counted out of it and show
    in ``numerical_rank`` instead; 1 for all-zero embeddings.
    """
    nonzero = sigma[sigma > 0]
    top = float(sigma[0]) if sigma.numel() else 0.0
    condition = top / float(nonzero[-1]) if nonzero.numel() else 1.0
    return {"top_singular_value": top, "condition_number": condition, "numerical_rank": int(nonzero.numel())}


def effective_rank(values: Tensor, eps: float) -> Tensor:
    """exp(entropy) of p = values / Σ values + eps: the smooth effective rank of RankMe (of singular
    values) and LiDAR (of eigenvalues). All-zero values give p_k = eps: exp(−K·eps·log eps) ≈ 1,
    exactly 1 for eps = 0 (documented, finite)."""
    p = values / values.sum().clamp_min(torch.finfo(values.dtype).tiny) + eps
    return torch.exp(-torch.special.xlogy(p, p).sum())


_rankme_from_singular_values = effective_rank


def _covariance_from_moments(gram_matrix: Tensor, total: Tensor, num_samples: int) -> Tensor:
    """Unbiased covariance from un-centred ZᵀZ, Σz and N (cancels ‖μ‖²/λ digits; RankMe's helpers only)."""
    mean = total / num_samples
    centred = gram_matrix - num_samples * torch.outer(mean, mean)
    return centred / (num_samples - 1)


def _covariance_spectrum_from_state(state: Tensor, input_eps: float) -> tuple[Tensor, float, int]:
    """Covariance eigenvalues (descending, ``min(N, D)``), their zero tolerance and N of a packed
    centred-moments state (see :func:`reprmetrics._linalg.centred_moments_update_`)."""
    n, mean, scatter = centred_moments(state)
    lam, tol = _covariance_spectrum_from_parts(n, mean, eigvalsh_descending(scatter), input_eps)
    return lam, tol, n


def _covariance_spectrum_from_parts(
    n: int, mean: Tensor, scatter_eigenvalues: Tensor, input_eps: float
) -> tuple[Tensor, float]:
    """Covariance eigenvalues (scatter's / (N − 1), the top ``min(N, D)``) and their zero tolerance."""
    d = scatter_eigenvalues.shape[0]
    lam = scatter_eigenvalues[: min(n, d)] / (n - 1)
    return lam, nonzero_eigenvalue_tolerance(lam, n, d, input_eps, float(mean.square().mean()))


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
    r2 = torch.where(
        spread > 0, 1 - residual / spread.clamp_min(torch.finfo(spread.dtype).tiny), torch.ones_like(spread)
    )
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

    Computed from the eigenvalues of the smaller Gram matrix (ZᵀZ or ZZᵀ) in float64. Eigenvalues at
    the Gram's round-off level, :math:`(\sqrt N + \sqrt D)\,\varepsilon_{64} \operatorname{tr}(Z^\top Z)`
    (see :func:`reprmetrics._linalg.gram_zero_tolerance`), are returned as exact zeros: singular values
    below about :math:`\sqrt{(\sqrt N + \sqrt D)\,\varepsilon_{64}}\,\lVert Z\rVert_F` are not resolved.
    """
    z = check_tensor(embeddings, "singular_values", min_rows=1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        g = _smaller_gram(z64)
        sigma = _singular_values_from_gram(g, *z.shape)
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

    The singular values are the square roots of the float64 Gram matrix's eigenvalues; those at the
    Gram's own round-off level are exact zeros (see :func:`singular_values`), so exactly rank-r input
    (r = 1..16, D up to 4,096) gives RankMe within 1e-9 of an SVD for ``eps=0`` and within 1e-6 with
    the paper's eps. :func:`rankme_diagnostics` adds σ₁ and the condition number from the same spectrum.

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
        value = _rankme_from_singular_values(_singular_values_from_gram(g, *z.shape), eps)
    return value.to(result_dtype(z))


def rankme_diagnostics(embeddings: Tensor, eps: float = 1e-7) -> dict[str, float | int]:
    r"""RankMe with the spectrum diagnostics stable-pretraining's verbose mode reports, from one Gram.

    Returns ``{"rankme", "top_singular_value", "condition_number", "numerical_rank"}``: σ₁ of the
    un-centred embeddings, σ₁ divided by the smallest *non-zero* singular value (finite for
    rank-deficient input; the zeros are counted in ``numerical_rank``, the number of singular values
    above the Gram's round-off level), as Python numbers. No extra cost over :func:`rankme`.

    Example:
        >>> import torch
        >>> from reprmetrics.functional.spectral import rankme_diagnostics
        >>> z = torch.randn(1000, 4, dtype=torch.float64) @ torch.randn(4, 32, dtype=torch.float64)
        >>> rankme_diagnostics(z)["numerical_rank"]
        4
    """
    eps = check_nonnegative_float(eps, "rankme_diagnostics", "eps")
    z = check_tensor(embeddings, "rankme_diagnostics", min_rows=1)
    with no_autocast(z.device):
        sigma = _singular_values_from_gram(_smaller_gram(z.to(torch.float64)), *z.shape)
        out: dict[str, float | int] = {"rankme": float(_rankme_from_singular_values(sigma, eps))}
    out.update(_spectrum_diagnostics(sigma))
    return out


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


def alpha_req_fit(embeddings: Tensor, fit_range: tuple[int, int] = (11, 100)) -> dict[str, Tensor | float | int]:
    r"""α-ReQ with its fit: ``{"eigenvalues", "alpha", "intercept", "r2", "first", "last"}``.

    The same keys as :meth:`reprmetrics.AlphaReQ.spectrum_fit`. ``r2`` is the 1/k-weighted R² of the
    log-log fit over ranks ``first..last``: near 1 when the spectrum is a power law there (α then
    describes it), much lower when α is a poor summary (reptrix reports the same diagnostic).

    Example:
        >>> import torch
        >>> from reprmetrics.functional.spectral import alpha_req_fit
        >>> k = torch.arange(1, 129, dtype=torch.float64)
        >>> fit = alpha_req_fit(torch.randn(4000, 128, dtype=torch.float64) * k.pow(-0.5))
        >>> round(fit["alpha"], 1), fit["r2"] > 0.9
        (1.0, True)
    """
    name = "alpha_req_fit"
    fit_range = _check_fit_range(fit_range, name)
    z = check_tensor(embeddings, name, min_rows=2)
    with no_autocast(z.device):
        lam, tol = _centred_covariance_spectrum(z.to(torch.float64), torch.finfo(z.dtype).eps)
        slope, intercept, r2, first, last = _power_law_fit(lam, fit_range, tol, name)
    return {
        "eigenvalues": lam.to(result_dtype(z)),
        "alpha": float(-slope),
        "intercept": float(intercept),
        "r2": float(r2),
        "first": first,
        "last": last,
    }


# ----------------------------------------------------------------------------------------------
# NESum and coding rate
# ----------------------------------------------------------------------------------------------


def _nesum_from_state(state: Tensor, input_eps: float) -> Tensor:
    """NESum from packed centred moments; ``input_eps``: machine epsilon of the embeddings' dtype."""
    n, mean, scatter = centred_moments(state)
    return _nesum_from_parts(n, mean, scatter, eigvalsh_descending(scatter), input_eps)


def _nesum_from_parts(n: int, mean: Tensor, scatter: Tensor, scatter_eigenvalues: Tensor, input_eps: float) -> Tensor:
    """NESum from the centred moments and the scatter's eigenvalues (descending).

    Σλ_k is the trace (exact, no eigensolver error). A covariance whose largest eigenvalue is at or
    below the zero tolerance of :func:`reprmetrics._linalg.nonzero_eigenvalue_tolerance` (identical
    embeddings, or a spread no larger than the rounding of the input to its dtype) gives 0: the
    ratio would otherwise read rounding noise as an isotropic spread.
    """
    d = scatter.shape[0]
    lam = scatter_eigenvalues / (n - 1)
    trace = scatter.diagonal().sum() / (n - 1)
    tol = nonzero_eigenvalue_tolerance(lam, n, d, input_eps, float(mean.square().mean()))
    if float(lam[0]) <= tol:
        return torch.zeros((), dtype=trace.dtype, device=trace.device)  # no direction at all
    return trace / lam[0]


def nesum(embeddings: Tensor) -> Tensor:
    r"""NESum, the normalised eigenvalue sum of the covariance (He & Ozay, 2022, "Exploring the gap
    between collapsed and whitened features in self-supervised learning", ICML 2022).

    .. math::
        \operatorname{NESum}(Z) = \sum_{k=1}^{D} \frac{\lambda_k}{\lambda_1}
        = \frac{\operatorname{tr} \Sigma}{\lambda_1}

    over the eigenvalues :math:`\lambda_1 \ge \lambda_2 \ge \dots` of the covariance Σ of the
    **centred** embeddings (its normalisation cancels). In ``[1, D]``: 1 when the embeddings vary
    along one direction only, D for an isotropic covariance; higher is healthier. (A sample
    covariance overstates λ₁: for N(0, I) data NESum is about D / (1 + √(D/N))².) The trace is taken
    from the diagonal, λ₁ from the symmetric eigensolver, both in float64 from moments accumulated
    about a shift inside the cloud (a large common offset cancels nothing). Identical embeddings, or
    a spread no larger than the rounding of the input to its dtype (see
    :func:`reprmetrics._linalg.nonzero_eigenvalue_tolerance`), give 0: no direction at all.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 2.

    Returns:
        A scalar tensor in ``{0} ∪ [1, D]``.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import nesum
        >>> round(nesum(torch.randn(1000, 1) * torch.ones(1, 16)).item(), 6)   # one direction
        1.0
        >>> 14 < nesum(torch.randn(20000, 16)).item() <= 16                     # isotropic: about D
        True
    """
    name = "nesum"
    z = check_tensor(embeddings, name, min_rows=2)
    with no_autocast(z.device):
        value = _nesum_from_state(centred_moments_of(z.to(torch.float64)), torch.finfo(z.dtype).eps)
    return value.to(result_dtype(z))


def _check_coding_rate_eps(eps: float, metric: str) -> float:
    value = check_nonnegative_float(eps, metric, "eps", strictly_positive=True)
    if value == float("inf"):
        raise ValueError(f"{metric}: `eps` must be a finite number > 0, got {eps!r}")
    return value


def _coding_rate_from_gram(gram_upper_triangle: Tensor, num_samples: int, num_features: int, eps: float) -> Tensor:
    r"""½ log det(I + D/(N ε²) G) for the Gram matrix G (upper triangle valid) of the rows.

    G may be ZᵀZ (D×D) or ZZᵀ (N×N): det(I_D + c ZᵀZ) = det(I_N + c ZZᵀ). The matrix is symmetric
    positive definite with eigenvalues ≥ 1, so its Cholesky factor exists and log det = 2 Σ log Lᵢᵢ is
    accurate; if the factorisation still fails (non-finite entries), the eigenvalues are used.
    """
    scale = num_features / (num_samples * eps**2)
    m = symmetric_from_upper(gram_upper_triangle) * scale
    m.diagonal().add_(1.0)
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return factor.diagonal().log().sum()
    return 0.5 * torch.log1p(scale * eigvalsh_descending(gram_upper_triangle)).sum()


def coding_rate(embeddings: Tensor, eps: float = 0.5, normalize: bool = True) -> Tensor:
    r"""Coding rate of the embeddings (Yu, Chan, You, Song & Ma, NeurIPS 2020, MCR²).

    .. math::
        R(Z; \varepsilon) = \frac12 \log\det\Big(I_D + \frac{D}{N \varepsilon^2} Z^\top Z\Big)

    the number of nats needed to code the N rows of Z up to distortion ε², with Z the ``(N, D)``
    embeddings, their rows L2-normalised first when ``normalize=True`` (the default, as in MCR², whose
    features live on the unit sphere; zero rows stay zero). Z is **not** centred. Computed in float64
    from the smaller Gram matrix (ZᵀZ or ZZᵀ; same determinant) by a Cholesky factorisation. Grows
    with the rank and spread of the embeddings: 0 for all-zero embeddings, about ½ log(1 + D/ε²) for
    embeddings that all point one way, and up to about (D/2)·log(1 + 1/ε²) for unit rows spread
    isotropically; higher is better.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 1.
        eps: ε > 0, the allowed distortion (MCR²'s default 0.5).
        normalize: L2-normalise the rows first.

    Returns:
        A scalar tensor ≥ 0 (nats).

    Example:
        >>> import math, torch
        >>> from reprmetrics.functional import coding_rate
        >>> z = torch.ones(100, 8)                      # one direction: ½ log(1 + D/ε²)
        >>> round(coding_rate(z).item(), 5) == round(0.5 * math.log(1 + 8 / 0.25), 5)
        True
    """
    name = "coding_rate"
    eps = _check_coding_rate_eps(eps, name)
    if not isinstance(normalize, bool):
        raise ValueError(f"{name}: `normalize` must be True or False, got {normalize!r}")
    z = check_tensor(embeddings, name, min_rows=1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        if normalize:
            z64 = l2_normalize_rows(z64)
        n, d = z.shape
        value = _coding_rate_from_gram(_smaller_gram(z64), n, d, eps)
    return value.to(result_dtype(z))
