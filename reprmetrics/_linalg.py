"""Numerical building blocks: streaming (centred) second moments and safe symmetric eigensolvers.

Accumulators are float64 by default. Measured on near-collapsed embeddings (rank 1 plus 1e-3 noise),
a float32 Gram matrix loses the small eigenvalues that collapse detection depends on: RankMe is off by
percents, while float64 stays within 1e-9 of an SVD reference (see ``tests/test_spectral.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# From this width the Gram update is split into column blocks and only the upper triangle is
# computed: fewer multiply-adds than a full ``x.T @ x``, still one GEMM per block. Measured on CPU
# (float64, 4,096 rows): blocks of D/4 (32..256 wide) take 0.69–0.83 of the full GEMM's time from
# D = 128 on; on GPUs, where small GEMMs are launch-bound, from D = 512 in blocks of 256.
_EPS64 = torch.finfo(torch.float64).eps
_BLOCKED_GRAM_MIN_FEATURES = {"cpu": 128}
_BLOCKED_GRAM_MIN_FEATURES_DEFAULT = 512


def _gram_block(d: int, device: torch.device) -> int:
    return min(256, max(32, d // 4)) if device.type == "cpu" else 256


def l2_normalize_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm. The one zero-row policy of the toolkit: a zero row has no direction
    and stays zero (as ``torch.nn.functional.normalize`` does), for every metric that normalises."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


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
    if d < _BLOCKED_GRAM_MIN_FEATURES.get(x.device.type, _BLOCKED_GRAM_MIN_FEATURES_DEFAULT):
        gram.addmm_(x.T, x)
        return
    block = _gram_block(d, x.device)
    for start in range(0, d, block):
        stop = min(start + block, d)
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


def gram_zero_tolerance(trace: float, num_samples: int, num_features: int, accumulate_eps: float = _EPS64) -> float:
    r"""Eigenvalues of an un-centred Gram matrix (ZᵀZ or ZZᵀ) at or below this are round-off of zeros.

    Forming an entry :math:`G_{ij} = \sum_t z_{ti} z_{tj}` over the m = N (or D) terms of the inner
    dimension rounds each product and partial sum; with rounding errors of random sign they grow as
    :math:`\sqrt m\,\varepsilon\,\lVert z_{\cdot i}\rVert \lVert z_{\cdot j}\rVert`, so the error matrix
    has norm about :math:`\sqrt m\,\varepsilon\,\operatorname{tr} G` (as :math:`\lVert |Z|^\top |Z| \rVert
    \le \lVert Z \rVert_F^2`). The symmetric eigensolver adds a backward error of about
    :math:`\sqrt k\,\varepsilon\,\lVert G \rVert` for a k×k matrix. By Weyl's inequality a zero eigenvalue
    then comes out anywhere in :math:`\pm(\sqrt N + \sqrt D)\,\varepsilon\,\operatorname{tr} G`, which is this
    tolerance (ε of the accumulator). Measured on exact rank-r input (r = 1..16, N, D up to 4,096), the
    spurious eigenvalues stay below a tenth of it; an eigenvalue this small is not resolved by the Gram
    route anyway, so zeroing it changes no result by more than its own error.
    """
    n, d = max(int(num_samples), 1), max(int(num_features), 1)
    return accumulate_eps * (n**0.5 + d**0.5) * max(float(trace), 0.0)


# ----------------------------------------------------------------------------------------------
# streaming centred moments
# ----------------------------------------------------------------------------------------------
#
# Packed state, one float64 tensor of shape (D + 3, D):
#   row 0, column 0   n, the number of rows seen (exact up to 2**53)
#   row 1             c, the shift: the first row seen (a point of the cloud; the mean after a merge)
#   row 2             S1 = Σ (x − c)
#   rows 3 .. D + 2   S2 = Σ (x − c)(x − c)ᵀ, upper triangle (diagonal included) valid only
# or, for per-feature variances only (``diagonal=True``), shape (4, D) with row 3 = Σ (x − c)² (for
# D = 1 the two layouts coincide). A 0-sized tensor, (0, 0) or (4, 0) for diagonal, stands for "no
# batch yet, width unknown" (the width is taken from the first batch); stacked, they stay 3-D.

_COUNT, _SHIFT, _FIRST, _SECOND = 0, 1, 2, 3


def centred_moments_state(
    num_features: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    diagonal: bool = False,
) -> Tensor:
    """Empty packed centred-moments state: ``(D + 3, D)`` zeros, or ``(0, 0)`` when D is not known yet.

    ``diagonal=True`` keeps only the per-feature sums of squares (shape ``(4, D)``, O(D) memory and
    work): for variances and standard deviations. Use it as the default of a Metric state with
    ``dist_reduce_fx=merge_centred_moments``.
    """
    d = num_features or 0
    if diagonal:
        return torch.zeros(4, d, dtype=dtype, device=device)
    if d == 0:
        return torch.zeros(0, 0, dtype=dtype, device=device)
    return torch.zeros(d + 3, d, dtype=dtype, device=device)


def _is_diagonal(state: Tensor) -> bool:
    return state.ndim == 2 and state.shape[0] == 4 and state.shape[1] != 1


def centred_moments_update_(state: Tensor, x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Add the rows of ``x`` (B, D) to a packed state; returns the state (a new tensor if it was 0-sized).

    In place when the state is already shaped, so use it as ``self.m = centred_moments_update_(self.m, x)``.
    ``x`` is converted to the state's dtype and device. The first row fixes the shift c; every batch
    then costs one GEMM (x − c)ᵀ(x − c). Because c is a point of the cloud, the sums are at the scale
    of the spread, never of the offset: nothing cancels later.

    ``weights``: optional (B,) 0/1 tensor; rows with weight 0 add nothing and must be zero (e.g.
    non-finite rows set to 0 by the caller). The count stays a device tensor: no host sync.
    """
    if x.ndim != 2:
        raise ValueError(f"centred_moments_update_: `x` must be (B, D), got shape {tuple(x.shape)}")
    d = x.shape[1]
    diagonal = _is_diagonal(state)
    if state.numel() == 0:
        state = torch.zeros(4 if diagonal else d + 3, d, dtype=state.dtype, device=state.device)
        diagonal = diagonal and d != 1
    elif state.shape[1] != d:
        raise ValueError(f"centred_moments_update_: state is for {state.shape[1]} features, `x` has {d}")
    if x.shape[0] == 0:
        return state
    x = x.to(device=state.device, dtype=state.dtype)
    if weights is None:
        added: Tensor | int = x.shape[0]
        anchor = x[0]
        is_first = state[_COUNT, 0] == 0
    else:
        w = weights.to(device=state.device, dtype=state.dtype)
        added = w.sum()
        anchor = x.index_select(0, torch.argmax(w).reshape(1))[0]  # the first row that counts
        is_first = (state[_COUNT, 0] == 0) & (added > 0)
    # The first row that counts sets the shift: a point of the cloud, so every later difference is at
    # the scale of the spread. torch.where avoids a host sync on the count.
    state[_SHIFT] = torch.where(is_first, anchor, state[_SHIFT])
    # x − c, with rows of weight 0 kept at zero: x − w cᵀ in one pass (those rows of x are zero).
    centred = x - state[_SHIFT] if weights is None else torch.addr(x, w, state[_SHIFT], alpha=-1)
    state[_FIRST] += centred.sum(dim=0)
    if diagonal:
        state[_SECOND] += centred.square().sum(dim=0)
    else:
        add_gram_(state[_SECOND:], centred)
    state[_COUNT, 0] += added
    return state


