"""Independent float64 numpy references for NESum, coding rate, Wasserstein uniformity, SIGReg and IsoScore.

Each is written from the paper's definition (or, where named, transcribed from a reference
implementation's formula), using SVDs of the centred data rather than the eigenvalues of Gram
matrices that the library uses, so the two share no numerical path.
"""

from __future__ import annotations

import numpy as np


def _centred(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z - z.mean(axis=0)


def _unit_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


def nesum_ref(z: np.ndarray) -> float:
    """He & Ozay (2022): Σ λ_k / λ₁ over the eigenvalues of the centred covariance."""
    s = np.linalg.svd(_centred(z), compute_uv=False)
    lam = s**2 / (len(z) - 1)
    return float(lam.sum() / lam[0])


def coding_rate_ref(z: np.ndarray, eps: float = 0.5, normalize: bool = True) -> float:
    """Yu et al. (2020): ½ log det(I + D/(N ε²) ZᵀZ) = ½ Σ log(1 + D/(N ε²) σ_k²), σ the singular values of Z."""
    z = _unit_rows(z) if normalize else np.asarray(z, dtype=np.float64)
    n, d = z.shape
    sigma = np.linalg.svd(z, compute_uv=False)
    return float(0.5 * np.sum(np.log1p(d / (n * eps**2) * sigma**2)))


def coding_rate_slogdet_ref(z: np.ndarray, eps: float = 0.5, normalize: bool = True) -> float:
    """The same through numpy's LU log-determinant of the D×D matrix itself."""
    z = _unit_rows(z) if normalize else np.asarray(z, dtype=np.float64)
    n, d = z.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * z.T @ z)
    assert sign > 0
    return float(0.5 * logdet)


def wasserstein_uniformity_ref(z: np.ndarray) -> float:
    """Fang et al. (2024): W₂(N(μ, Σ), N(0, I/D)) for the L2-normalised rows, Σ with 1/N.

    W₂² = ‖μ‖² + tr Σ + tr(I/D) − 2 tr((I/D)^{1/2} Σ (I/D)^{1/2})^{1/2}, with tr Σ^{1/2} = Σ σ_k / √N
    from the singular values σ of the centred rows.
    """
    x = _unit_rows(z)
    n, d = x.shape
    mu = x.mean(axis=0)
    sigma = np.linalg.svd(x - mu, compute_uv=False)
    squared = mu @ mu + 1.0 + np.sum(sigma**2) / n - 2.0 / np.sqrt(d) * np.sum(sigma) / np.sqrt(n)
    return float(np.sqrt(max(squared, 0.0)))


def isoscore_steps_ref(z: np.ndarray) -> float:
    """Rudman et al. (2022), Algorithm 1, step by step: PCA-rotate, diagonal of the covariance, scale it to
    norm √D, isotropy defect, dimensions used, IsoScore."""
    x = _centred(z)
    n, d = x.shape
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    rotated = x @ vt.T  # step 2: PCA reorientation
    if rotated.shape[1] < d:  # fewer samples than dimensions: the missing principal axes carry no variance
        rotated = np.hstack([rotated, np.zeros((n, d - rotated.shape[1]))])
    sigma_d = np.diag(np.cov(rotated, rowvar=False))  # step 3
    sigma_hat = np.sqrt(d) * sigma_d / np.linalg.norm(sigma_d)  # step 4
    defect = np.linalg.norm(sigma_hat - 1.0) / np.sqrt(2.0 * (d - np.sqrt(d)))  # step 5
    dims_used = (d - defect**2 * (d - np.sqrt(d))) ** 2 / d  # step 6
    return float((dims_used - 1.0) / (d - 1.0))  # step 7


def unit_columns(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=0)


def sigreg_ref(z: np.ndarray, directions: np.ndarray, t_max: float = 3.0, num_points: int = 17) -> float:
    """Balestriero & LeCun (2025), from the definition: for each direction, N ∫ |ψ̂(t) − φ(t)|² φ(t) dt over
    [−t_max, t_max] by numpy's trapezoid rule on the symmetric grid (2·num_points − 1 nodes), with the
    complex empirical characteristic function ψ̂(t) = mean exp(i t y); then the mean over directions."""
    y = np.asarray(z, dtype=np.float64) @ unit_columns(directions)  # (N, K)
    t = np.linspace(-t_max, t_max, 2 * num_points - 1)
    phi = np.exp(-(t**2) / 2)
    ecf = np.exp(1j * y[:, :, None] * t).mean(axis=0)  # (K, nodes)
    integrand = np.abs(ecf - phi) ** 2 * phi
    return float(np.mean(len(y) * np.trapezoid(integrand, t, axis=1)))


def lejepa_sigreg_transcription(z: np.ndarray, directions: np.ndarray, t_max: float = 3.0, n_points: int = 17) -> float:
    """A numpy transcription of the formula in LeJEPA's reference code (rbalestr-lab/lejepa,
    ``lejepa/univariate/epps_pulley.py`` ``EppsPulley.forward`` inside ``lejepa/multivariate/slicing.py``
    ``SlicingUnivariateTest`` with reduction "mean", one process), evaluated in float64:
    nodes ``linspace(0, t_max, n_points)``, weights ``2·dt`` with ``dt`` at both ends, times φ(t);
    ``err = (mean cos(x t) − φ)² + (mean sin(x t))²``; statistic ``(err @ weights) · N``; mean over slices.
    LeJEPA itself is not installable here (not on PyPI), so this stands in for it."""
    x = np.asarray(z, dtype=np.float64) @ unit_columns(directions)  # x @ A with A /= A.norm(dim=0)
    t = np.linspace(0.0, t_max, n_points)
    dt = t_max / (n_points - 1)
    weights = np.full(n_points, 2 * dt)
    weights[[0, -1]] = dt
    phi = np.exp(-0.5 * t**2)
    weights = weights * phi
    x_t = x[:, :, None] * t  # (N, K, n_points)
    err = (np.cos(x_t).mean(axis=0) - phi) ** 2 + np.sin(x_t).mean(axis=0) ** 2
    return float(np.mean((err @ weights) * x.shape[0]))
