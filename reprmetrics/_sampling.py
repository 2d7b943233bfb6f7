"""A Metric base class that keeps a bounded, uniform random sample of the embeddings it sees.

Metrics that need the points themselves (kNN, pairwise) cannot use sufficient statistics. They keep
at most ``max_samples`` points, chosen by *bottom-k sampling*: every incoming sample gets a random
key in [0, 1) and the points with the ``max_samples`` smallest keys are kept. Each rank keeps its own
bottom-k (memory bounded by ``max_samples`` per rank); at ``compute()`` the gathered points of all
ranks are reduced to the global bottom-k. That is a uniform random subset of every sample seen by
every rank, and the same subset on every rank, because the keys travel with the points.

Keys come from a CPU generator seeded with ``seed`` and the process's rank, so runs are reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from reprmetrics._base import ReprMetric
from reprmetrics._validation import check_positive_int, check_tensor, result_dtype


class BoundedSampleMetric(ReprMetric):
    """Base class: ``update((B, D))`` keeps a bounded uniform sample; ``_sample()`` returns it.

    Subclasses implement ``compute()`` on ``self._sample()`` and may override ``_min_samples``.
    """

    _min_samples = 1
    _reset_attributes = ("_num_features",)

    samples: list[Tensor]
    keys: list[Tensor]

    def __init__(self, max_samples: int = 25_600, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.max_samples = check_positive_int(max_samples, name, "max_samples")
        self.seed = check_positive_int(seed, name, "seed", minimum=0)
        self.add_state("samples", [], dist_reduce_fx="cat")
        self.add_state("keys", [], dist_reduce_fx="cat")
        self._generator: torch.Generator | None = None
        self._num_features: int | None = None

    def _keys_for(self, count: int) -> Tensor:
        if self._generator is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        return torch.rand(count, generator=self._generator, dtype=torch.float64)

    def _check_batch(self, x: Any) -> Tensor:
        """Validate a batch without changing state (subclasses may extend the checks)."""
        return check_tensor(x, type(self).__name__, min_rows=0, features=self._num_features)

    def update(self, embeddings: Tensor) -> None:
        """Add a ``(B, D)`` batch. Raises ``ValueError`` (state untouched) on bad input."""
        x = self._check_batch(embeddings).detach()
        x = x.to(result_dtype(x))  # half inputs are stored as float32
        self._num_features = x.shape[1]
        self.samples.append(x)
        self.keys.append(self._keys_for(x.shape[0]).to(x.device))
        stored = sum(len(k) for k in self.keys)
        if stored > 2 * self.max_samples:  # compact: amortised O(D) work per sample
            samples, keys = self._bottom_k(dim_zero_cat(self.samples), dim_zero_cat(self.keys))
            self.samples, self.keys = [samples], [keys]

    def _bottom_k(self, samples: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        if len(keys) <= self.max_samples:
            return samples, keys
        keep = torch.topk(keys, self.max_samples, largest=False).indices.sort().values
        return samples[keep], keys[keep]

    def _sample(self) -> Tensor:
        """The retained points (at most ``max_samples``, identical on every rank after sync)."""
        name = type(self).__name__
        stored = sum(len(s) for s in self.samples) if isinstance(self.samples, list) else len(self.samples)
        if stored == 0:
            raise ValueError(f"{name}: compute() called before any update() (no embeddings seen)")
        samples, _ = self._bottom_k(dim_zero_cat(self.samples), dim_zero_cat(self.keys))
        if samples.shape[0] < self._min_samples:
            raise ValueError(f"{name}: needs at least {self._min_samples} samples, got {samples.shape[0]}")
        return samples

    def reset(self) -> None:
        # The key generator is kept: forward() resets too, and restarting the stream would repeat keys.
        super().reset()
        self._num_features = None