def merge_centred_moments(parts: Tensor) -> Tensor:
    r"""Exact merge of stacked packed states ``(P, D + 3, D)`` into one ``(D + 3, D)``: a ``dist_reduce_fx``.

    torchmetrics calls it on the states of all ranks stacked (and on ``[accumulated, batch]`` in
    ``forward()``), so every rank gets the identical result and a sync moves O(D²) numbers. Parts with
    n = 0 are ignored. With :math:`m_i = (c_i - c_0) + S_{1,i}/n_i` the mean of part i relative to
    the shift :math:`c_0` of the first non-empty part (the difference of two shifts inside the same
    cloud is exact in float64), this is Chan, Golub & LeVeque's pairwise update:

    .. math::
        n = \sum_i n_i, \quad \bar m = \frac{1}{n}\sum_i n_i m_i, \quad
        M_2 = \sum_i \Big(S_{2,i} - \frac{S_{1,i} S_{1,i}^\top}{n_i}\Big)
              + \sum_i n_i (m_i - \bar m)(m_i - \bar m)^\top,

    stored back as ``n``, shift :math:`c = \mathrm{fl}(c_0 + \bar m)` (the mean, rounded), and the
    rounding residual :math:`r = \bar m - (c - c_0)` as :math:`S_1 = n r`,
    :math:`S_2 = M_2 + n r r^\top`, so that the state describes the exact mean and :math:`M_2`.
    Every subtraction is at the scale of the spread, so no digit is lost to the offset.
    """
    if parts.numel() == 0:  # no part has seen a batch: the width is still unknown everywhere
        return parts[0] if parts.ndim == 3 else parts
    if parts.ndim == 2:  # a single state (torchmetrics may hand one over when nothing was stacked)
        return parts
    if parts.ndim != 3 or parts.shape[0] == 0:
        raise ValueError(
            f"merge_centred_moments: expected stacked states (P, D + 3, D), got shape {tuple(parts.shape)}"
        )
    counts = parts[:, _COUNT, 0]
    nonempty = (counts > 0).nonzero().flatten()
    if nonempty.numel() == 0:
        return parts[0].clone()
    if nonempty.numel() == 1:
        return parts[int(nonempty[0])].clone()
    live = parts[nonempty]
    n_i = live[:, _COUNT, 0]
    n = n_i.sum()
    c0 = live[0, _SHIFT]
    m_i = (live[:, _SHIFT] - c0) + live[:, _FIRST] / n_i[:, None]
    m = (n_i[:, None] * m_i).sum(dim=0) / n
    dev = (m_i - m) * n_i[:, None].sqrt()
    first = live[:, _FIRST] / n_i[:, None].sqrt()
    # Σ S2_i − Σ S1_i S1_iᵀ / n_i + Σ n_i (m_i − m)(m_i − m)ᵀ: two small GEMMs over the P parts.
    if _is_diagonal(parts[0]):
        second = live[:, _SECOND].sum(dim=0) - first.square().sum(dim=0) + dev.square().sum(dim=0)
    else:
        second = live[:, _SECOND:].sum(dim=0) - first.T @ first + dev.T @ dev
    # The new shift c0 + m is rounded at the offset's scale; the residual r (exact to the spread's
    # scale, as shift − c0 is an exact difference) goes into S1 so that shift + S1/n is the mean and
    # S2 − S1 S1ᵀ/n is M2 to full precision: otherwise a later merge would see the mean off by
    # ε·|offset| and err to first order in it.
    shift = c0 + m
    residual = m - (shift - c0)
    out = torch.zeros_like(parts[0])
    out[_COUNT, 0] = n
    out[_SHIFT] = shift
    out[_FIRST] = n * residual
    if _is_diagonal(parts[0]):
        out[_SECOND] = second + n * residual.square()
    else:
        out[_SECOND:] = second + n * torch.outer(residual, residual)
    return out


