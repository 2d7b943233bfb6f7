"""Independent float64 references for the intrinsic-dimension estimators, written from the papers.

Distances come from ``scipy.spatial.distance.cdist`` (direct differences, full matrix) and a full
sort: the simplest correct kNN, nothing shared with reprmetrics' blocked routine. Inputs here are
non-degenerate; degenerate conventions are asserted directly in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist


def knn_distances_ref(x, k: int, reference=None, exclude_self: bool | None = None) -> np.ndarray:
    """Sorted distances to the k nearest neighbours, ``(N, k)``, float64."""
    x = np.asarray(x, dtype=np.float64)
    if reference is None:
        exclude_self = True if exclude_self is None else exclude_self
        dist = cdist(x, x)
        if exclude_self:
            np.fill_diagonal(dist, np.inf)
        return np.sort(dist, axis=1)[:, :k]
    dist = np.sort(cdist(x, np.asarray(reference, dtype=np.float64)), axis=1)
    if exclude_self:
        # drop the first match where it is the query's own copy (distance 0)
        return np.where(dist[:, :1] == 0, dist[:, 1 : k + 1], dist[:, :k])
    return dist[:, :k]


def lid_mle_ref(dist: np.ndarray) -> np.ndarray:
    """Amsaleg et al. 2015 / LDReg ``lid_mle`` without the 1e-4: −k / Σ_{i<k} log(r_i / r_k)."""
    k = dist.shape[1]
    return -k / np.sum(np.log(dist[:, :-1] / dist[:, -1:]), axis=1)


def lid_mom_ref(dist: np.ndarray) -> np.ndarray:
    """LDReg ``lid_mom_est``: m / (r_k − m), m the mean of r_1 … r_{k−1}."""
    m = dist[:, :-1].mean(axis=1)
    return m / (dist[:, -1] - m)


def lid_ref(x, k: int, estimator: str = "mle", reference=None, exclude_self=None) -> np.ndarray:
    dist = knn_distances_ref(x, k, reference, exclude_self)
    return lid_mle_ref(dist) if estimator == "mle" else lid_mom_ref(dist)


def twonn_ref(x, discard_fraction: float = 0.1) -> float:
    """Facco et al. 2017 with scikit-dimension's conventions (F_i = i/N, zero-intercept fit)."""
    dist = knn_distances_ref(x, 2)
    r1, r2 = dist[:, 0], dist[:, 1]
    mu = np.sort(r2[r1 > 0] / r1[r1 > 0])
    n_total = len(mu)
    n_keep = int(n_total * (1 - discard_fraction))
    log_mu = np.log(mu[:n_keep])
    target = -np.log(1 - np.arange(1, n_keep + 1) / n_total)
    slope, *_ = np.linalg.lstsq(log_mu[:, None], target, rcond=None)
    return float(slope[0])


def mle_ref(x, k: int = 20) -> float:
    """Levina & Bickel per point, (k−1)/Σ_j log(r_k/r_j); MacKay-Ghahramani harmonic pooling."""
    dist = knn_distances_ref(x, k)
    m = (k - 1) / np.sum(np.log(dist[:, -1:] / dist), axis=1)
    return float(1.0 / np.mean(1.0 / m))


def ldreg_ref_torch(x: torch.Tensor, reference: torch.Tensor | None, k: int, estimator: str) -> torch.Tensor:
    """LDReg's own recipe in float64 torch (cdist + full sort + formula), differentiable in x.

    With ``reference=None`` the reference is ``x.detach()`` and each point's own pair is set to +inf
    before the sort (LDReg drops column 0 of the sorted row; the sqrt of an exact 0 would put NaN in
    the gradient).
    """
    x = x.to(torch.float64)
    ref = (x if reference is None else reference).detach().to(torch.float64)
    squared = ((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    if reference is None:
        squared = squared.masked_fill(torch.eye(len(x), dtype=torch.bool), float("inf"))
    r = torch.sort(torch.sqrt(squared), dim=1).values[:, :k]
    if estimator == "mle":
        lid = -k / torch.log(r[:, :-1] / r[:, -1:]).sum(1)
    else:
        m = r[:, :-1].mean(1)
        lid = m / (r[:, -1] - m)
    return -torch.log(lid).abs().mean()
