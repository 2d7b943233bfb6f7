r"""Streaming spectral metrics: :class:`RankMe`, :class:`AlphaReQ`, :class:`NESum` and :class:`CodingRate`.

All four read one statistic, :class:`reprmetrics.statistics.RowMoments`: the exact centred second
moments of the rows (coding rate: of the L2-normalised rows), merged exactly across batches and ranks,
so an offset far larger than the spread cancels nothing. RankMe's definition is un-centred: its Gram
matrix ZᵀZ = scatter + N·μμᵀ is recovered from the moments, as exactly as accumulating ZᵀZ directly.
Memory is O(D²) whatever the number of samples, a DDP sync moves O(D²) numbers, and every rank
computes the same value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import centred_moments, no_autocast, symmetric_from_upper
from reprmetrics._validation import check_nonnegative_float
from reprmetrics.functional.spectral import (
    _check_coding_rate_eps,
    _check_fit_range,
    _coding_rate_from_gram,
    _covariance_spectrum_from_parts,
    _nesum_from_parts,
    _power_law_fit,
    _rankme_from_singular_values,
    _spectrum_diagnostics,
)
from reprmetrics.statistics import RowMoments, cached, moments_checked, scatter_eigenvalues, uncentred_singular_values

__all__ = ["AlphaReQ", "CodingRate", "NESum", "RankMe"]


class _RowSpectrum(RowMoments):
    """Shared reading methods of the metrics on the rows' centred moments."""

    def _synced(self) -> Any:
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )

    def covariance_eigenvalues(self) -> Tensor:
        """Eigenvalues of the covariance of all rows seen (centred; synced across ranks), descending, ``min(N, D)``."""
        with self._synced():
            return _covariance_spectrum(self, {}, type(self).__name__)[0]

    def singular_values(self) -> Tensor:
        """Singular values of the un-centred matrix of all rows seen (synced across ranks), descending.

        Those at the Gram's round-off level are exact zeros (see
        :func:`reprmetrics._linalg.gram_zero_tolerance`).
        """
        with self._synced():
            moments_checked(self, type(self).__name__, 1)
            with no_autocast(self.moments.device):
                return uncentred_singular_values(self, {})


def _covariance_spectrum(stat: RowMoments, cache: dict[Any, Any], metric: str) -> tuple[Tensor, float]:
    """Covariance eigenvalues of a row-moments statistic and their zero tolerance (one eigendecomposition, cached)."""
    moments_checked(stat, metric, 2)

    def make() -> tuple[Tensor, float]:
        n, mean, _, eigenvalues = scatter_eigenvalues(stat, cache)
        return _covariance_spectrum_from_parts(n, mean, eigenvalues, float(stat.input_eps))

    return cached(cache, "covariance_spectrum", make)