def centred_moments(state: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(n, mean, scatter)`` of a packed state: scatter = Σ (x − mean)(x − mean)ᵀ, upper triangle valid.

    For a diagonal state the scatter is the ``(D,)`` vector Σ (x − mean)². Divide by n − 1 for the
    unbiased (co)variance. A shaped state with n = 0 gives ``(0, shift, zeros)``.
    """
    if state.numel() == 0:
        raise ValueError("centred_moments: the state is empty (no batch seen, width unknown)")
    n = int(state[_COUNT, 0])
    first = state[_FIRST]
    if _is_diagonal(state):
        if n == 0:
            return 0, state[_SHIFT].clone(), torch.zeros_like(first)
        return n, state[_SHIFT] + first / n, state[_SECOND] - first.square() / n
    if n == 0:
        d = state.shape[1]
        return 0, state[_SHIFT].clone(), torch.zeros(d, d, dtype=state.dtype, device=state.device)
    mean = state[_SHIFT] + first / n
    scatter = state[_SECOND:] - torch.outer(first, first) / n
    return n, mean, scatter


def centred_moments_count(state: Tensor) -> int:
    """Rows accumulated in a packed state (0 for an empty one)."""
    return 0 if state.numel() == 0 else int(state[_COUNT, 0])


def centred_moments_of(x: Tensor, dtype: torch.dtype = torch.float64, diagonal: bool = False) -> Tensor:
    """Packed state of the rows of ``x`` in one go (the functional twin of streaming ``x``)."""
    return centred_moments_update_(
        centred_moments_state(x.shape[1], dtype=dtype, device=x.device, diagonal=diagonal), x
    )


def nonzero_eigenvalue_tolerance(
    eigenvalues: Tensor, num_samples: int, num_features: int, input_eps: float, offset_mean_square: float = 0.0
) -> float:
    r"""Covariance eigenvalues (scatter / (N − 1)) at or below this are zero: the larger of two bounds.

    ``eigenvalues`` are those of the centred covariance; ``offset_mean_square`` is ‖mean‖² / D, the
    mean square of the offset the centring removed.

    - **Input precision.** The embeddings were rounded to their dtype before we saw them: each entry
      carries an error of up to ``input_eps`` × its magnitude, rms
      :math:`s = \varepsilon_{in}\sqrt{\overline{z_c^2} + \lVert\mu\rVert^2/D}` — the centred spread
      and, since float32 rounds the *un-centred* value, the offset (ε₃₂·|offset| per entry is noise
      float32 already put in the data; no centring can remove it). An N×D matrix of such errors has
      singular values up to about :math:`s(\sqrt N + \sqrt D)`, and by Weyl's inequality a zero
      singular value of the centred data moves by at most that much, so eigenvalues up to
      :math:`(10\,s(\sqrt N + \sqrt D))^2/(N-1)` (a factor 10 of margin) are not signal. Float32
      embeddings of rank r are full-rank noise beyond r; this bound gives them rank r.
    - **Float64 round-off of the centred products.** The state holds Σ(x − c)(x − c)ᵀ about a shift c
      inside the cloud, so forming it, the exact merges and the eigensolver each err by about
      (N + D)·ε₆₄ times the *centred* scale, which the trace :math:`\sum_k \lambda_k` bounds.
      The offset does not enter: that is what the shifted accumulation buys.

    The centred mean square per entry is :math:`\overline{z_c^2} = \frac{N-1}{ND}\sum_k\lambda_k`.
    For float64 input at offsets up to 1e8 × the spread both bounds stay far below the spectrum of
    real embeddings; see the README for the measured accuracy.
    """
    trace = float(eigenvalues.clamp_min(0).sum()) if eigenvalues.numel() else 0.0
    return zero_eigenvalue_tolerance(trace, num_samples, num_features, input_eps, offset_mean_square)


def zero_eigenvalue_tolerance(
    trace: float, num_samples: int, num_features: int, input_eps: float, offset_mean_square: float = 0.0
) -> float:
    """:func:`nonzero_eigenvalue_tolerance` from the covariance's trace instead of its eigenvalues."""
    n, d = max(int(num_samples), 1), max(int(num_features), 1)
    centred_mean_square = trace * max(n - 1, 1) / (n * d)
    round_off = trace * (n + d) * torch.finfo(torch.float64).eps
    noise_sigma = 10.0 * input_eps * (centred_mean_square + max(offset_mean_square, 0.0)) ** 0.5 * (n**0.5 + d**0.5)
    return max(round_off, noise_sigma**2 / max(n - 1, 1))
