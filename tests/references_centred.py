"""Data with an exactly known covariance spectrum, and float64 references that centre before any product."""

from __future__ import annotations

import numpy as np
import torch
from references_multiview import lidar_ref  # noqa: F401  (re-exported for the centred tests)


def exact_power_law(n: int, d: int, alpha: float, offset: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Z = μ + U diag(s) Vᵀ with exactly centred orthonormal U (N×D), orthonormal V and covariance
    eigenvalues λ_k = k^-α (so α-ReQ is exactly ``alpha``); μ has entries of ``offset`` × the spread.

    The spread is the rms of the centred entries, √(Σλ / D); the offset entries are ±(0.5..1.5) × offset × spread.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    u, _ = np.linalg.qr(g - g.mean(axis=0))  # columns orthogonal to the all-ones vector
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    centred = (u * np.sqrt(lam * (n - 1))) @ v.T
    spread = np.sqrt(lam.sum() / d)
    mu = offset * spread * rng.uniform(0.5, 1.5, d) * rng.choice([-1.0, 1.0], d)
    return torch.from_numpy(centred + mu).to(dtype)


def centred_covariance_eigenvalues_ref(z) -> np.ndarray:
    """Covariance eigenvalues, descending: centre in float64 first, then one product."""
    z = np.asarray(z, dtype=np.float64)
    zc = z - z.mean(axis=0)
    sv = np.linalg.svd(zc, compute_uv=False)
    return sv**2 / (len(z) - 1)


def alpha_req_centred_ref(z, fit_range=(11, 100)) -> tuple[float, float]:
    """(α, weighted R²) of the 1/k-weighted log-log fit over the whole fit range (no rank cut)."""
    lam = centred_covariance_eigenvalues_ref(z)
    first, last = fit_range
    k = np.arange(first, last + 1, dtype=np.float64)
    x, y, w = np.log(k), np.log(lam[first - 1 : last]), 1.0 / k
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    resid = np.sum(w * (y - (slope * x + intercept)) ** 2)
    total = np.sum(w * (y - np.sum(w * y) / np.sum(w)) ** 2)
    return float(-slope), float(1 - resid / total)


def normalized_std_ref(z) -> float:
    z = np.asarray(z, dtype=np.float64)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.mean(np.std(zn, axis=0, ddof=1)))


def views_at_offset(
    n: int, q: int, d: int, offset: float, within: float = 0.3, seed: int = 0, dtype=torch.float64
) -> torch.Tensor:
    """(n, q, d) views: sample means with a decaying spectrum (spread ≈ 1 per entry scale), within-sample
    noise of relative size ``within``, all shifted by entries of ± (0.5..1.5) × ``offset`` × the spread."""
    rng = np.random.default_rng(seed)
    means = exact_power_law(n, d, 1.0, 0.0, seed=seed).numpy()
    spread = np.sqrt(np.mean(means**2))
    noise = within * spread * rng.standard_normal((n, q, d)) * np.linspace(1.0, 0.2, d)
    mu = offset * spread * rng.uniform(0.5, 1.5, d) * rng.choice([-1.0, 1.0], d)
    return torch.from_numpy(means[:, None, :] + noise + mu).to(dtype)
