"""Independent float64 numpy/scipy references for the multi-view metrics, from the papers' definitions.

Deliberately computed differently from the library: LiDAR through the eigendecomposition of Σ_w
(the paper's Σ_w^{-1/2}), not a Cholesky factor; uniformity through scipy's pdist of all pairs.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist
from scipy.special import logsumexp


def lidar_ref(views: np.ndarray, delta: float = 1e-4, eps: float = 1e-8) -> float:
    z = np.asarray(views, dtype=np.float64)
    n, q, d = z.shape
    class_means = z.mean(axis=1)
    grand_mean = class_means.mean(axis=0)
    between = sum(np.outer(m - grand_mean, m - grand_mean) for m in class_means) / (n - 1)
    within = np.zeros((d, d))
    for i in range(n):
        for j in range(q):
            r = z[i, j] - class_means[i]
            within += np.outer(r, r)
    within = within / (n * (q - 1)) + delta * np.eye(d)
    w, v = np.linalg.eigh(within)
    inv_sqrt = v @ np.diag(w**-0.5) @ v.T
    lam = np.clip(np.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt), 0.0, None)
    total = lam.sum()
    p = (lam / total if total > 0 else np.zeros_like(lam)) + eps
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(np.exp(-terms.sum()))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def alignment_ref(x: np.ndarray, y: np.ndarray, alpha: float = 2.0, normalize: bool = True) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if normalize:
        x, y = _unit_rows(x), _unit_rows(y)
    return float(np.mean(np.sqrt(((x - y) ** 2).sum(axis=1)) ** alpha))


def uniformity_ref(x: np.ndarray, t: float = 2.0, normalize: bool = True) -> float:
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = _unit_rows(x)
    exponents = -t * pdist(x, "sqeuclidean")  # the N(N-1)/2 pairs i < j
    # Near 0, logsumexp − log(#pairs) cancels to ~1e-15 absolute; log1p(mean(expm1)) does not.
    mean_expm1 = np.mean(np.expm1(exponents))
    if mean_expm1 > -0.5:
        return float(np.log1p(mean_expm1))
    return float(logsumexp(exponents) - np.log(len(exponents)))
