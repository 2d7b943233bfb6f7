"""Independent float64 numpy references for CKA (Kornblith et al. 2019; Song et al. 2012; Nguyen et al. 2021).

Written from the papers' formulas, deliberately differently from the implementation: explicit centring
matrices H, the trace form of HSIC, Song et al.'s unbiased estimator term by term, pairwise distances
from explicit differences.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def centre_columns(x):
    x = _f64(x)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka_ref(x, y):
    """‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F), centring in float64 first."""
    xc, yc = centre_columns(x), centre_columns(y)
    return np.linalg.norm(xc.T @ yc, "fro") ** 2 / (np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro"))


def gram_linear_ref(x):
    x = _f64(x)
    return x @ x.T


def squared_distances_ref(x):
    x = _f64(x)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijd,ijd->ij", diff, diff)


def gram_rbf_ref(x, sigma):
    """exp(−‖a − b‖² / (2σ²)), σ² = sigma² × np.median over every entry of the N×N squared distances."""
    sq = squared_distances_ref(x)
    return np.exp(-sq / (2.0 * sigma**2 * np.median(sq)))


def gram_ref(x, kernel, sigma):
    return gram_linear_ref(x) if kernel == "linear" else gram_rbf_ref(x, sigma)


def hsic_biased_ref(k, l_):
    """tr(K H L H) / (n − 1)²."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l_ @ h) / (n - 1) ** 2


def hsic_unbiased_ref(k, l_):
    """Song et al. (JMLR 2012), eq. (5), term by term, with the diagonals of K and L set to 0."""
    n = k.shape[0]
    kt, lt = _f64(k).copy(), _f64(l_).copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones = np.ones(n)
    first = np.trace(kt @ lt)
    second = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    third = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return (first + second - third) / (n * (n - 3))


def cka_ref(x, y, kernel="linear", sigma=1.0, debiased=False):
    k, l_ = gram_ref(x, kernel, sigma), gram_ref(y, kernel, sigma)
    hsic = hsic_unbiased_ref if debiased else hsic_biased_ref
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def minibatch_cka_ref(xs, ys, kernel="linear", sigma=1.0):
    """Nguyen et al. 2021: Σ_b HSIC₁(K_b, L_b) / √(Σ_b HSIC₁(K_b, K_b) Σ_b HSIC₁(L_b, L_b))."""
    kl = kk = ll = 0.0
    for x, y in zip(xs, ys):
        k, l_ = gram_ref(x, kernel, sigma), gram_ref(y, kernel, sigma)
        kl += hsic_unbiased_ref(k, l_)
        kk += hsic_unbiased_ref(k, k)
        ll += hsic_unbiased_ref(l_, l_)
    return kl / np.sqrt(kk * ll)
