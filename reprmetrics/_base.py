"""Behaviour shared by every reprmetrics Metric class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

from reprmetrics._linalg import merge_centred_moments


class ReprMetric(Metric):
    """A torchmetrics Metric with two guarantees that ``Metric`` does not give by itself.

    - ``forward()`` leaves the accumulated state as it was when the batch is rejected or its own value
      cannot be computed (torchmetrics resets the state before updating on the batch, so an error
      there would otherwise drop everything accumulated).
    - Sum states and packed centred-moment states (``dist_reduce_fx=merge_centred_moments``) that take
      their shape from the first batch (0-sized placeholders until then) merge correctly in
      ``forward()``.
    """

    is_differentiable = False
    full_state_update = False
    # Plain attributes that reset() clears (e.g. the width seen so far); restored with the state.
    _reset_attributes: tuple[str, ...] = ()

    def _check_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Validate a batch against the accumulated state without changing it (subclasses override)."""

    def _check_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Checks for ``forward()``: those of a batch, plus any its own value needs (subclasses extend)."""
        return self._check_batch(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # forward() resets the state before updating, so the width check against what was accumulated
        # must happen first.
        self._check_forward(*args, **kwargs)
        # reset() swaps in fresh tensors, so references keep the accumulated state intact.
        saved = {attr: getattr(self, attr) for attr in (*self._defaults, *self._reset_attributes)}
        update_count, compute_on_cpu = self._update_count, self.compute_on_cpu
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            for attr, value in saved.items():
                setattr(self, attr, value)
            self._update_count = update_count
            self._computed = None
            self._is_synced = False
            self._should_unsync = True
            self._to_sync = self.sync_on_compute
            self._enable_grad = False
            self.compute_on_cpu = compute_on_cpu
            raise

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        for attr, value in incoming_state.items():
            local = getattr(self, attr)
            # forward() of a differentiable metric updates on the batch with grad enabled; the value it
            # returns keeps its graph, the accumulated state must not (it would chain every batch's graph).
            if isinstance(local, Tensor) and local.requires_grad:
                local = local.detach()
                setattr(self, attr, local)
            if isinstance(value, Tensor) and value.requires_grad:
                value = incoming_state[attr] = value.detach()
            if self._reductions[attr] is dim_zero_sum and isinstance(value, Tensor) and value.numel() == 0 and local.numel() > 0:
                incoming_state[attr] = torch.zeros_like(local)  # nothing accumulated yet
            elif self._reductions[attr] is merge_centred_moments and isinstance(value, Tensor):
                # One side saw nothing yet: give it the other's shape with n = 0, which the merge ignores.
                if value.numel() == 0 and local.numel() > 0:
                    incoming_state[attr] = torch.zeros_like(local)
                elif local.numel() == 0 and value.numel() > 0:
                    setattr(self, attr, torch.zeros_like(value))
        super()._reduce_states(incoming_state)

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot a value or a sequence of values (needs matplotlib). Returns ``(figure, axes)``."""
        return self._plot(val, ax)
