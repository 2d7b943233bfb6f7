"""Synthetic embeddings shared by the tests: the cases the issues ask every metric to be checked on."""

from __future__ import annotations

import torch


def gaussian(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def rank_deficient(n: int, d: int, rank: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    ).to(dtype)


def offset(n: int, d: int, shift: float = 1e3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return (gaussian(n, d, seed) + shift).to(dtype)


def near_collapsed(n: int, d: int, noise: float = 1e-3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64) @ direction
    return (z + noise * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def decaying(n: int, d: int, alpha: float = 1.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Gaussian embeddings whose covariance eigenvalues decay as k^-alpha, randomly rotated."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-alpha / 2)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ q.T).to(dtype)


#: The spectral tests' inputs by name, each built in the dtype asked for: full rank both ways of N vs D,
#: rank-deficient, a large common offset, near collapse, and a decaying spectrum.
SPECTRAL_CASES = {
    "gaussian_n_gt_d": lambda dt: gaussian(600, 64, dtype=dt),
    "gaussian_n_lt_d": lambda dt: gaussian(50, 120, dtype=dt),
    "rank_deficient": lambda dt: rank_deficient(500, 64, rank=30, dtype=dt),
    "large_offset": lambda dt: offset(500, 64, shift=1e3, dtype=dt),
    "near_collapsed": lambda dt: near_collapsed(500, 64, noise=1e-3, dtype=dt),
    "decaying": lambda dt: decaying(2000, 128, alpha=1.3, dtype=dt),
}
