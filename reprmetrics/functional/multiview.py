r"""Multi-view metrics: LiDAR, alignment and uniformity.

They read how a self-supervised model treats several augmented views of the same sample: LiDAR
measures the effective rank of the linear-discriminant matrix of the surrogate task "which sample did
this view come from", alignment how close positive pairs land, uniformity how evenly the embeddings
spread over the hypersphere.

Every function computes at full precision outside autocast on the input's device and returns a
scalar in ``float32`` or, for float64 input, ``float64``. The ``_..._from_...`` pieces are shared with
the Metric classes in :mod:`reprmetrics.multiview`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import (
    add_gram_,
    centred_moments,
    centred_moments_update_,
    l2_normalize_rows,
    no_autocast,
    symmetric_from_upper,
)
from reprmetrics._validation import check_nonnegative_float, check_tensor, result_dtype
from reprmetrics.functional.spectral import effective_rank

__all__ = ["alignment", "lidar", "uniformity"]


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Run float32 matrix products in full IEEE precision, even where TF32/bf16 is switched on.

    ``torch.set_float32_matmul_precision("high")`` (common in Lightning scripts) rounds GEMM inputs to
    10 mantissa bits, which would cost uniformity about 1e-3 of relative accuracy.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# ----------------------------------------------------------------------------------------------
# LiDAR pieces
# ----------------------------------------------------------------------------------------------


def _check_views(
    views: object, metric: str, min_groups: int, features: int | None = None, num_views: int | None = None
) -> Tensor:
    """A finite ``(n, q, d)`` tensor with q ≥ 2 (and q, d equal to earlier batches' when given)."""
    v = check_tensor(views, metric, name="views", ndim=3, min_rows=min_groups, features=features)
    q = v.shape[1]
    if q < 2:
        raise ValueError(
            f"{metric}: `views` must hold at least 2 augmented views per sample (shape (n, q, d) with q >= 2),"
            f" got q={q}"
        )
    if num_views is not None and q != num_views:
        raise ValueError(
            f"{metric}: `views` has q={q} views per sample but earlier batches had q={num_views};"
            " every sample must have the same number of views (call reset() to change it)"
        )
    return v


def _group_moments(views: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group means (n, d) and the views centred on them, flattened to (n·q, d); same dtype.

    Centring each group on its own mean before forming the within-group scatter avoids the
    cancellation of Σzzᵀ − qΣμμᵀ: groups are never split across batches, so this is still a sum.
    """
    means = views.mean(dim=1)
    centred = (views - means.unsqueeze(1)).flatten(0, 1)
    return means, centred


def _add_lidar_moments_(within: Tensor, means_moments: Tensor, views: Tensor) -> Tensor:
    """Add one batch of whole groups: the within-group scatter into ``within`` (upper triangle, in
    place) and the group means into the packed centred moments ``means_moments`` (returned; see
    :func:`reprmetrics._linalg.centred_moments_update_`)."""
    means, centred = _group_moments(views)
    add_gram_(within, centred)
    return centred_moments_update_(means_moments, means)


def _lidar_zero_tolerance(between_trace: float, within_trace: float, mean: Tensor, input_eps: float) -> float:
    """tr Σ_b at or below this is rounding noise: every sample has the same mean view.

    The views were rounded to their dtype before we saw them, each entry by at most ``input_eps`` ×
    its magnitude (float32 rounds the *un-centred* value, so the offset counts). Noise alone would
    give the group means a covariance of trace at most about ε²·E‖z‖² = ε²(‖μ‖² + tr Σ_w + tr Σ_b);
    four times that is the tolerance. Σ_b is formed from centred values (shifted sums), so float64
    round-off adds only about ε₆₄² ‖μ‖² on top, which the rule covers. Below it, the normalised
    spectrum of noise would be reported as a rank, so all λ are 0 instead.
    """
    magnitude = float(mean.square().sum()) + within_trace + between_trace
    return 4.0 * input_eps**2 * magnitude


def _lidar_scatter_from_moments(
    within: Tensor, means_moments: Tensor, num_views: int, input_eps: float
) -> tuple[Tensor, Tensor, float, int]:
    """Full symmetric Σ_b and Σ_w (without δ) from the streamed state, the zero tolerance of tr Σ_b, and n."""
    n, mean, scatter = centred_moments(means_moments)
    between = symmetric_from_upper(scatter) / (n - 1)
    within_cov = symmetric_from_upper(within) / (n * (num_views - 1))
    tol = _lidar_zero_tolerance(float(between.diagonal().sum()), float(within_cov.diagonal().sum()), mean, input_eps)
    return between, within_cov, tol, n


def _lidar_eigenvalues(
    between: Tensor, within: Tensor, delta: float, zero_tolerance: float, metric: str = "lidar"
) -> Tensor:
    r"""Eigenvalues of Σ_w^{-1/2} Σ_b Σ_w^{-1/2}, with Σ_w ← Σ_w + δI, clamped at 0.

    Solved as the generalised symmetric problem Σ_b v = λ Σ_w v through the Cholesky factor
    Σ_w = L Lᵀ: L⁻¹ Σ_b L⁻ᵀ is similar to Σ_w^{-1/2} Σ_b Σ_w^{-1/2}, so it has the same eigenvalues. A
    Cholesky factor and two triangular solves cost less than an eigendecomposition of Σ_w, and are
    stable because δ > 0 keeps Σ_w positive definite.

    If tr Σ_b is at or below ``zero_tolerance`` (see :func:`_lidar_zero_tolerance`: the input's
    rounding noise, not the offset's float64 round-off, since Σ_b is formed centred), every sample has
    the same mean view and all λ are 0. Otherwise the normalised spectrum of noise would be reported
    as a rank.
    """
    d = within.shape[0]
    if float(between.diagonal().sum()) <= zero_tolerance:
        return torch.zeros(d, dtype=between.dtype, device=between.device)
    regularised = within + delta * torch.eye(d, dtype=within.dtype, device=within.device)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) != 0:
        raise ValueError(f"{metric}: the within-sample covariance Σ_w + δI is singular (δ={delta}); use delta > 0")
    half = torch.linalg.solve_triangular(factor, between, upper=False)  # L⁻¹ Σ_b
    whitened = torch.linalg.solve_triangular(factor, half.mT, upper=False)  # L⁻¹ Σ_b L⁻ᵀ
    whitened = 0.5 * (whitened + whitened.mT)  # symmetric up to round-off; make it exactly so
    return torch.linalg.eigvalsh(whitened).clamp_min(0)


_smooth_effective_rank = effective_rank  # the same definition as RankMe's, on LDA eigenvalues


# ----------------------------------------------------------------------------------------------
# alignment pieces
# ----------------------------------------------------------------------------------------------


def _check_pair(
    x: object, y: object, metric: str, features: int | None = None, min_rows: int = 1
) -> tuple[Tensor, Tensor]:
    x = check_tensor(x, metric, name="x", min_rows=min_rows, features=features)
    y = check_tensor(y, metric, name="y", min_rows=min_rows, features=features)
    if x.shape != y.shape:
        raise ValueError(
            f"{metric}: `x` and `y` must have the same shape (row i of each is a positive pair),"
            f" got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x, y


def _alignment_distances(x: Tensor, y: Tensor, alpha: float, normalize: bool, metric: str) -> Tensor:
    """‖x̂_i − ŷ_i‖^α per row, in float64 (a zero row stays zero when normalising)."""
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    if normalize:
        x64, y64 = l2_normalize_rows(x64), l2_normalize_rows(y64)
    # The difference itself, not 2 − 2cos: near-identical pairs keep full relative precision.
    diff = x64 - y64
    if alpha == 2.0:  # the paper's default: a sum of squares, smooth everywhere (also at x = y)
        return diff.square().sum(dim=1)
    # ‖d‖^α = (‖d‖²)^(α/2); at d = 0 the norm's gradient is taken as 0 (a subgradient), never NaN.
    return torch.linalg.vector_norm(diff, dim=1).pow(alpha)


# ----------------------------------------------------------------------------------------------
# uniformity pieces
# ----------------------------------------------------------------------------------------------

# Square tiles of the pair matrix, one reused buffer. On CPU, 512² and 1024² tiles measured equally
# fast (256² slower, 2048² 20 % slower); 1024² (4 MiB in float32) has 4× fewer tiles, hence fewer
# thread synchronisations, which measured far more robust on a CPU shared with other processes. On a
# GPU a 4096² tile (64 MiB in float32) is large enough to keep it busy.
_CPU_TILE = 1024
_CUDA_TILE = 4096


def _uniformity_tile(device: torch.device) -> int:
    return _CPU_TILE if device.type == "cpu" else _CUDA_TILE


def _uniformity_tiles(num_points: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(row start, row stop, column start, column stop) of the tiles on or above the diagonal.

    Only these hold pairs i < j; tiles fully below the diagonal are never formed.
    """
    starts = range(0, num_points, tile)
    return [(i, min(i + tile, num_points), j, min(j + tile, num_points)) for i in starts for j in starts if j >= i]


# Above this temperature float32 tiles could lose more than ~1e-5 of relative accuracy.
_FLOAT32_MAX_T = 100.0


def _uniformity_compute_dtype(points: Tensor, t: float, normalize: bool) -> torch.dtype:
    """float32 tiles for normalised float32 (or half) input and t ≤ 100, float64 otherwise.

    A float32 tile computes each squared distance to about 1e-7·(‖a‖² + ‖b‖²) (a and b measured from
    the anchor point), so t·d² to about t·1e-7·(‖a‖² + ‖b‖²). On the unit sphere those norms are at most
    4: measured worst case over clustered, low-rank and isotropic data, 9e-6 relative at t = 100 and
    1e-7 at t = 2, at half the cost of float64 on CPU. Without normalisation the norms, and so the
    error, are unbounded: float64 there.
    """
    if normalize and t <= _FLOAT32_MAX_T and points.dtype != torch.float64:
        return torch.float32
    return torch.float64


def _pair_tiles_sum(left: Tensor, right: Tensor, tile: int, near_zero: bool) -> tuple[Tensor, Tensor]:
    """Sum over pairs i < j of a function of s_ij = left_i · right_j = −t‖x_i − x_j‖² ≤ 0, tile by tile.

    ``near_zero=False``: per tile (peak, Σ exp(s − peak)), the parts of a stable log-sum-exp.
    ``near_zero=True``: per tile Σ expm1(s), returned as both elements. When almost every exp(s) is
    close to 1, exp loses the small deviations the result consists of (1 − 1e-10 is 1 in float32);
    expm1 keeps them.

    Every tile is written into one preallocated buffer and reduced into preallocated outputs: on CPU,
    a fresh tile per step interleaved with small result tensors fragments the heap (measured: 2.7 GB
    of resident memory for 30,000 points, against tens of MiB this way).
    """
    num_points, device = left.shape[0], left.device
    tiles = [(r0, r1, c0, c1) for r0, r1, c0, c1 in _uniformity_tiles(num_points, tile) if c0 > r0 or r1 - r0 >= 2]
    side = min(tile, num_points)
    lower = torch.ones(side, side, dtype=torch.bool, device=device).tril()  # i ≥ j: not a pair
    fill = 0.0 if near_zero else -math.inf  # contributes nothing: expm1(0) = 0, exp(−inf) = 0
    buffer = torch.empty(side * side, dtype=left.dtype, device=device)
    peak = torch.empty((), dtype=left.dtype, device=device)
    firsts = torch.empty(len(tiles), dtype=torch.float64, device=device)
    seconds = firsts if near_zero else torch.empty(len(tiles), dtype=torch.float64, device=device)
    with _ieee_float32_matmul():
        for k, (r0, r1, c0, c1) in enumerate(tiles):
            s = buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.matmul(left[r0:r1], right[c0:c1].T, out=s)  # ≤ 0 up to round-off (clamped at the end)
            if r0 == c0:
                s.masked_fill_(lower[: r1 - r0, : c1 - c0], fill)
            if near_zero:
                torch.sum(s.expm1_(), dim=(0, 1), dtype=torch.float64, out=firsts[k])
            else:
                torch.amax(s, dim=(0, 1), out=peak)
                firsts[k] = peak
                torch.sum(s.sub_(peak).exp_(), dim=(0, 1), dtype=torch.float64, out=seconds[k])
    return firsts, seconds


def _uniformity_operands(x: Tensor, t: float, dtype: torch.dtype, log_shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """``left``, ``right`` with left_i · right_j = −t‖x_i − x_j‖² − log_shift: one GEMM per tile.

    Rows [2t·a, −t‖a‖² − log_shift, −t] times columns [b, 1, ‖b‖²].
    """
    sq_norms = x.square().sum(dim=1, keepdim=True)
    left = torch.cat([2 * t * x, -t * sq_norms - log_shift, torch.full_like(sq_norms, -t)], dim=1).to(dtype)
    right = torch.cat([x, torch.ones_like(sq_norms), sq_norms], dim=1).to(dtype)
    return left, right


def _uniformity_value(x: Tensor, t: float, dtype: torch.dtype, tile: int) -> Tensor:
    """log of the mean over pairs i < j of exp(−t‖x_i − x_j‖²) of float64 points already shifted into
    their cloud (see :func:`_uniformity_from_points`), float64 scalar, no autograd."""
    num_points = x.shape[0]
    num_pairs = num_points * (num_points - 1) / 2
    # Mean squared distance over pairs, exact: Jensen gives log mean exp(s) ≥ −t·mean d².
    mean_sq_distance = 2 * (x - x.mean(dim=0)).square().sum() / (num_points - 1)
    left, right = _uniformity_operands(x, t, dtype)

    def near_zero_value() -> Tensor:
        expm1_sums, _ = _pair_tiles_sum(left, right, tile, near_zero=True)
        return torch.log1p(expm1_sums.sum() / num_pairs)

    # Certainly near zero (≥ −1/2): the expm1 pass only. Otherwise log-sum-exp, redone with expm1 if
    # it lands near zero after all (e.g. most points in one tight cluster, a few far away).
    if float(t * mean_sq_distance) <= 0.5:
        return near_zero_value().clamp(max=0)
    peaks, sums = _pair_tiles_sum(left, right, tile, near_zero=False)
    top = peaks.max()
    value = top + torch.log((sums * (peaks - top).exp()).sum() / num_pairs)
    if float(value) > -0.5:
        return near_zero_value().clamp(max=0)
    return value.clamp(max=0)  # a mean of exp(−t·d²) ≤ 1; round-off must not make it positive


def _uniformity_gradient(x: Tensor, value: Tensor, t: float, dtype: torch.dtype, tile: int) -> Tensor:
    r"""∂ unif / ∂x_i = −2t Σ_{j≠i} w_ij (x_i − x_j), w_ij = e^{s_ij} / Σ_{k<l} e^{s_kl}, recomputed in tiles.

    With log Σ e^{s} = value + log(#pairs) folded into the GEMM, each tile gives the weights directly
    (each ≤ 1, no overflow); per tile the row sums r and W·x are accumulated for both the tile and
    its mirror below the diagonal, so the gradient is −2t (r_i x_i − (W x)_i). Memory: the operands,
    one tile buffer and the (N, D) outputs, never N×N.
    """
    num_points, d = x.shape
    log_total = float(value) + math.log(num_points * (num_points - 1) / 2)
    left, right = _uniformity_operands(x, t, dtype, log_shift=log_total)
    points = x.to(dtype)
    tiles = [(r0, r1, c0, c1) for r0, r1, c0, c1 in _uniformity_tiles(num_points, tile) if c0 > r0 or r1 - r0 >= 2]
    side = min(tile, num_points)
    lower = torch.ones(side, side, dtype=torch.bool, device=x.device).tril()
    buffer = torch.empty(side * side, dtype=dtype, device=x.device)
    row_sums = torch.zeros(num_points, dtype=dtype, device=x.device)
    weighted = torch.zeros(num_points, d, dtype=dtype, device=x.device)
    with _ieee_float32_matmul():
        for r0, r1, c0, c1 in tiles:
            w = buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.matmul(left[r0:r1], right[c0:c1].T, out=w)
            w.exp_()
            if r0 == c0:
                w.masked_fill_(lower[: r1 - r0, : c1 - c0], 0.0)
            row_sums[r0:r1] += w.sum(dim=1)
            row_sums[c0:c1] += w.sum(dim=0)
            weighted[r0:r1].addmm_(w, points[c0:c1])
            weighted[c0:c1].addmm_(w.T, points[r0:r1])
    del left, right, points, buffer
    grad = weighted.to(torch.float64)  # −2t (r x − W x), built in place: no (N, D) temporaries
    return grad.addcmul_(row_sums.to(torch.float64)[:, None], x, value=-1).mul_(2 * t)


class _Uniformity(torch.autograd.Function):
    """Uniformity of shifted float64 points with a tiled backward (no N×N matrix in either pass)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: float, dtype: torch.dtype, tile: int) -> Tensor:
        value = _uniformity_value(x, t, dtype, tile)
        ctx.save_for_backward(x, value)
        ctx.t, ctx.dtype, ctx.tile = t, dtype, tile
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, value = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            with no_autocast(x.device):
                grad = _uniformity_gradient(x, value, ctx.t, ctx.dtype, ctx.tile).mul_(grad_output)
        return grad, None, None, None


def _uniformity_from_points(points: Tensor, t: float, normalize: bool, metric: str, tile: int | None = None) -> Tensor:
    r"""log of the mean over pairs i < j of exp(−t‖x_i − x_j‖²), blocked and exact, float64 scalar.

    Never forms the N×N matrix: tiles of at most ``tile``² pairs on or above the diagonal, each one
    GEMM and a few in-place passes, reduced per tile and combined in float64. Differentiable: the
    backward pass (:class:`_Uniformity`) recomputes the tiles instead of storing them.

    Accuracy: normalising, and shifting every point by the one nearest the mean (distances do not
    change), happen in float64 before the tiles, so ‖a‖² + ‖b‖² − 2a·b cancels at the scale of the
    cloud's spread, not of its offset from the origin; see :func:`_uniformity_compute_dtype` for the
    tiles' dtype. Results far from 0 use a stable log-sum-exp. Results near 0 (near-collapsed
    embeddings, mean exp(s) > e^{-1/2}) use log1p(mean expm1(s)) instead, which keeps their relative
    precision; that second pass over the tiles runs only when a first estimate says it is needed.
    Identical points give exactly 0: shifted, they are all zero vectors, so every expm1(s) is 0.
    """
    x = points.to(torch.float64)
    if normalize:
        x = l2_normalize_rows(x)
    with torch.no_grad():
        anchor = (x - x.mean(dim=0)).square().sum(dim=1).argmin()
    x = x - x[anchor]  # the gradient through the anchor is −Σ_i ∂/∂x_i = 0: the value is shift-invariant
    dtype = _uniformity_compute_dtype(points, t, normalize)
    tile = tile or _uniformity_tile(points.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Uniformity.apply(x, t, dtype, tile)
    return _uniformity_value(x, t, dtype, tile)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def lidar(views: Tensor, delta: float = 1e-4, eps: float = 1e-8) -> Tensor:
    r"""LiDAR, the effective rank of the linear-discriminant matrix of the SSL surrogate task
    (Thilak et al., ICLR 2024).

    Each of the n source samples is a class whose members are its q augmented views
    :math:`z_{i1}, \dots, z_{iq}`. With :math:`\mu_i` the mean of sample i's views and :math:`\mu` the
    mean of the :math:`\mu_i`:

    .. math::
        \Sigma_b = \frac{1}{n-1} \sum_i (\mu_i - \mu)(\mu_i - \mu)^\top, \qquad
        \Sigma_w = \frac{1}{n(q-1)} \sum_{i,j} (z_{ij} - \mu_i)(z_{ij} - \mu_i)^\top + \delta I,

    .. math::
        \lambda = \operatorname{eig}\big(\Sigma_w^{-1/2} \Sigma_b \Sigma_w^{-1/2}\big)_{\ge 0}, \qquad
        p_k = \frac{\lambda_k}{\sum_l \lambda_l} + \varepsilon, \qquad
        \operatorname{LiDAR} = \exp\Big(-\sum_{k=1}^{d} p_k \log p_k\Big).

    Σ_b has rank at most min(n − 1, d), so LiDAR is at most about min(n − 1, d); higher is better.
    If every sample has the same mean view (tr Σ_b at the rounding noise of the input's dtype; see
    :func:`_lidar_zero_tolerance`) all λ are 0 and LiDAR is
    :math:`\exp(-d\,\varepsilon \log \varepsilon) \approx 1`, exactly 1 for ``eps=0``. Σ_b and Σ_w
    are formed from centred values, so a common offset far larger than the spread costs no accuracy.
    Computed in float64 through the Cholesky factor of Σ_w (same eigenvalues as the symmetric form).

    Args:
        views: ``(n, q, d)`` tensor: n ≥ 2 samples, q ≥ 2 views each, d features.
        delta: ridge added to Σ_w (the paper's 1e-4); with 0, a singular Σ_w raises ``ValueError``.
        eps: added to each normalised eigenvalue (the paper's 1e-8).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import lidar
        >>> centres = torch.randn(256, 4) @ torch.randn(4, 32)   # sample means span 4 directions
        >>> noise = 0.1 * torch.randn(256, 1, 32)
        >>> views = centres.unsqueeze(1) + torch.cat([noise, -noise], dim=1)   # (256, 2, 32)
        >>> 1.0 < lidar(views).item() <= 4.0
        True
    """
    name = "lidar"
    delta = check_nonnegative_float(delta, name, "delta")
    eps = check_nonnegative_float(eps, name, "eps")
    v = _check_views(views, name, min_groups=2)
    n, q, _ = v.shape
    with no_autocast(v.device):
        means, centred = _group_moments(v.to(torch.float64))
        # Direct centring: exact even for large offsets (the class's shifted sums agree).
        mean = means.mean(dim=0)
        spread = means - mean
        between = spread.T @ spread / (n - 1)
        within = centred.T @ centred / (n * (q - 1))
        tol = _lidar_zero_tolerance(
            float(between.diagonal().sum()), float(within.diagonal().sum()), mean, torch.finfo(v.dtype).eps
        )
        value = _smooth_effective_rank(_lidar_eigenvalues(between, within, delta, tol, name), eps)
    return value.to(result_dtype(v))


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, normalize: bool = True) -> Tensor:
    r"""Alignment of positive pairs (Wang & Isola, ICML 2020).

    .. math::
        \operatorname{align}(x, y) = \frac{1}{N} \sum_{i=1}^{N} \lVert \hat x_i - \hat y_i \rVert_2^{\alpha},
        \qquad \hat x_i = \frac{x_i}{\lVert x_i \rVert_2}

    (:math:`\hat x = x` for ``normalize=False``). Row i of ``x`` and row i of ``y`` are two views of
    one sample. 0 for identical views; on the unit sphere at most :math:`2^\alpha`. Lower is better.
    Differentiable (usable as a loss); for α ≤ 1 the gradient at an exactly identical pair is taken as 0.

    Args:
        x: ``(N, D)`` embeddings of the first views.
        y: ``(N, D)`` embeddings of the second views, same shape.
        alpha: exponent > 0 (the paper's 2).
        normalize: L2-normalise the rows first (a zero row has no direction and stays zero, at
            distance 1 from every unit vector: :func:`reprmetrics._linalg.l2_normalize_rows`).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import alignment
        >>> x = torch.randn(100, 16)
        >>> alignment(x, x).item()
        0.0
        >>> 0.0 < alignment(x, x + 0.1 * torch.randn(100, 16)).item() < 0.1
        True
    """
    name = "alignment"
    alpha = check_nonnegative_float(alpha, name, "alpha", strictly_positive=True)
    xs, ys = _check_pair(x, y, name)
    with no_autocast(xs.device):
        value = _alignment_distances(xs, ys, alpha, normalize, name).mean()
    return value.to(torch.promote_types(result_dtype(xs), result_dtype(ys)))


def uniformity(x: Tensor, t: float = 2.0, normalize: bool = True) -> Tensor:
    r"""Uniformity on the hypersphere (Wang & Isola, ICML 2020), exact over every pair.

    .. math::
        \operatorname{unif}(x) = \log \frac{2}{N(N-1)} \sum_{i<j} e^{-t \lVert \hat x_i - \hat x_j \rVert_2^2},
        \qquad \hat x_i = \frac{x_i}{\lVert x_i \rVert_2}

    (:math:`\hat x = x` for ``normalize=False``). Lower is better (more uniform). Points drawn
    uniformly on :math:`S^{d-1}` give about :math:`-2t + 2t^2/d` (−3.94 for t = 2, d = 128); identical
    points give exactly 0. Computed in tiles (at most 1024² pairs at a time on CPU, 4096² on GPU) with
    a stable log-sum-exp: memory is O(N·D + tile²), never an N×N matrix.

    Differentiable, for use as a training loss (Wang & Isola's and lightly's use): the backward pass
    recomputes the tiles (a custom ``torch.autograd.Function``) instead of storing them, so it keeps
    the same memory bound (measured: under 200 MiB of extra peak memory for forward + backward at
    N = 16,384, D = 128, where an N×N float32 matrix alone is 1 GiB). The gradient equals autograd
    through ``torch.pdist`` to about 1e-12 relative for float64 input (5e-6 for float32 input).

    Args:
        x: ``(N, D)`` embeddings, N ≥ 2.
        t: temperature > 0 (the paper's 2).
        normalize: L2-normalise the rows first (a zero row has no direction and stays zero, at
            distance 1 from every unit vector: :func:`reprmetrics._linalg.l2_normalize_rows`).

    Returns:
        A scalar tensor (≤ 0).

    Example:
        >>> import torch
        >>> from reprmetrics.functional import uniformity
        >>> x = torch.randn(2000, 128)   # nearly uniform on the sphere: about -2t + 2t²/d = -3.94
        >>> -4.0 < uniformity(x).item() < -3.85
        True
    """
    name = "uniformity"
    t = check_nonnegative_float(t, name, "t", strictly_positive=True)
    z = check_tensor(x, name, min_rows=2)
    with no_autocast(z.device):
        value = _uniformity_from_points(z, t, normalize, name)
    return value.to(result_dtype(z))
