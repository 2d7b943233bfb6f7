r"""Isotropy metrics: how evenly embeddings fill their space, from their mean and covariance or a few sums.

- :func:`wasserstein_uniformity`: the 2-Wasserstein distance between a Gaussian fitted to the
  L2-normalised embeddings and the uniform-on-the-sphere surrogate N(0, I/D) (Fang et al., ICLR 2024).
- :func:`sigreg`: LeJEPA's sliced Epps–Pulley statistic of how far the embeddings are from N(0, I)
  (Balestriero & LeCun, 2025).
- :func:`isoscore`: IsoScore, the fraction of dimensions the covariance uses uniformly (Rudman et al.,
  Findings of ACL 2022).

Every function computes in float64 outside autocast on the input's device and returns a scalar in
``float32`` or, for float64 input, ``float64``. The ``_..._from_...`` pieces are shared with the
streaming Metric classes in :mod:`reprmetrics.isotropy`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reprmetrics._linalg import (
    centred_moments,
    centred_moments_of,
    eigvalsh_descending,
    l2_normalize_rows,
    no_autocast,
    nonzero_eigenvalue_tolerance,
    symmetric_from_upper,
)
from reprmetrics._validation import check_positive_int, check_tensor, result_dtype

__all__ = ["isoscore", "sigreg", "wasserstein_uniformity"]


# ----------------------------------------------------------------------------------------------
# Wasserstein uniformity
# ----------------------------------------------------------------------------------------------


def _wasserstein_uniformity_from_state(state: Tensor) -> Tensor:
    """W₂ between N(μ, Σ) and N(0, I/D) from the packed centred moments of the normalised rows (Σ with 1/N)."""
    n, mean, scatter = centred_moments(state)
    return _wasserstein_uniformity_from_parts(n, mean, scatter, eigvalsh_descending(scatter))


def _wasserstein_uniformity_from_parts(n: int, mean: Tensor, scatter: Tensor, scatter_eigenvalues: Tensor) -> Tensor:
    """W₂ from the centred moments of the normalised rows and the scatter's eigenvalues.

    Eigenvalues at or below float64 round-off, (N + D)·eps₆₄·tr Σ (what forming the scatter matrix
    and the eigensolver lose), count as 0 in tr Σ^{1/2}: their square roots would add noise of about
    sqrt(eps₆₄) each.
    """
    d = scatter.shape[0]
    lam = scatter_eigenvalues / n
    trace = scatter.diagonal().sum() / n
    round_off = float(trace) * (n + d) * torch.finfo(torch.float64).eps
    lam = torch.where(lam > round_off, lam, torch.zeros_like(lam))
    squared = mean.square().sum() + 1.0 + trace - (2.0 / math.sqrt(d)) * lam.sqrt().sum()
    return squared.clamp_min(0).sqrt()


def wasserstein_uniformity(embeddings: Tensor) -> Tensor:
    r"""Wasserstein uniformity (Fang et al., ICLR 2024, "Rethinking the uniformity metric in self-supervised
    learning").

    With :math:`\hat z_i = z_i / \lVert z_i \rVert_2`, their mean :math:`\mu` and covariance
    :math:`\Sigma = \frac1N \sum_i (\hat z_i - \mu)(\hat z_i - \mu)^\top` (divided by N, as in the
    paper), the 2-Wasserstein distance between the Gaussians :math:`\mathcal N(\mu, \Sigma)` and
    :math:`\mathcal N(0, I_D / D)` (the large-D limit of the uniform distribution on the sphere):

    .. math::
        W_2 = \sqrt{\lVert \mu \rVert^2 + 1 + \operatorname{tr} \Sigma -
            \tfrac{2}{\sqrt D} \operatorname{tr} \Sigma^{1/2}}

    :math:`\operatorname{tr}\Sigma^{1/2} = \sum_k \sqrt{\lambda_k}` from the eigenvalues of Σ
    (negative round-off clamped to 0; eigenvalues at float64 round-off level, (N + D)·eps₆₄·tr Σ,
    counted as 0). Lower is better: about 0 for points spread uniformly over the sphere (as D
    grows), √2 when every embedding points the same way, and in between for dimensional collapse,
    which Wang & Isola's uniformity hardly registers. Zero rows stay zero after normalisation (they
    count as points at the origin). The moments are accumulated about a shift inside the cloud, so
    nothing cancels when the normalised embeddings are concentrated around one direction.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 1.

    Returns:
        A scalar tensor in ``[0, √2]``.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import wasserstein_uniformity
        >>> round(wasserstein_uniformity(torch.ones(100, 16)).item() ** 2, 6)   # one direction: W₂ = √2
        2.0
        >>> wasserstein_uniformity(torch.randn(20000, 16)).item() < 0.1        # uniform on the sphere
        True
    """
    z = check_tensor(embeddings, "wasserstein_uniformity", min_rows=1)
    with no_autocast(z.device):
        state = centred_moments_of(l2_normalize_rows(z.to(torch.float64)))
        value = _wasserstein_uniformity_from_state(state)
    return value.to(result_dtype(z))


# ----------------------------------------------------------------------------------------------
# IsoScore
# ----------------------------------------------------------------------------------------------


def _isoscore_from_state(state: Tensor, input_eps: float) -> Tensor:
    r"""IsoScore from packed centred moments; ``input_eps``: machine epsilon of the embeddings' dtype.

    The paper's steps 2–7 reduce to the participation ratio of the covariance eigenvalues λ: with
    :math:`\hat\lambda = \sqrt D\,\lambda / \lVert\lambda\rVert_2` and the isotropy defect
    :math:`\delta^2 = \lVert\hat\lambda - 1\rVert^2 / (2(D - \sqrt D))`, one has
    :math:`D - \delta^2 (D - \sqrt D) = \sum_k \hat\lambda_k` (expand the square, using
    :math:`\lVert\hat\lambda\rVert^2 = D`), so the number of dimensions used is
    :math:`k = (\sum\hat\lambda)^2 / D = (\sum\lambda)^2 / \sum\lambda^2`, and
    :math:`\sum\lambda = \operatorname{tr}\Sigma`, :math:`\sum\lambda^2 = \lVert\Sigma\rVert_F^2` need no
    eigendecomposition (the PCA rotation of step 2 leaves both unchanged).

    A covariance no larger than what rounding the input to its dtype puts there (see
    :func:`reprmetrics._linalg.nonzero_eigenvalue_tolerance`: embeddings collapsed to one point far
    from the origin) is zero: IsoScore 0, not the near-isotropy of rounding noise.
    """
    n, mean, scatter = centred_moments(state)
    d = scatter.shape[0]
    covariance = symmetric_from_upper(scatter) / (n - 1)
    diagonal = covariance.diagonal().clamp_min(0)
    frobenius_sq = covariance.square().sum()
    # The tolerance reads only the sum of the eigenvalues it is given: the diagonal has the same sum.
    tol = nonzero_eigenvalue_tolerance(diagonal, n, d, input_eps, float(mean.square().mean()))
    if float(frobenius_sq) <= tol**2:  # λ₁ ≤ ‖Σ‖_F ≤ tol: every eigenvalue is zero
        return torch.zeros((), dtype=covariance.dtype, device=covariance.device)
    dims_used = diagonal.sum().square() / frobenius_sq
    return ((dims_used - 1.0) / (d - 1)).clamp(0.0, 1.0)


def _check_isoscore_width(num_features: int, metric: str) -> None:
    if num_features < 2:
        raise ValueError(
            f"{metric}: IsoScore needs at least 2 features (it is normalised by D − 1), got D={num_features}"
        )


def isoscore(embeddings: Tensor) -> Tensor:
    r"""IsoScore (Rudman, Gillman, Rayne & Eickhoff, Findings of ACL 2022): how uniformly the embeddings use their
    space.

    The paper's algorithm: rotate the embeddings onto their principal components; take the diagonal
    :math:`\Sigma_D` of the covariance of the rotated points (the covariance eigenvalues λ); scale it
    to norm √D, :math:`\hat\Sigma_D = \sqrt D\, \Sigma_D / \lVert \Sigma_D \rVert`; isotropy defect
    :math:`\delta = \lVert \hat\Sigma_D - \mathbf 1 \rVert / \sqrt{2 (D - \sqrt D)}`; dimensions used
    :math:`k = (D - \delta^2 (D - \sqrt D))^2 / D`; and

    .. math::
        \operatorname{IsoScore} = \frac{k - 1}{D - 1}
        = \frac{(\operatorname{tr}\Sigma)^2 / \lVert\Sigma\rVert_F^2 - 1}{D - 1},

    the second form being the same quantity written without the eigendecomposition (computed that
    way: it is exact, costs O(D²), and avoids the cancellation in the first). In ``[0, 1]``: 1 for an
    isotropic covariance, 0 when the embeddings vary along one line only; higher is more isotropic.
    The covariance is the centred sample covariance (its scale cancels), accumulated about a shift
    inside the cloud so that a large common offset does not cancel digits. Identical embeddings, or
    a spread no larger than the rounding of the input to its dtype, give 0.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 2, D ≥ 2.

    Returns:
        A scalar tensor in ``[0, 1]``.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import isoscore
        >>> line = torch.randn(500, 1) * torch.tensor([[1.0, 2.0, 3.0]])
        >>> round(isoscore(line).item(), 6)
        0.0
        >>> isoscore(torch.randn(20000, 3)).item() > 0.99
        True
    """
    name = "isoscore"
    z = check_tensor(embeddings, name, min_rows=2)
    _check_isoscore_width(z.shape[1], name)
    with no_autocast(z.device):
        value = _isoscore_from_state(centred_moments_of(z.to(torch.float64)), torch.finfo(z.dtype).eps)
    return value.to(result_dtype(z))


# ----------------------------------------------------------------------------------------------
# SIGReg (sliced Epps–Pulley)
# ----------------------------------------------------------------------------------------------

# Elements of the (K, rows) complex temporaries of the recurrence per chunk of rows: a few MB on CPU
# (2**18 measured fastest of 2**14..2**18 at K = 256), large on GPUs so that the ~40 small kernels
# per chunk are not launch-bound.
_SIGREG_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_SIGREG_CHUNK_ELEMENTS_DEFAULT = 1 << 22


def _check_sigreg_arguments(
    num_slices: int, seed: int, t_max: float, num_points: int, metric: str
) -> tuple[int, int, float, int]:
    check_positive_int(num_slices, metric, "num_slices")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{metric}: `seed` must be an integer, got {seed!r}")
    bad_t_max = isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not math.isfinite(t_max) or t_max <= 0
    if bad_t_max:
        raise ValueError(f"{metric}: `t_max` must be a finite number > 0, got {t_max!r}")
    check_positive_int(num_points, metric, "num_points", minimum=2)
    return num_slices, seed, float(t_max), num_points


def _normalized_directions(directions: object, metric: str, num_features: int | None = None) -> Tensor:
    """A given ``(D, K)`` tensor of directions, checked, as float64 with unit columns."""
    a = check_tensor(directions, metric, name="directions", min_rows=1, features=None)
    if num_features is not None and a.shape[0] != num_features:
        raise ValueError(
            f"{metric}: `directions` has shape {tuple(a.shape)}, i.e. D={a.shape[0]}, but the embeddings have"
            f" {num_features} features; pass a (D, K) tensor with D = the embedding width"
        )
    a = a.to(torch.float64)
    norms = torch.linalg.vector_norm(a, dim=0)
    if bool((norms == 0).any()):
        raise ValueError(
            f"{metric}: `directions` has an all-zero column (column {int((norms == 0).nonzero()[0])}), which has"
            " no direction"
        )
    return a / norms


def _seeded_directions(num_features: int, num_slices: int, seed: int, device: torch.device) -> Tensor:
    """K unit directions in ℝ^D: standard Gaussian columns, normalised, float64 on ``device``.

    Drawn as LeJEPA draws them (``torch.randn((D, K), generator=torch.Generator().manual_seed(seed))``,
    float32), but always on a CPU generator, so every rank and every device gets the same directions,
    and the global RNG is neither read nor advanced.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn((num_features, num_slices), generator=generator, dtype=torch.float32).to(
        device=device, dtype=torch.float64
    )
    return a / torch.linalg.vector_norm(a, dim=0)


