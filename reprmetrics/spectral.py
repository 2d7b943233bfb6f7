r"""Streaming spectral metrics: :class:`RankMe` and :class:`AlphaReQ`.

Both keep sufficient statistics of the embeddings, not the embeddings. RankMe's definition is
un-centred, so it keeps the Gram matrix ZᵀZ (D×D), Σz and N, sum-reduced. α-ReQ is centred, so it
keeps shifted moments (N, a shift c, Σ(z − c), Σ(z − c)(z − c)ᵀ in one packed tensor, see
:func:`reprmetrics._linalg.centred_moments_update_`) merged exactly across batches and ranks: an
offset far larger than the spread does not cancel. Memory is O(D²) whatever the number of samples,
a DDP sync moves O(D²) numbers, and every rank computes the same value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._base import ReprMetric
from reprmetrics._linalg import (
    add_gram_,
    centred_moments,
    centred_moments_count,
    centred_moments_state,
    centred_moments_update_,
    eigvalsh_descending,
    merge_centred_moments,
    no_autocast,
)
from reprmetrics._validation import check_nonnegative_float, check_positive_int, check_tensor
from reprmetrics.functional.spectral import (
    _check_fit_range,
    _covariance_from_moments,
    _covariance_spectrum_from_state,
    _power_law_fit,
    _rankme_from_singular_values,
    _singular_values_from_gram,
)

__all__ = ["AlphaReQ", "RankMe"]


class _SecondMoments(ReprMetric):
    """Base class: streams ZᵀZ, Σz and N of ``(B, D)`` batches in ``accumulate_dtype``.

    ``num_features`` may be given up front; otherwise the states take their shape from the first
    batch (every DDP rank must then see at least one batch before ``compute()``).
    """

    _min_samples = 1

    gram: Tensor
    total: Tensor
    num_samples: Tensor

    def __init__(
        self,
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if num_features is not None:
            check_positive_int(num_features, name, "num_features")
        if accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: `accumulate_dtype` must be torch.float32 or torch.float64, got {accumulate_dtype}")
        self.accumulate_dtype = accumulate_dtype
        d = num_features or 0
        self.add_state("gram", torch.zeros(d, d, dtype=accumulate_dtype), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(d, dtype=accumulate_dtype), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # Machine epsilon of the coarsest input seen: what counts as a zero eigenvalue depends on it.
        self.add_state("input_eps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def _check_batch(self, embeddings: Tensor) -> Tensor:
        known = self.gram.shape[0] if self.gram.numel() else None
        return check_tensor(embeddings, type(self).__name__, min_rows=1, features=known)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        known = self.gram.shape[0] if self.gram.numel() else None
        z = self._check_batch(embeddings)
        with no_autocast(z.device):
            if known is None:
                d = z.shape[1]
                self.gram = torch.zeros(d, d, dtype=self.gram.dtype, device=self.gram.device)
                self.total = torch.zeros(d, dtype=self.total.dtype, device=self.total.device)
            input_eps = torch.finfo(z.dtype).eps
            z = z.to(device=self.gram.device, dtype=self.gram.dtype)
            add_gram_(self.gram, z)
            self.total += z.sum(dim=0)
            self.num_samples += z.shape[0]
            self.input_eps.clamp_(min=input_eps)

    def _checked_moments(self) -> tuple[Tensor, Tensor, int]:
        n = int(self.num_samples)
        name = type(self).__name__
        if n == 0 or self.gram.numel() == 0:
            raise ValueError(f"{name}: compute() called before any update() (no embeddings seen)")
        if n < self._min_samples:
            raise ValueError(f"{name}: needs at least {self._min_samples} samples, got {n}")
        # Upper triangle valid only (see add_gram_); the eigensolver reads just that triangle.
        return self.gram.to(torch.float64), self.total.to(torch.float64), n

    def singular_values(self) -> Tensor:
        """Singular values of the un-centred matrix of all embeddings seen (synced across ranks), descending."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            gram, _, n = self._checked_moments()
            with no_autocast(gram.device):
                return _singular_values_from_gram(gram, n)

    def covariance_eigenvalues(self) -> Tensor:
        """Eigenvalues of the covariance of all embeddings seen (synced across ranks), descending."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            gram, total, n = self._checked_moments()
            if n < 2:
                raise ValueError(f"{type(self).__name__}: the covariance needs at least 2 samples, got {n}")
            with no_autocast(gram.device):
                return eigvalsh_descending(_covariance_from_moments(gram, total, n))[: min(n - 1, gram.shape[0])]

class RankMe(_SecondMoments):
    r"""RankMe (Garrido et al., ICML 2023), streamed over batches.

    .. math::
        p_k = \frac{\sigma_k}{\sum_i \sigma_i} + \varepsilon, \qquad
        \operatorname{RankMe} = \exp\Big(-\sum_{k=1}^{\min(N,D)} p_k \log p_k\Big)

    with :math:`\sigma_k` the singular values of the un-centred matrix of all embeddings seen, taken
    as square roots of the eigenvalues of the accumulated ZᵀZ. Equals
    :func:`reprmetrics.functional.rankme` on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor (any precision; upcast).

    As output of ``compute``:
        - a scalar float32 tensor in ``[1, min(N, D)]``; higher is better (1 = complete collapse).

    Args:
        eps: added to each normalised singular value (the paper's 1e-7; 0 gives Roy & Vetterli's
            effective rank).
        num_features: D, if known up front (otherwise taken from the first batch).
        accumulate_dtype: dtype of the Gram accumulator. float64 (default) keeps RankMe of
            near-collapsed embeddings within 1e-9 of an SVD; float32 is faster on GPUs with slow
            float64 but loses small singular values.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import RankMe
        >>> metric = RankMe()
        >>> basis = torch.randn(8, 64)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(256, 8) @ basis)   # embeddings span 8 directions
        >>> 1.0 < metric.compute().item() <= 8.0
        True
    """

    higher_is_better = True
    plot_lower_bound = 1.0

    def __init__(
        self,
        eps: float = 1e-7,
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features=num_features, accumulate_dtype=accumulate_dtype, **kwargs)
        self.eps = check_nonnegative_float(eps, "RankMe", "eps")

    def compute(self) -> Tensor:
        """RankMe of everything seen so far."""
        gram, _, n = self._checked_moments()
        with no_autocast(gram.device):
            value = _rankme_from_singular_values(_singular_values_from_gram(gram, n), self.eps)
        return value.to(torch.get_default_dtype())


class _CentredSecondMoments(ReprMetric):
    """Base class: streams the packed centred moments of ``(B, D)`` batches (float64).

    ``num_features`` may be given up front; otherwise the state takes its shape from the first batch
    (every DDP rank must then see at least one batch before ``compute()``).
    """

    _min_samples = 2

    moments: Tensor
    input_eps: Tensor

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_features is not None:
            check_positive_int(num_features, type(self).__name__, "num_features")
        self.add_state("moments", centred_moments_state(num_features), dist_reduce_fx=merge_centred_moments)
        # Machine epsilon of the coarsest input seen: what counts as a zero eigenvalue depends on it.
        self.add_state("input_eps", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def _known_features(self) -> int | None:
        return self.moments.shape[1] if self.moments.numel() else None

    def _check_batch(self, embeddings: Tensor) -> Tensor:
        return check_tensor(embeddings, type(self).__name__, min_rows=1, features=self._known_features())

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        z = self._check_batch(embeddings)
        with no_autocast(z.device):
            self.moments = centred_moments_update_(self.moments, z)
            self.input_eps.clamp_(min=torch.finfo(z.dtype).eps)

    def _checked_state(self) -> tuple[Tensor, int]:
        n = centred_moments_count(self.moments)
        name = type(self).__name__
        if n == 0:
            raise ValueError(f"{name}: compute() called before any update() (no embeddings seen)")
        if n < self._min_samples:
            raise ValueError(f"{name}: needs at least {self._min_samples} samples, got {n}")
        return self.moments, n

    def _spectrum(self) -> tuple[Tensor, float]:
        state, _ = self._checked_state()
        with no_autocast(state.device):
            lam, tol, _ = _covariance_spectrum_from_state(state, float(self.input_eps))
        return lam, tol

    def covariance_eigenvalues(self) -> Tensor:
        """Eigenvalues of the covariance of all embeddings seen (synced across ranks), descending, ``min(N, D)``."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self._spectrum()[0]

    def singular_values(self) -> Tensor:
        """Singular values of the un-centred matrix of all embeddings seen (synced), from scatter + N·μμᵀ."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            state, n = self._checked_state()
            with no_autocast(state.device):
                _, mean, scatter = centred_moments(state)
                return _singular_values_from_gram(scatter + n * torch.outer(mean, mean), n)


class AlphaReQ(_CentredSecondMoments):
    r"""α-ReQ (Agrawal et al., NeurIPS 2022), streamed over batches.

    With :math:`\lambda_1 \ge \lambda_2 \ge \dots` the eigenvalues of the covariance of all embeddings
    seen, α is :math:`b_0` of the weighted least-squares fit

    .. math::
        \log \lambda_k \approx -b_0 \log k + b_1, \qquad k \in [k_{lo}, k_{hi}],\ \text{weights } 1/k.

    The covariance comes from shifted moments (the first batch's mean as shift, merged exactly across
    batches and ranks with Chan et al.'s pairwise update), so a common offset does not cancel: at
    offsets up to 1e8 × the spread (float64 input) α stays within 1e-6 of a reference that centres
    before any product. Eigenvalues at the input's rounding noise or float64 round-off are zero (see
    :func:`reprmetrics._linalg.nonzero_eigenvalue_tolerance`); the fit range ends at the last non-zero
    one. Equals :func:`reprmetrics.functional.alpha_req` on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor.

    As output of ``compute``:
        - a scalar float32 tensor, α. Around 1 is best in the paper; α ≪ 1 is a flat, noisy
          spectrum, α ≫ 1 a few dominant directions (towards collapse). Neither direction is simply
          better, so ``higher_is_better`` is ``None``. :meth:`spectrum_fit` adds the fit's R².

    Args:
        fit_range: 1-indexed inclusive ranks ``(first, last)``; the end is clipped to the non-zero
            eigenvalues, and fewer than 3 ranks left raise ``ValueError`` at compute.
        num_features: D, if known up front (otherwise taken from the first batch).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import AlphaReQ
        >>> metric = AlphaReQ()
        >>> scale = torch.arange(1, 129, dtype=torch.float64).pow(-0.5)   # λ_k ∝ k^-1
        >>> for _ in range(8):
        ...     metric.update(torch.randn(512, 128, dtype=torch.float64) * scale)
        >>> round(metric.compute().item(), 1)
        1.0
    """

    higher_is_better = None

    def __init__(
        self,
        fit_range: tuple[int, int] = (11, 100),
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        if accumulate_dtype != torch.float64:
            raise ValueError(
                f"AlphaReQ: `accumulate_dtype` must be torch.float64 (the centred moments are float64), got {accumulate_dtype}"
            )
        super().__init__(num_features=num_features, **kwargs)
        self.accumulate_dtype = accumulate_dtype
        self.fit_range = _check_fit_range(fit_range, "AlphaReQ")

    def _fit(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
        lam, tol = self._spectrum()
        with no_autocast(lam.device):
            slope, intercept, r2, first, last = _power_law_fit(lam, self.fit_range, tol, "AlphaReQ")
        return lam, slope, intercept, r2, first, last

    def compute(self) -> Tensor:
        """α of everything seen so far."""
        _, slope, _, _, _, _ = self._fit()
        return (-slope).to(torch.get_default_dtype())

    def spectrum_fit(self) -> dict[str, Any]:
        """The covariance eigenvalues and the α-ReQ fit, synced across ranks, for plotting and diagnostics.

        Returns ``{"eigenvalues", "alpha", "intercept", "r2", "first", "last"}``: the fitted line is
        ``log λ_k = −alpha·log k + intercept`` for ranks ``first..last``; ``r2`` is its 1/k-weighted
        R² in log-log space (near 1: the spectrum is a power law there and α describes it; much
        lower: α is a poor summary).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            lam, slope, intercept, r2, first, last = self._fit()
        return {
            "eigenvalues": lam,
            "alpha": float(-slope),
            "intercept": float(intercept),
            "r2": float(r2),
            "first": first,
            "last": last,
        }
