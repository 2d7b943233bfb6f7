r"""Intrinsic dimension: per-sample local LID (as in LDReg), global TwoNN and MLE, the LDReg regulariser.

Every estimator reads the Euclidean distances :math:`r_1 \le \dots \le r_k` from a point to its k
nearest neighbours, the point itself excluded. They come from the exact, blocked kNN of
:mod:`reprmetrics._knn` (distance tiles plus a running top-k, on the input's device, never an N×N
matrix), with the selected distances recomputed in float64 by direct difference: identical points are
at distance exactly 0 and no distance is negative.

Degenerate neighbourhoods give finite, documented values, never NaN and never an exception:

- a neighbourhood that has collapsed onto the point gives dimension **0** (the limit of the
  estimators as neighbours approach the point);
- a neighbourhood whose k distances are all equal and non-zero, where the estimators diverge, gives
  :data:`LID_CAP` (the largest float32, about 3.4e38), finite in every result dtype.

Functions return ``float32`` results, or ``float64`` for float64 input (half precision is upcast).
The ``_..._from_distances`` pieces are shared with the Metric classes in
:mod:`reprmetrics.intrinsic_dimension`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from reprmetrics._knn import knn, neighbour_distances
from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_positive_int, check_tensor, result_dtype

__all__ = ["LID_CAP", "ldreg_regularizer", "local_intrinsic_dimension", "mle_dimension", "twonn_dimension"]

#: Value reported where an estimator diverges (all neighbour distances equal): the largest float32.
LID_CAP = float(torch.finfo(torch.float32).max)
# log LID is clamped to ±this in geometric means and in the regulariser, so both stay finite.
_LOG_CAP = math.log(LID_CAP)
ESTIMATORS = ("mle", "mom")


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _check_estimator(estimator: Any, metric: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"{metric}: `estimator` must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def _check_discard_fraction(value: Any, metric: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0
    if not ok:
        raise ValueError(
            f"{metric}: `discard_fraction` must be a number in (0, 1), got {value!r}"
            " (with 0 the largest ratio has F = 1 and −log(1 − F) is infinite)"
        )
    return float(value)


def _check_enough_neighbours(k: int, available: int, metric: str, what: str) -> None:
    if k > available:
        raise ValueError(f"{metric}: k={k} needs at least {k} neighbours per point, but {what} gives only {available}")


def _neighbour_source(
    x: Any, reference: Any, exclude_self: Any, k: int, metric: str
) -> tuple[Tensor, Tensor | None, bool]:
    """Validate ``x`` (and ``reference``) for a k-neighbour estimate; returns them and exclude_self."""
    if exclude_self is not None and not isinstance(exclude_self, bool):
        raise ValueError(f"{metric}: `exclude_self` must be True, False or None, got {exclude_self!r}")
    if reference is None:
        x = check_tensor(x, metric, name="x", min_rows=3)
        exclude_self = True if exclude_self is None else exclude_self
        available = x.shape[0] - int(exclude_self)
        what = f"x with {x.shape[0]} points" + (
            " (each point excluded from its own neighbours)" if exclude_self else ""
        )
        _check_enough_neighbours(k, available, metric, what)
        return x, None, exclude_self
    x = check_tensor(x, metric, name="x", min_rows=1)
    reference = check_tensor(reference, metric, name="reference", min_rows=1)
    if reference.shape[1] != x.shape[1]:
        raise ValueError(f"{metric}: `reference` has {reference.shape[1]} features but `x` has {x.shape[1]}")
    if reference.device != x.device:
        raise ValueError(f"{metric}: `reference` is on {reference.device} but `x` is on {x.device}")
    exclude_self = False if exclude_self is None else exclude_self
    available = reference.shape[0] - int(exclude_self)
    what = f"a reference of {reference.shape[0]} points" + (" (one match per query dropped)" if exclude_self else "")
    _check_enough_neighbours(k, available, metric, what)
    return x, reference, exclude_self


# ----------------------------------------------------------------------------------------------
# estimators on sorted neighbour distances (shared with the Metric classes)
# ----------------------------------------------------------------------------------------------


def _log_lid_from_distances(distances: Tensor, estimator: str) -> Tensor:
    """log LID per row of ``(N, k)`` ascending distances, in [−inf, +inf]; safe to differentiate.

    −inf marks LID 0 (collapsed neighbourhood), +inf a divergent estimate (equidistant neighbours).
    Every branch that is not taken sees harmless inputs, so no NaN reaches the gradient.
    """
    k = distances.shape[1]
    r_k = distances[:, -1:]
    inner = distances[:, :-1]
    if estimator == "mle":
        # LID = −k / Σ_{i<k} log(r_i/r_k) = k / s,   s = Σ_{i<k} log(r_k/r_i) ≥ 0.
        positive = distances.amin(dim=1) > 0
        logs = torch.where(positive.unsqueeze(1), distances, 1.0).log()
        s = (logs[:, -1:] - logs[:, :-1]).clamp_min(0).sum(dim=1)
        finite = positive & (s > 0)
        value = math.log(k) - torch.where(finite, s, 1.0).log()
        return torch.where(finite, value, torch.where(positive, math.inf, -math.inf))
    # "mom": LID = m / (r_k − m), m = mean(r_1 … r_{k−1}); r_k − m is taken as mean(r_k − r_i), a sum
    # of non-negative terms, so it cannot round below zero.
    numerator = inner.mean(dim=1)
    gap = (r_k - inner).clamp_min(0).mean(dim=1)
    finite = (numerator > 0) & (gap > 0)
    value = torch.where(finite, numerator, 1.0).log() - torch.where(finite, gap, 1.0).log()
    return torch.where(finite, value, torch.where(numerator > 0, math.inf, -math.inf))


def _lid_from_distances(distances: Tensor, estimator: str) -> Tensor:
    """Per-row LID in float64: 0 for collapsed neighbourhoods, at most :data:`LID_CAP`."""
    return _log_lid_from_distances(distances, estimator).exp().clamp(max=LID_CAP)


def _geometric_mean(lid: Tensor) -> Tensor:
    """exp(mean log LID), each log clamped to ±log(LID_CAP) so one duplicate cannot zero the mean."""
    return lid.log().clamp(-_LOG_CAP, _LOG_CAP).mean().exp()


def _twonn_from_distances(r1: Tensor, r2: Tensor, discard_fraction: float) -> Tensor:
    """TwoNN as scikit-dimension defines it, from each point's first two neighbour distances.

    Runs on the device without a host sync (the kept count is a tensor).
    """
    n = r1.shape[0]
    usable = r1 > 0  # r1 = 0 (a duplicate) leaves μ undefined: such points are dropped
    num_usable = usable.sum().to(torch.float64)
    mu = torch.where(usable, r2 / torch.where(usable, r1, 1.0), math.inf).sort().values
    # ⌊N(1 − f)⌋ as float64 arithmetic, like int(N * (1 - f)); at most N − 1 so that F_i < 1.
    num_kept = torch.minimum(torch.floor(num_usable * (1.0 - discard_fraction)), num_usable - 1)
    rank = torch.arange(1, n + 1, dtype=torch.float64, device=r1.device)
    kept = rank <= num_kept
    log_mu = torch.where(kept, mu.log(), 0.0)
    cdf = torch.where(kept, rank / num_usable.clamp_min(1), 0.0)
    target = -torch.log1p(-cdf)
    sxx = (log_mu * log_mu).sum()
    sxy = (log_mu * target).sum()
    # No kept ratio (everything duplicated): 0. All kept μ = 1 (slope infinite): LID_CAP.
    slope = sxy / torch.where(sxx > 0, sxx, 1.0)
    degenerate = torch.where(num_kept >= 1, LID_CAP, 0.0)
    return torch.where(sxx > 0, slope, degenerate).clamp(max=LID_CAP)


def _mle_from_distances(distances: Tensor) -> Tensor:
    """Levina-Bickel MLE pooled by MacKay-Ghahramani's harmonic mean, as scikit-dimension's MLE."""
    k = distances.shape[1]
    positive = distances.amin(dim=1) > 0
    logs = torch.where(positive.unsqueeze(1), distances, 1.0).log()
    # 1/m_i = Σ_{j<k} log(r_k/r_j) / (k − 1); +inf (m_i = 0) when a neighbour is at distance 0.
    inverse = torch.where(positive, (logs[:, -1:] - logs[:, :-1]).clamp_min(0).sum(dim=1) / (k - 1), math.inf)
    mean_inverse = inverse.mean()
    return torch.where(mean_inverse > 0, 1.0 / mean_inverse, LID_CAP).clamp(max=LID_CAP)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def local_intrinsic_dimension(
    x: Tensor, k: int = 20, reference: Tensor | None = None, estimator: str = "mle", exclude_self: bool | None = None
) -> Tensor:
    r"""Local intrinsic dimensionality (LID) of each row of ``x``, as LDReg computes it.

    With :math:`r_1 \le \dots \le r_k` the Euclidean distances from a point to its k nearest
    neighbours in ``reference`` (default: ``x`` itself, the point excluded):

    .. math::
        \text{mle (Amsaleg et al., KDD 2015):}\quad
        \mathrm{LID} = -\frac{k}{\sum_{i=1}^{k-1} \log(r_i / r_k)}, \qquad
        \text{mom:}\quad \mathrm{LID} = \frac{m}{r_k - m},\ m = \frac{1}{k-1}\sum_{i=1}^{k-1} r_i .

    These are LDReg's ``lid_mle`` (without its 1e-4 inside the log) and ``lid_mom_est``
    (Huang et al., *LDReg: Local Dimensionality Regularized Self-Supervised Learning*, ICLR 2024).
    Higher means the neighbourhood spans more directions; values near 0 mean local collapse.

    Degenerate neighbourhoods (finite, never NaN):

    - all k neighbours at distance 0 (``r_k = 0``, e.g. a fully collapsed batch): 0;
    - ``mle``: any neighbour at distance 0 (a duplicate point): 0, the estimator's limit as
      :math:`r_1 \to 0`;
    - ``mom``: 0 only when :math:`r_1 = \dots = r_{k-1} = 0`; fewer duplicates give the formula's
      finite value;
    - all k distances equal and non-zero (the estimators diverge): :data:`LID_CAP` ≈ 3.4e38.

    Args:
        x: ``(N, D)`` query points.
        k: number of neighbours, ≥ 2.
        reference: ``(M, D)`` points the neighbours are taken from (e.g. the all-gathered batch, as in
            LDReg). Default: ``x``.
        estimator: ``"mle"`` or ``"mom"``.
        exclude_self: default ``True`` without a reference (each point is excluded *by index*, so a
            duplicate at another index is a neighbour at distance 0) and ``False`` with one. With a
            reference, ``True`` drops each query's nearest match if it lies at distance exactly 0
            (the query's own copy in the reference); otherwise nothing is dropped.

    Returns:
        ``(N,)`` tensor of LIDs.

    Raises:
        ValueError: for non-finite values, a tensor that is not 2-D, fewer than 3 points (without a
            reference), ``k < 2``, or ``k`` larger than the neighbours available.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import local_intrinsic_dimension
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 4, generator=g) @ torch.randn(4, 64, generator=g)   # a 4-D subspace
        >>> lid = local_intrinsic_dimension(x, k=20)
        >>> lid.shape
        torch.Size([2000])
        >>> 3.0 < lid.log().mean().exp().item() < 5.0
        True
    """
    name = "local_intrinsic_dimension"
    k = check_positive_int(k, name, "k", minimum=2)
    estimator = _check_estimator(estimator, name)
    x, reference, exclude_self = _neighbour_source(x, reference, exclude_self, k, name)
    with no_autocast(x.device):
        distances, _ = knn(x, k, reference=reference, exclude_self=exclude_self)
        lid = _lid_from_distances(distances, estimator)
    return lid.to(result_dtype(x))


def twonn_dimension(x: Tensor, discard_fraction: float = 0.1) -> Tensor:
    r"""TwoNN intrinsic dimension (Facco et al., *Scientific Reports* 2017), as scikit-dimension's TwoNN.

    With :math:`\mu_i = r_2 / r_1` the ratio of each point's second to first neighbour distance,
    sorted ascending, N the number of points with :math:`r_1 > 0`, and
    :math:`n = \lfloor N (1 - f) \rfloor` the ratios kept (f = ``discard_fraction``),

    .. math::
        F_i = \frac{i}{N}, \qquad
        d = \frac{\sum_{i=1}^{n} \log \mu_i \cdot \big(-\log(1 - F_i)\big)}{\sum_{i=1}^{n} (\log \mu_i)^2},

    the slope of the zero-intercept least-squares fit of :math:`-\log(1 - F_i)` on
    :math:`\log \mu_i` (``skdim.id.TwoNN(discard_fraction=f).fit(x).dimension_``).

    Degenerate input (finite, never NaN): points with :math:`r_1 = 0` (duplicates) are dropped, as
    scikit-dimension does; if no ratio is kept (e.g. every point duplicated) the dimension is 0; if
    every kept ratio is 1 (equidistant neighbours: the fit's slope is infinite) it is
    :data:`LID_CAP`. ``n`` is capped at N − 1 so that :math:`F_i < 1`.

    Args:
        x: ``(N, D)`` points, N ≥ 3.
        discard_fraction: fraction of the largest ratios left out of the fit, in (0, 1).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import twonn_dimension
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 3, generator=g) @ torch.randn(3, 64, generator=g)   # a 3-D subspace
        >>> round(twonn_dimension(x).item())
        3
    """
    name = "twonn_dimension"
    discard_fraction = _check_discard_fraction(discard_fraction, name)
    x = check_tensor(x, name, name="x", min_rows=3)
    with no_autocast(x.device):
        distances, _ = knn(x, 2)
        value = _twonn_from_distances(distances[:, 0], distances[:, 1], discard_fraction)
    return value.to(result_dtype(x))


def mle_dimension(x: Tensor, k: int = 20) -> Tensor:
    r"""Global maximum-likelihood intrinsic dimension, as scikit-dimension's ``MLE().fit(x, n_neighbors=k)``.

    Levina & Bickel (NeurIPS 2004) per point, pooled with the harmonic mean of MacKay & Ghahramani
    (2005):

    .. math::
        \hat m_i = \frac{k - 1}{\sum_{j=1}^{k-1} \log(r_k / r_j)}, \qquad
        d = \Big(\frac{1}{N} \sum_{i=1}^{N} \hat m_i^{-1}\Big)^{-1}.

    Degenerate input (finite, never NaN): a point with a neighbour at distance 0 has
    :math:`\hat m_i = 0`, so (as in scikit-dimension) any duplicate point makes d = 0, and so does a
    fully collapsed set (where scikit-dimension gives NaN); if every point's k distances are equal
    (all :math:`\hat m_i` infinite), d is :data:`LID_CAP`.

    Args:
        x: ``(N, D)`` points, N ≥ 3.
        k: number of neighbours, 2 ≤ k ≤ N − 1.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import mle_dimension
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 5, generator=g) @ torch.randn(5, 64, generator=g)   # a 5-D subspace
        >>> 4.0 < mle_dimension(x).item() < 6.0
        True
    """
    name = "mle_dimension"
    k = check_positive_int(k, name, "k", minimum=2)
    x, _, _ = _neighbour_source(x, None, None, k, name)
    with no_autocast(x.device):
        distances, _ = knn(x, k)
        value = _mle_from_distances(distances)
    return value.to(result_dtype(x))


def ldreg_regularizer(
    x: Tensor, reference: Tensor | None = None, k: int = 64, estimator: str = "mom", exclude_self: bool | None = None
) -> Tensor:
    r"""The LDReg regulariser (Huang et al., ICLR 2024): :math:`-\frac{1}{N}\sum_i |\log \mathrm{LID}_i|`.

    LID is :func:`local_intrinsic_dimension` of each row of ``x`` against ``reference`` (default
    ``x``), differentiable with respect to ``x``; the reference is treated as a constant (detached),
    as in LDReg, where it is the all-gathered batch. Adding ``alpha * ldreg_regularizer(z)`` to a
    self-supervised loss raises the local dimension of the representation (for LID > 1, which is
    where embeddings live). In DDP, pass the all-gathered batch as ``reference`` together with
    ``exclude_self=True``, so each query's own copy is dropped.

    The neighbours are chosen without gradient; the gradient flows through their distances, which
    are recomputed in float64 with memory O(tile) (never an N×k×D autograd buffer). Each
    :math:`\log \mathrm{LID}_i` is clamped to ±log(:data:`LID_CAP`) ≈ ±88.7, so collapsed or
    equidistant neighbourhoods give a finite loss and carry no gradient; a distance of exactly 0
    contributes a zero (sub)gradient.

    Args:
        x: ``(N, D)`` embeddings (the gradient flows to them).
        reference: ``(M, D)`` neighbours to measure against (detached). Default: ``x`` (detached).
        k: number of neighbours, ≥ 2 (LDReg's default 64).
        estimator: ``"mom"`` (LDReg's choice for the regulariser) or ``"mle"``.
        exclude_self: as in :func:`local_intrinsic_dimension`.

    Returns:
        A scalar tensor (≤ 0), float32 or float64 like the input, computed outside autocast.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import ldreg_regularizer
        >>> z = torch.randn(256, 32, requires_grad=True)
        >>> loss = ldreg_regularizer(z, k=16)
        >>> loss.backward()
        >>> bool(loss < 0) and z.grad.shape == z.shape
        True
    """
    name = "ldreg_regularizer"
    k = check_positive_int(k, name, "k", minimum=2)
    estimator = _check_estimator(estimator, name)
    x, reference, exclude_self = _neighbour_source(x, reference, exclude_self, k, name)
    with no_autocast(x.device):
        _, index = knn(x.detach(), k, reference=reference, exclude_self=exclude_self)
        source = x if reference is None else reference
        distances = neighbour_distances(x, source.detach(), index)
        log_lid = _log_lid_from_distances(distances, estimator).clamp(-_LOG_CAP, _LOG_CAP)
        value = -log_lid.abs().mean()
    return value.to(result_dtype(x))
