r"""Streaming multi-view metrics: :class:`LiDAR`, :class:`Alignment` and :class:`Uniformity`.

- :class:`LiDAR` reads :class:`~reprmetrics.statistics.ViewMoments`: the within-group scatter
  (sum-reduced) and the exact centred moments of the group means: memory and DDP traffic are O(D²)
  whatever the number of samples.
- :class:`Alignment` reads :class:`~reprmetrics.statistics.PairDistances`: a sum and a count.
- :class:`Uniformity` needs the points: it reads :class:`~reprmetrics.statistics.BoundedSample`, a
  uniform random sample of at most ``max_samples`` of them, the same sample on every rank, and
  evaluates every pair of it exactly, in tiles.

``forward()`` (``metric(batch)``) validates the batch against what was accumulated before torchmetrics
swaps the state out, so a rejected batch leaves the state unchanged there too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprmetrics._linalg import no_autocast
from reprmetrics._validation import check_nonnegative_float
from reprmetrics.functional.multiview import (
    _lidar_eigenvalues,
    _lidar_scatter_from_moments,
    _smooth_effective_rank,
    _uniformity_from_points,
)
from reprmetrics.statistics import BoundedSample, PairDistances, ViewMoments, sample_points

__all__ = ["Alignment", "LiDAR", "Uniformity"]


class LiDAR(ViewMoments):
    r"""LiDAR (Thilak et al., ICLR 2024), streamed over batches of whole groups of views.

    Each source sample is a class whose members are its q augmented views. With :math:`\mu_i` the
    mean of sample i's views and :math:`\mu` the mean of the :math:`\mu_i` over all n samples seen:

    .. math::
        \Sigma_b = \frac{1}{n-1} \sum_i (\mu_i - \mu)(\mu_i - \mu)^\top, \qquad
        \Sigma_w = \frac{1}{n(q-1)} \sum_{i,j} (z_{ij} - \mu_i)(z_{ij} - \mu_i)^\top + \delta I,

    .. math::
        \lambda = \operatorname{eig}\big(\Sigma_w^{-1/2} \Sigma_b \Sigma_w^{-1/2}\big)_{\ge 0}, \qquad
        p_k = \frac{\lambda_k}{\sum_l \lambda_l} + \varepsilon, \qquad
        \operatorname{LiDAR} = \exp\Big(-\sum_{k=1}^{d} p_k \log p_k\Big).

    The state is float64: the within-group scatter :math:`\sum_{ij} (z_{ij}-\mu_i)(z_{ij}-\mu_i)^\top`
    (each group is centred on its own mean inside its batch, so no cancellation; sum-reduced), the
    group means' shifted centred moments (n, a shift, Σ(μ_i − c), Σ(μ_i − c)(μ_i − c)ᵀ, merged exactly
    across batches and ranks with Chan et al.'s update, see
    :func:`reprmetrics._linalg.merge_centred_moments`), q and the input's precision. A common offset
    does not cancel: at offsets up to 1e8 × the spread (float64 input) LiDAR stays within 1e-6 of a
    reference that centres before any product.
    Equals :func:`reprmetrics.functional.lidar` on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``views`` (:class:`~torch.Tensor`): ``(B, q, d)`` floating tensor, B whole groups of q ≥ 2
          views. Every group of every batch (and every rank) must have the same q; a group must not be
          split across batches. Views arriving as ``(q·B, d)`` can be grouped with
          ``einops.rearrange(z, "(q b) d -> b q d", q=q)``.

    As output of ``compute``:
        - a scalar float32 tensor in about ``[1, min(n − 1, d)]``; higher is better. If every sample
          has the same mean view (up to the input's rounding noise), all λ are 0 and LiDAR is
          :math:`\exp(-d\varepsilon\log\varepsilon) \approx 1`.

    Args:
        delta: ridge added to Σ_w (the paper's 1e-4); with 0, a singular Σ_w raises ``ValueError``.
        eps: added to each normalised eigenvalue (the paper's 1e-8).
        num_features: d, if known up front (otherwise taken from the first batch, and then every
            DDP rank must see at least one batch before ``compute()``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import LiDAR
        >>> metric = LiDAR()
        >>> basis = torch.randn(4, 32)
        >>> for _ in range(4):
        ...     centres = torch.randn(64, 4) @ basis               # sample means span 4 directions
        ...     noise = 0.1 * torch.randn(64, 1, 32)
        ...     metric.update(centres.unsqueeze(1) + torch.cat([noise, -noise], dim=1))   # (64, 2, 32)
        >>> 1.0 < metric.compute().item() <= 4.0
        True
    """

    registry_name = "lidar"
    in_default_set = True
    input_kind = "views"
    higher_is_better = True
    plot_lower_bound = 1.0

    def __init__(self, delta: float = 1e-4, eps: float = 1e-8, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_features=num_features, **kwargs)
        self.delta = check_nonnegative_float(delta, "LiDAR", "delta")
        self.eps = check_nonnegative_float(eps, "LiDAR", "eps")

    def values_from(self, stat: ViewMoments, cache: dict[Any, Any]) -> dict[str, Tensor]:
        n, q = int(stat.num_groups), int(stat.num_views)
        if n == 0 or stat.within.numel() == 0:
            raise ValueError("LiDAR: compute() called before any update() (no views seen)")
        if n < 2:
            raise ValueError(f"LiDAR: needs at least 2 samples (groups of views), got {n}")
        if int(stat.total_views) != n * q:
            raise ValueError(
                f"LiDAR: the processes saw different numbers of views per sample ({int(stat.total_views)} views"
                f" in {n} groups, at most {q} per group); every group must have the same q"
            )
        with no_autocast(stat.within.device):
            between, within, tol, _ = _lidar_scatter_from_moments(
                stat.within, stat.means_moments, q, float(stat.input_eps)
            )
            return {"": _smooth_effective_rank(_lidar_eigenvalues(between, within, self.delta, tol, "LiDAR"), self.eps)}

    def compute(self) -> Tensor:
        """LiDAR of every group seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())


class Alignment(PairDistances):
    r"""Alignment of positive pairs (Wang & Isola, ICML 2020), streamed over batches.

    .. math::
        \operatorname{align} = \frac{1}{N} \sum_{i=1}^{N} \lVert \hat x_i - \hat y_i \rVert_2^{\alpha},
        \qquad \hat x_i = \frac{x_i}{\lVert x_i \rVert_2}

    over all N pairs seen (:math:`\hat x = x` for ``normalize=False``). The state is the float64 sum
    of the distances and the pair count, both sum-reduced; equals
    :func:`reprmetrics.functional.alignment` on the concatenation of every batch of every rank.

    As input to ``update``:
        - ``x`` (:class:`~torch.Tensor`): ``(B, D)`` embeddings of one view of B samples.
        - ``y`` (:class:`~torch.Tensor`): ``(B, D)`` embeddings of another view of the same samples.

    As output of ``compute``:
        - a scalar float32 tensor ≥ 0 (at most :math:`2^\alpha` when normalised); lower is better,
          0 for identical views.

    Differentiable: ``metric(x, y)`` (``forward``) returns the batch's alignment with its autograd
    graph, usable as a loss (as Wang & Isola and lightly do); the accumulated state is detached.

    Args:
        alpha: exponent > 0 (the paper's 2).
        normalize: L2-normalise the rows first (a zero row stays zero: it has no direction).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import Alignment
        >>> metric = Alignment()
        >>> for _ in range(4):
        ...     x = torch.randn(64, 16)
        ...     metric.update(x, x + 0.1 * torch.randn(64, 16))
        >>> 0.0 < metric.compute().item() < 0.1
        True
    """

    registry_name = "alignment"
    in_default_set = True
    input_kind = "pairs"
    is_differentiable = True
    higher_is_better = False
    plot_lower_bound = 0.0

    def __init__(self, alpha: float = 2.0, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(alpha=alpha, normalize=normalize, **kwargs)

    def values_from(self, stat: PairDistances, cache: dict[Any, Any]) -> dict[str, Tensor]:
        if stat.rows_seen() == 0:
            raise ValueError("Alignment: compute() called before any update() (no pairs seen)")
        return {"": stat.sum_distances / stat.num_pairs}

    def compute(self) -> Tensor:
        """Mean distance over every pair seen so far."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())


class Uniformity(BoundedSample):
    r"""Uniformity on the hypersphere (Wang & Isola, ICML 2020), exact over every pair of a bounded sample.

    .. math::
        \operatorname{unif} = \log \frac{2}{N(N-1)} \sum_{i<j} e^{-t \lVert \hat x_i - \hat x_j \rVert_2^2},
        \qquad \hat x_i = \frac{x_i}{\lVert x_i \rVert_2}

    over the N points kept (:math:`\hat x = x` for ``normalize=False``).

    Which points are kept: at most ``max_samples``. Every incoming point gets a random key from a
    generator seeded with ``seed`` (and the rank), and the points with the ``max_samples`` smallest keys
    are kept (bottom-k sampling): a uniform random subset of all points seen on all ranks, and the
    same subset on every rank after the sync, because the keys travel with the points. While at most
    ``max_samples`` points have been seen, all are kept and the value equals
    :func:`reprmetrics.functional.uniformity` on their concatenation. Memory: at most about
    4·``max_samples`` stored points per rank, plus tiles of at most 1024² (CPU) or 4096² (GPU) pairs
    during ``compute()``.

    As input to ``update``:
        - ``embeddings`` (:class:`~torch.Tensor`): ``(B, D)`` floating tensor (half precision is stored
          as float32).

    As output of ``compute``:
        - a scalar float32 tensor ≤ 0; lower is better (more uniform). About :math:`-2t + 2t^2/D` for
          points uniform on the sphere, 0 for identical points.

    Not differentiable (the kept sample is detached, so ``is_differentiable`` is False): as a training
    loss use :func:`reprmetrics.functional.uniformity`, whose tiled backward never forms N×N either.

    Args:
        t: temperature > 0 (the paper's 2).
        normalize: L2-normalise the rows first (a zero row stays zero: it has no direction).
        max_samples: the most points kept (default 25,600).
        seed: seeds the sampling keys (each rank adds its own offset).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from reprmetrics import Uniformity
        >>> metric = Uniformity()
        >>> for _ in range(4):
        ...     metric.update(torch.randn(500, 128))   # nearly uniform on the sphere
        >>> -4.0 < metric.compute().item() < -3.85
        True
    """

    registry_name = "uniformity"
    in_default_set = True
    higher_is_better = False
    _min_samples = 2

    def __init__(
        self, t: float = 2.0, normalize: bool = True, max_samples: int = 25_600, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        self.t = check_nonnegative_float(t, "Uniformity", "t", strictly_positive=True)
        self.normalize = bool(normalize)

    def values_from(self, stat: BoundedSample, cache: dict[Any, Any]) -> dict[str, Tensor]:
        points = sample_points(stat, cache, "Uniformity", 2)
        with no_autocast(points.device):
            return {"": _uniformity_from_points(points, self.t, self.normalize, "Uniformity")}

    def compute(self) -> Tensor:
        """Uniformity over every pair of the kept points."""
        return self.values_from(self, {})[""].to(torch.get_default_dtype())
