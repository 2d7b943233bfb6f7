"""Numerical building blocks: streaming second moments and safe symmetric eigensolvers.

Accumulators are float64 by default. Measured on near-collapsed embeddings (rank 1 plus 1e-3 noise),
a float32 Gram matrix loses the small eigenvalues that collapse detection depends on: RankMe is off by
percents, while float64 stays within 1e-9 of an SVD reference (see ``tests/test_spectral.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# Above this width the Gram update is split into column blocks and only the upper triangle is
# computed: about half the multiply-adds of a full ``x.T @ x``, still one GEMM per block.
_BLOCKED_GRAM_MIN_FEATURES = 512
_GRAM_BLOCK = 256


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Run the enclosed computation at full precision even inside an autocast region."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def add_gram_(gram: Tensor, x: Tensor) -> None:
    """Add ``x.T @ x`` into ``gram`` in place; only the upper triangle of ``gram`` is kept valid.

    ``x`` must already have ``gram``'s dtype. :func:`eigvalsh_descending` reads only the upper
    triangle; :func:`symmetric_from_upper` gives the full matrix where one is needed.
    """
    d = x.shape[1]
    if d < _BLOCKED_GRAM_MIN_FEATURES:
        gram.addmm_(x.T, x)
        return
    for start in range(0, d, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, d)
        gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])


def symmetric_from_upper(upper: Tensor) -> Tensor:
    """Full symmetric matrix from one whose upper triangle (diagonal included) holds the values."""
    triu = torch.triu(upper)
    return triu + torch.triu(upper, diagonal=1).T


def gram_upper(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``x.T @ x`` in ``dtype``, valid in the upper triangle (diagonal included) only."""
    x = x.to(dtype)
    out = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    add_gram_(out, x)
    return out


def eigvalsh_descending(upper: Tensor) -> Tensor:
    """Eigenvalues of the symmetric PSD matrix held in the upper triangle of ``upper``, descending, ≥ 0.

    Reading one triangle saves the D×D copies of symmetrising. Tiny negative values are round-off of
    true zeros. If LAPACK fails to converge (it can on badly scaled input), the singular values, which
    equal the eigenvalues of a PSD matrix, are used instead.
    """
    try:
        values = torch.linalg.eigvalsh(upper, UPLO="U")
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        values = torch.linalg.svdvals(symmetric_from_upper(upper))
    return torch.sort(values, descending=True).values.clamp_min(0)


def nonzero_eigenvalue_tolerance(
    eigenvalues: Tensor,
    mean_square: float,
    num_samples: int,
    num_features: int,
    input_eps: float,
) -> float:
    """Covariance eigenvalues (divided by N − 1) at or below this are zero; the stricter of two rules.

    - Input precision: rounding ``Z`` to its dtype adds noise of about ``input_eps`` × rms(Z) per entry,
      whose singular values reach about that × (√N + √D); ten times that is not signal. Float32
      embeddings of rank r are full-rank noise beyond r; this rule gives them rank r.
    - Float64 round-off of forming the matrix: about (N + D)·eps64 times its largest entry scale,
      the larger of λ₁ and the un-centred trace.

    ``mean_square`` is the mean of the squared *un-centred* entries, which sets both round-offs even
    when centring later removes a large offset.
    """
    n, d = num_samples, num_features
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    uncentred_scale = mean_square * n * d / max(n - 1, 1)  # trace of the un-centred ZᵀZ / (N − 1)
    round_off = max(top, uncentred_scale) * (n + d) * torch.finfo(torch.float64).eps
    noise_sigma = 10.0 * input_eps * mean_square**0.5 * (n**0.5 + d**0.5)
    return max(round_off, noise_sigma**2 / max(n - 1, 1))
