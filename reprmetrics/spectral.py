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
from reprmetrics._linalg import l2_normalize_rows
from reprmetrics.functional.spectral import (
    _check_coding_rate_eps,
    _check_fit_range,
    _coding_rate_from_gram,
    _covariance_from_moments,
    _covariance_spectrum_from_state,
    _nesum_from_state,
    _power_law_fit,
    _rankme_from_singular_values,
    _singular_values_from_gram,
    _spectrum_diagnostics,
)

__all__ = ["AlphaReQ", "CodingRate", "NESum", "RankMe"]


class _SecondMoments(ReprMetric):
    """Base class: streams ZᵀZ, Σz and N of ``(B, D)`` batches in ``accumulate_dtype``.

    ``num_features`` may be given up front; otherwise the states take their shape from the first
    batch (every DDP rank must then see at least one batch before ``compute()``).
    """

    _min_samples = 1
    dense_states = 1

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
        return check_tensor(embeddings, type(self).__name__, min_rows=0, features=known)

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

    def _singular_values(self) -> Tensor:
        gram, _, n = self._checked_moments()
        with no_autocast(gram.device):
            return _singular_values_from_gram(gram, n, gram.shape[0], torch.finfo(self.accumulate_dtype).eps)

    def singular_values(self) -> Tensor:
        """Singular values of the un-centred matrix of all embeddings seen (synced across ranks), descending.

        Those at the Gram's round-off level are exact zeros (see
        :func:`reprmetrics._linalg.gram_zero_tolerance`).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self._singular_values()

    def covariance_eigenvalues(self) -> Tensor:
        """Eigenvalues of the covariance of all embeddings seen (synced across ranks), descending.

        Formed from the un-centred ZᵀZ that RankMe keeps, so it loses about log10(‖mean‖²/λ) of
        float64's digits on an eigenvalue λ; :class:`AlphaReQ` keeps centred moments and does not.
        """
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
    as square roots of the eigenvalues of the accumulated ZᵀZ; eigenvalues at the Gram's round-off
    level, :math:`(\sqrt N + \sqrt D)\,\varepsilon\,\operatorname{tr} Z^\top Z`, are exact zeros
    (:func:`reprmetrics._linalg.gram_zero_tolerance`), so exactly rank-r embeddings give RankMe within
    1e-9 of an SVD. :meth:`diagnostics` adds σ₁ and the condition number. Equals
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
        sigma = self._singular_values()
        with no_autocast(sigma.device):
            value = _rankme_from_singular_values(sigma, self.eps)
        return value.to(torch.get_default_dtype())

    def diagnostics(self) -> dict[str, float | int]:
        """RankMe plus σ₁, the condition number and the numerical rank, synced across ranks, from one
        eigendecomposition of the accumulated Gram (what stable-pretraining's verbose mode logs).

        Returns ``{"rankme", "top_singular_value", "condition_number", "numerical_rank"}`` as Python
        numbers; ``condition_number`` is σ₁ / (smallest non-zero σ), finite for rank-deficient
        embeddings, whose zero singular values show in ``numerical_rank`` instead. Costs what
        ``compute()`` costs; call it where the values are logged, not per step.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            sigma = self._singular_values()
        out: dict[str, float | int] = {"rankme": float(_rankme_from_singular_values(sigma, self.eps))}
        out.update(_spectrum_diagnostics(sigma))
        return out


class _CentredSecondMoments(ReprMetric):
    """Base class: streams the packed centred moments of ``(B, D)`` batches (float64).

    ``num_features`` may be given up front; otherwise the state takes its shape from the first batch
    (every DDP rank must then see at least one batch before ``compute()``).
    """

    _min_samples = 2
    dense_states = 1

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
        return check_tensor(embeddings, type(self).__name__, min_rows=0, features=self._known_features())

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
                return _singular_values_from_gram(scatter + n * torch.outer(mean, mean), n, scatter.shape[0])


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


class CodingRate(_SecondMoments):
    r"""Coding rate (Yu et al., NeurIPS 2020, MCR²), streamed over batches.

    .. math::
        R(Z; \varepsilon) = \frac12 \log\det\Big(I_D + \frac{D}{N \varepsilon^2} Z^\top Z\Big)

    with Z all embeddings seen, rows L2-normalised when ``normalize=True`` (the default, as in MCR²)
    and not centred. States: ZᵀZ of the (normalised) rows (D×D) and N, sum-reduced (the inherited
    Σz state holds the sum of the normalised rows). The log-determinant is taken by a float64 Cholesky
    factorisation of the positive definite matrix. Equals :func:`reprmetrics.functional.coding_rate`
    on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor.

    As output of ``compute``:
        - a scalar float32 tensor ≥ 0 (nats); higher is better: it grows with the rank and spread of
          the embeddings (½ log(1 + D/ε²) when they all point one way).

    Args:
        eps: ε > 0, the allowed distortion (MCR²'s 0.5).
        normalize: L2-normalise each row before accumulating (zero rows stay zero).
        num_features, accumulate_dtype, kwargs: as for :class:`RankMe`.

    Example:
        >>> import torch
        >>> from reprmetrics import CodingRate
        >>> low, high = CodingRate(), CodingRate()
        >>> basis = torch.randn(4, 32)
        >>> for _ in range(4):
        ...     low.update(torch.randn(256, 4) @ basis)    # rank 4
        ...     high.update(torch.randn(256, 32))          # full rank
        >>> bool(low.compute() < high.compute())
        True
    """

    higher_is_better = True
    plot_lower_bound = 0.0

    def __init__(
        self,
        eps: float = 0.5,
        normalize: bool = True,
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features=num_features, accumulate_dtype=accumulate_dtype, **kwargs)
        self.eps = _check_coding_rate_eps(eps, "CodingRate")
        if not isinstance(normalize, bool):
            raise ValueError(f"CodingRate: `normalize` must be True or False, got {normalize!r}")
        self.normalize = normalize

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch (normalised first if asked). Raises ``ValueError`` (state untouched) on bad input."""
        z = self._check_batch(embeddings)
        if self.normalize:
            with no_autocast(z.device):
                z = l2_normalize_rows(z.to(device=self.gram.device, dtype=torch.float64))
        super().update(z)

    def compute(self) -> Tensor:
        """The coding rate of everything seen so far (nats)."""
        gram, _, n = self._checked_moments()
        with no_autocast(gram.device):
            value = _coding_rate_from_gram(gram, n, gram.shape[0], self.eps)
        return value.to(torch.get_default_dtype())


class NESum(_CentredSecondMoments):
    r"""NESum, the normalised eigenvalue sum (He & Ozay, ICML 2022), streamed over batches.

    .. math::
        \operatorname{NESum} = \sum_{k=1}^{D} \frac{\lambda_k}{\lambda_1} = \frac{\operatorname{tr}\Sigma}{\lambda_1}

    over the eigenvalues of the covariance Σ of all embeddings seen (centred). State: the packed
    centred moments (N, a shift, Σ(z − c), Σ(z − c)(z − c)ᵀ), merged exactly across batches and ranks
    (see :func:`reprmetrics._linalg.merge_centred_moments`), so an offset far larger than the spread
    cancels nothing. Equals :func:`reprmetrics.functional.nesum` on the concatenation of every batch of
    every rank.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor.

    As output of ``compute``:
        - a scalar float32 tensor in ``[1, D]``; higher is healthier (1: one direction; about D:
          isotropic). 0 when the embeddings have no spread above the rounding of their dtype.

    Args:
        num_features: D, if known up front (otherwise taken from the first batch).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import NESum
        >>> metric = NESum()
        >>> for _ in range(4):
        ...     metric.update(torch.randn(2048, 16))
        >>> 14 < metric.compute().item() <= 16
        True
    """

    higher_is_better = True
    plot_lower_bound = 0.0

    def compute(self) -> Tensor:
        """NESum of everything seen so far."""
        state, _ = self._checked_state()
        with no_autocast(state.device):
            value = _nesum_from_state(state, float(self.input_eps))
        return value.to(torch.get_default_dtype())
