"""Independent float64 numpy references, written from the papers' definitions."""

from __future__ import annotations

import numpy as np


def rankme_ref(z: np.ndarray, eps: float = 1e-7) -> float:
    sigma = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = sigma / sigma.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def covariance_eigenvalues_ref(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    return np.sort(np.linalg.eigvalsh(cov))[::-1]


def alpha_req_ref(z: np.ndarray, fit_range=(11, 100), input_eps: float | None = None) -> float:
    """``input_eps``: machine epsilon of the embeddings' original dtype (rank is decided at it)."""
    eps = np.finfo(np.asarray(z).dtype).eps if input_eps is None else input_eps
    z = np.asarray(z, dtype=np.float64)
    lam = covariance_eigenvalues_ref(z)
    centred = z - z.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    n, d = z.shape
    # Rank at the input's precision: rounding noise has singular values ~ eps·rms(z)·(√N + √D).
    noise = 10 * eps * np.sqrt(np.mean(z**2)) * (np.sqrt(n) + np.sqrt(d))
    rank = int(np.sum(sv > max(noise, sv[0] * max(z.shape) * np.finfo(np.float64).eps)))
    first, last = fit_range[0], min(fit_range[1], rank)
    k = np.arange(first, last + 1, dtype=np.float64)
    # np.polyfit weights multiply residuals, so sqrt(1/k) weights the squared residuals by 1/k.
    slope, _ = np.polyfit(np.log(k), np.log(lam[first - 1 : last]), 1, w=np.sqrt(1.0 / k))
    return float(-slope)