class RankMe(_RowSpectrum):
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

    registry_name = "rankme"
    in_default_set = True
    higher_is_better = True
    plot_lower_bound = 1.0

    def __init__(
        self,
        eps: float = 1e-7,
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        diagnostics: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(normalize=False, num_features=num_features, accumulate_dtype=accumulate_dtype, **kwargs)
        self.eps = check_nonnegative_float(eps, "RankMe", "eps")
        self.diagnostics_reported = bool(diagnostics)

    def value_names(self) -> tuple[str, ...]:
        return ("", "top_singular_value", "condition_number") if self.diagnostics_reported else ("",)

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "RankMe", 1)
        with no_autocast(stat.moments.device):
            sigma = uncentred_singular_values(stat, cache)
            values = {"": _rankme_from_singular_values(sigma, self.eps)}
        if self.diagnostics_reported:
            found = _spectrum_diagnostics(sigma)
            values["top_singular_value"] = torch.tensor(
                found["top_singular_value"], dtype=torch.float64, device=sigma.device
            )
            values["condition_number"] = torch.tensor(
                found["condition_number"], dtype=torch.float64, device=sigma.device
            )
        return values

    def artifacts_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Any]:
        return {"singular_values": uncentred_singular_values(stat, cache)}

    def compute(self) -> Tensor:
        """RankMe of everything seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())

    def diagnostics(self) -> dict[str, float | int]:
        """RankMe plus σ₁, the condition number and the numerical rank, synced across ranks, from one
        eigendecomposition of the accumulated Gram (what stable-pretraining's verbose mode logs).

        Returns ``{"rankme", "top_singular_value", "condition_number", "numerical_rank"}`` as Python
        numbers; ``condition_number`` is σ₁ / (smallest non-zero σ), finite for rank-deficient
        embeddings, whose zero singular values show in ``numerical_rank`` instead. Costs what
        ``compute()`` costs; call it where the values are logged, not per step.
        """
        with self._synced():
            moments_checked(self, "RankMe", 1)
            with no_autocast(self.moments.device):
                sigma = uncentred_singular_values(self, {})
        out: dict[str, float | int] = {"rankme": float(_rankme_from_singular_values(sigma, self.eps))}
        out.update(_spectrum_diagnostics(sigma))
        return out


class AlphaReQ(_RowSpectrum):
    r"""α-ReQ (Agrawal et al., NeurIPS 2022), streamed over batches.

    With :math:`\lambda_1 \ge \lambda_2 \ge \dots` the eigenvalues of the covariance of all embeddings
    seen, α is :math:`b_0` of the weighted least-squares fit

    .. math::
        \log \lambda_k \approx -b_0 \log k + b_1, \qquad k \in [k_{lo}, k_{hi}],\ \text{weights } 1/k.

    The covariance comes from shifted moments (the first row seen as shift, merged exactly across
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

    registry_name = "alpha_req"
    in_default_set = True
    min_features = 13  # the default fit range, ranks 11..100, needs 3 of them
    higher_is_better = None
    healthy_value = 1.0

    def __init__(
        self,
        fit_range: tuple[int, int] = (11, 100),
        num_features: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        if accumulate_dtype != torch.float64:
            raise ValueError(
                "AlphaReQ: `accumulate_dtype` must be torch.float64 (the centred moments are float64), got"
                f" {accumulate_dtype}"
            )
        super().__init__(normalize=False, num_features=num_features, accumulate_dtype=accumulate_dtype, **kwargs)
        self.fit_range = _check_fit_range(fit_range, "AlphaReQ")

    def value_names(self) -> tuple[str, ...]:
        return ("", "r2")

    def _fit(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Any]:
        lam, tol = _covariance_spectrum(stat, cache, "AlphaReQ")
        with no_autocast(lam.device):
            slope, intercept, r2, first, last = cached(
                cache, ("power_law_fit", self.fit_range), lambda: _power_law_fit(lam, self.fit_range, tol, "AlphaReQ")
            )
        return {"eigenvalues": lam, "alpha": -slope, "intercept": intercept, "r2": r2, "first": first, "last": last}

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        fit = self._fit(stat, cache)
        return {"": fit["alpha"], "r2": fit["r2"]}

    def artifacts_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Any]:
        return {"spectrum": _as_plain_fit(self._fit(stat, cache))}

    def compute(self) -> Tensor:
        """α of everything seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())

    def spectrum_fit(self) -> dict[str, Any]:
        """The covariance eigenvalues and the α-ReQ fit, synced across ranks, for plotting and diagnostics.

        Returns ``{"eigenvalues", "alpha", "intercept", "r2", "first", "last"}``: the fitted line is
        ``log λ_k = −alpha·log k + intercept`` for ranks ``first..last``; ``r2`` is its 1/k-weighted
        R² in log-log space (near 1: the spectrum is a power law there and α describes it; much
        lower: α is a poor summary).
        """
        with self._synced():
            return _as_plain_fit(self._fit(self, {}))


def _as_plain_fit(fit: dict[str, Any]) -> dict[str, Any]:
    return {
        "eigenvalues": fit["eigenvalues"],
        "alpha": float(fit["alpha"]),
        "intercept": float(fit["intercept"]),
        "r2": float(fit["r2"]),
        "first": fit["first"],
        "last": fit["last"],
    }


class CodingRate(_RowSpectrum):
    r"""Coding rate (Yu et al., NeurIPS 2020, MCR²), streamed over batches.

    .. math::
        R(Z; \varepsilon) = \frac12 \log\det\Big(I_D + \frac{D}{N \varepsilon^2} Z^\top Z\Big)

    with Z all embeddings seen, rows L2-normalised when ``normalize=True`` (the default, as in MCR²)
    and not centred. State: the centred moments of the (normalised) rows
    (:class:`~reprmetrics.statistics.RowMoments`), from which ZᵀZ = scatter + N·μμᵀ; the
    log-determinant is taken by a float64 Cholesky factorisation of the positive definite matrix. Equals
    :func:`reprmetrics.functional.coding_rate` on the concatenation of every batch of every rank.

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

    registry_name = "coding_rate"
    in_default_set = True
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
        if not isinstance(normalize, bool):
            raise ValueError(f"CodingRate: `normalize` must be True or False, got {normalize!r}")
        super().__init__(normalize=normalize, num_features=num_features, accumulate_dtype=accumulate_dtype, **kwargs)
        self.eps = _check_coding_rate_eps(eps, "CodingRate")

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "CodingRate", 1)
        with no_autocast(stat.moments.device):
            n, mean, scatter = centred_moments(stat.moments.to(torch.float64))
            gram = symmetric_from_upper(scatter) + n * torch.outer(mean, mean)
            return {"": _coding_rate_from_gram(gram, n, gram.shape[0], self.eps)}

    def compute(self) -> Tensor:
        """The coding rate of everything seen so far (nats)."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())


class NESum(_RowSpectrum):
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

    registry_name = "nesum"
    in_default_set = True
    higher_is_better = True
    plot_lower_bound = 0.0

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(normalize=False, num_features=num_features, **kwargs)

    def values_from(self, stat: RowMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        moments_checked(stat, "NESum", 2)
        with no_autocast(stat.moments.device):
            n, mean, scatter, eigenvalues = scatter_eigenvalues(stat, cache)
            return {"": _nesum_from_parts(n, mean, scatter, eigenvalues, float(stat.input_eps))}

    def compute(self) -> Tensor:
        """NESum of everything seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())