def _epps_pulley_grid(t_max: float, num_points: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Nodes t = 0, Δ, …, t_max, φ(t) = exp(−t²/2), and quadrature weights (Δ, 2Δ, …, 2Δ, Δ)·φ(t).

    The weights are the trapezoid rule over [−t_max, t_max] folded onto t ≥ 0 (the integrand is even),
    weighted by the Gaussian window φ(t).
    """
    t = torch.linspace(0.0, t_max, num_points, dtype=torch.float64, device=device)
    delta = t_max / (num_points - 1)
    weights = torch.full((num_points,), 2.0 * delta, dtype=torch.float64, device=device)
    weights[0] = weights[-1] = delta
    phi = torch.exp(-0.5 * t.square())
    return t, phi, weights * phi


def _add_characteristic_sums_(
    cos_sum: Tensor, sin_sum: Tensor, z: Tensor, directions: Tensor, delta: float, weights: Tensor | None = None
) -> None:
    """Add Σ_i cos(t_k·yᵢⱼ) and Σ_i sin(t_k·yᵢⱼ), y = Z A, t_k = k·Δ, into the (K, num_points) sums.

    In float64 throughout. Only e^{iΔy} is evaluated (one cos and one sin per projection); the other
    nodes follow from e^{i(k+1)Δy} = e^{ikΔy}·e^{iΔy}, one in-place complex multiply per node, exact up
    to about k·eps₆₄ per term (whatever the size of Δy). The (K, rows) layout makes every node's sum a
    reduction over contiguous memory. ``weights``: optional (B,) 0/1 row weights (rows with 0 add nothing).
    """
    k, p = directions.shape[1], cos_sum.shape[1]
    rows = max(1, _SIGREG_CHUNK_ELEMENTS.get(z.device.type, _SIGREG_CHUNK_ELEMENTS_DEFAULT) // k)
    directions_t = directions.T.contiguous()
    sums = torch.zeros(k, p, dtype=torch.complex128, device=cos_sum.device)
    for start in range(0, z.shape[0], rows):
        chunk = z[start : start + rows].to(torch.float64)
        theta = (directions_t @ chunk.T).mul_(delta)  # (K, rows)
        first = torch.polar(torch.ones_like(theta), theta)  # e^{iΔy}
        if weights is not None:
            w = weights[start : start + rows].to(theta)
            power = first * w  # the weight rides along every power: w·e^{ikΔy}
            sums[:, 0] += w.sum()
        else:
            power = first.clone()
            sums[:, 0] += theta.shape[1]
        sums[:, 1] += power.sum(dim=1)
        for node in range(2, p):
            power.mul_(first)
            sums[:, node] += power.sum(dim=1)
    cos_sum += sums.real
    sin_sum += sums.imag


def _sigreg_from_sums(cos_sum: Tensor, sin_sum: Tensor, num_samples: int, phi: Tensor, weights: Tensor) -> Tensor:
    """Mean over directions of EP_j = N Σ_t w_t [(mean cos − φ)² + (mean sin)²]."""
    error = (cos_sum / num_samples - phi).square() + (sin_sum / num_samples).square()
    return (num_samples * (error @ weights)).mean()


def sigreg(
    embeddings: Tensor,
    num_slices: int = 256,
    seed: int = 0,
    directions: Tensor | None = None,
    t_max: float = 3.0,
    num_points: int = 17,
) -> Tensor:
    r"""SIGReg, LeJEPA's sliced Epps–Pulley statistic (Balestriero & LeCun, 2025): distance from N(0, I).

    For K unit directions :math:`a_j` and the projections :math:`y_{ij} = z_i^\top a_j`, the
    Epps–Pulley statistic compares the empirical characteristic function of each projection with that
    of a standard normal, :math:`\varphi(t) = e^{-t^2/2}`:

    .. math::
        \mathrm{EP}_j = N \sum_{t} w_t \Big[\big(\tfrac1N \textstyle\sum_i \cos(t y_{ij}) - \varphi(t)\big)^2
        + \big(\tfrac1N \textstyle\sum_i \sin(t y_{ij})\big)^2\Big], \qquad
        \mathrm{SIGReg} = \frac1K \sum_{j=1}^{K} \mathrm{EP}_j

    with nodes :math:`t = 0, \Delta, \dots, t_{max}` (``num_points`` of them,
    :math:`\Delta = t_{max} / (\text{num\_points} - 1)`) and weights :math:`w_t = c_t \Delta\, \varphi(t)`,
    :math:`c_t = 1` at both ends and 2 inside: the trapezoid rule of
    :math:`N \int_{-t_{max}}^{t_{max}} |\hat\psi_N(t) - \varphi(t)|^2 \varphi(t)\, dt` folded onto
    :math:`t \ge 0`. These are the nodes and weights of LeJEPA's reference code
    (``lejepa.univariate.EppsPulley`` with ``SlicingUnivariateTest``); a plain trapezoid over
    :math:`[0, t_{max}]` would be half of this.

    Directions: by default K standard Gaussian vectors in :math:`\mathbb R^D`, normalised, drawn from a
    CPU ``torch.Generator`` seeded with ``seed`` (float32, as LeJEPA draws them for global step
    ``seed``): the same on every rank and device, independent of the global RNG. A ``(D, K)``
    ``directions`` tensor replaces them (its columns are normalised; ``num_slices`` and ``seed`` are
    then ignored). The embeddings are used as they are (not normalised or centred): the target is the
    standard Gaussian itself. Lower is closer to N(0, I): for N(0, I) samples the expectation of each
    EP_j is :math:`\sum_t w_t (1 - \varphi(t)^2)` (≈ 1.05 at the defaults) whatever N, while for
    embeddings that are not Gaussian (collapsed, shifted, scaled) it grows like N.

    Args:
        embeddings: ``(N, D)`` tensor, N ≥ 1.
        num_slices: K, the number of random directions.
        seed: seed of the directions' generator.
        directions: optional ``(D, K)`` tensor of directions.
        t_max: the last node.
        num_points: the number of nodes (≥ 2), 0 included.

    Returns:
        A scalar tensor ≥ 0.

    Example:
        >>> import torch
        >>> from reprmetrics.functional import sigreg
        >>> g = torch.Generator().manual_seed(0)
        >>> sigreg(torch.randn(4096, 64, generator=g)).item() < 1.5               # isotropic Gaussian
        True
        >>> sigreg(torch.randn(4096, 1, generator=g) * torch.ones(1, 64)).item() > 100   # one direction
        True
    """
    name = "sigreg"
    num_slices, seed, t_max, num_points = _check_sigreg_arguments(num_slices, seed, t_max, num_points, name)
    z = check_tensor(embeddings, name, min_rows=1)
    with no_autocast(z.device):
        z64 = z.to(torch.float64)
        d = z.shape[1]
        if directions is None:
            a = _seeded_directions(d, num_slices, seed, z.device)
        else:
            a = _normalized_directions(directions, name, num_features=d).to(z.device)
        _, phi, weights = _epps_pulley_grid(t_max, num_points, z.device)
        cos_sum = torch.zeros(a.shape[1], num_points, dtype=torch.float64, device=z.device)
        sin_sum = torch.zeros_like(cos_sum)
        _add_characteristic_sums_(cos_sum, sin_sum, z64, a, t_max / (num_points - 1))
        value = _sigreg_from_sums(cos_sum, sin_sum, z.shape[0], phi, weights)
    return value.to(result_dtype(z))
