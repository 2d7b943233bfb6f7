"""Behaviour shared by every reprmetrics Metric class: what ``torchmetrics.Metric`` does not guarantee by itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum
from torchmetrics.utilities.distributed import gather_all_tensors

from reprmetrics._linalg import merge_centred_moments

# dtype <-> small integer, for agreeing on the dtype of lazily shaped states across ranks.
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)
_MAX_NDIM = 4


class ReprMetric(Metric):
    """A torchmetrics Metric that never takes down the run it measures.

    - **forward()** leaves the accumulated state exactly as it was when the batch is rejected or its
      own value cannot be computed (torchmetrics resets the state before updating on the batch, and
      clears list states in place, so an error there would otherwise drop everything accumulated).
    - **DDP with ranks that saw nothing.** States whose shape comes from the first batch (0-sized
      placeholders until then) and list states are agreed on across ranks before torchmetrics
      gathers them: one small gather of every state's shape and dtype; a rank that saw nothing takes
      the others' shape filled with zeros (n = 0, which every reduction ignores). Ranks whose
      non-empty states disagree (different widths) get the same ``ValueError`` on every rank.
    - **A compute that raises** leaves the metric unsynced and usable, on every rank alike.
    - **No cached values** (``compute_with_cache=False`` unless asked for): with a cache, a rank that
      saw no new batch returns its cached value without joining the sync the other ranks wait in.
    - **dist_sync_on_step=True**: a rank whose batch is rejected still takes part in the batch's sync
      (with nothing) before raising, so the other ranks are not left waiting in the collective.
    - **Accumulators keep their dtype**: ``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``set_dtype``
      and Lightning's true half precision move states between devices but never change their dtype
      (a float16 Gram matrix would return RankMe ≈ 1 for any input).
    """

    is_differentiable = False
    full_state_update = False
    # Plain attributes that reset() clears (e.g. the width seen so far); restored with the state.
    _reset_attributes: tuple[str, ...] = ()
    #: D×D matrices the metric keeps (memory grows as D²): checked against free memory before allocating.
    dense_states: int = 0

    # ---- traits the metric registry reads (see reprmetrics.registry) ----
    #: The name the tracker, evaluate() and the CLI know the metric by; None: not in the registry.
    registry_name: ClassVar[str | None] = None
    #: Whether it is in the default set.
    in_default_set: ClassVar[bool] = False
    #: The narrowest embeddings the default set includes it for.
    min_features: ClassVar[int] = 1
    #: For metrics healthy near a value rather than high or low (``higher_is_better = None``): that value.
    healthy_value: ClassVar[float | None] = None

    def __init__(self, **kwargs: Any) -> None:
        # A cached value lets a rank that saw no new batch skip the sync the other ranks then wait in:
        # every compute() syncs (the value is recomputed; its cost is one sync and the final step).
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)

    def _check_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Validate a batch against the accumulated state without changing it (subclasses override)."""

    def _check_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Checks for ``forward()``: those of a batch (its own value is checked by compute, after any sync)."""
        return self._check_batch(*args, **kwargs)

    # ---- forward ----------------------------------------------------------------------------------
    def _saved_state(self) -> dict[str, Any]:
        if self.full_state_update or self.dist_sync_on_step:
            # The full-state path updates the accumulated tensors in place before it resets: copy them.
            saved: dict[str, Any] = dict(self._copy_state_dict())
        else:
            # reset() swaps in fresh tensors (references stay intact) but clears lists in place.
            saved = {
                attr: (list(value) if isinstance(value, list) else value)
                for attr in self._defaults
                for value in [getattr(self, attr)]
            }
        saved.update({attr: getattr(self, attr) for attr in self._reset_attributes})
        return saved

    def _restore(self, saved: dict[str, Any], update_count: int, compute_on_cpu: bool) -> None:
        for attr, value in saved.items():
            setattr(self, attr, value)
        self._update_count = update_count
        self._computed = None
        self._cache = None
        self._is_synced = False
        self._should_unsync = True
        self._to_sync = self.sync_on_compute
        self._enable_grad = False
        self.compute_on_cpu = compute_on_cpu

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        update_count, compute_on_cpu = self._update_count, self.compute_on_cpu
        try:
            self._check_forward(*args, **kwargs)
        except ValueError:
            if self.dist_sync_on_step and _distributed():
                self._join_step_sync(update_count, compute_on_cpu)
            raise
        saved = self._saved_state()
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            self._restore(saved, update_count, compute_on_cpu)
            raise

    def _join_step_sync(self, update_count: int, compute_on_cpu: bool) -> None:
        """Take part, with no rows, in the sync the other ranks' ``forward`` runs for their batch."""
        saved = self._saved_state()
        try:
            self.reset()
            self._update_count = 1  # nothing was added, but the ranks' batch value is computed
            self._to_sync, self._should_unsync = True, False
            with contextlib.suppress(ValueError, RuntimeError):
                self.compute()
        finally:
            self._restore(saved, update_count, compute_on_cpu)

    # ---- syncing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sync_context(
        self,
        dist_sync_fn: Callable | None = None,
        process_group: Any | None = None,
        should_sync: bool = True,
        should_unsync: bool = True,
        distributed_available: Callable | None = None,
    ) -> Generator[None, None, None]:
        """torchmetrics' context, but the local state comes back even when the body raises."""
        self.sync(
            dist_sync_fn=dist_sync_fn,
            process_group=process_group,
            should_sync=should_sync,
            distributed_available=distributed_available,
        )
        try:
            yield
        finally:
            self.unsync(should_unsync=self._is_synced and should_unsync)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        self._agree_on_state_shapes(dist_sync_fn, process_group or self.process_group)
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def _agree_on_state_shapes(self, dist_sync_fn: Callable, group: Any) -> None:
        """Give empty states (of ranks that saw nothing) the shape and dtype of the others', before the gathers."""
        names = list(self._reductions)
        local = []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, list):
                value = dim_zero_cat(value) if value else None
            local.append(_describe(value))
        descriptors = dist_sync_fn(torch.tensor(local, dtype=torch.long, device=self.device).flatten(), group=group)
        ranks = [d.view(len(names), -1).tolist() for d in descriptors]
        for i, name in enumerate(names):
            shapes = [r[i] for r in ranks if r[i][0] >= 0 and _numel(r[i]) > 0]
            if not shapes:
                continue
            reference = shapes[0]
            is_list = isinstance(getattr(self, name), list)
            # List states concatenate along dim 0: only the trailing dimensions must agree.
            first = 2 if is_list else 1

            def key(d: list[int], first: int = first) -> tuple[int, ...]:
                return (d[0], *d[first : 1 + d[0]])

            if any(key(s) != key(reference) for s in shapes):
                seen = sorted({str(tuple(s[1 : 1 + s[0]])) for s in shapes})
                raise ValueError(
                    f"{type(self).__name__}: the processes accumulated states of different shapes for {name!r}"
                    f" ({', '.join(seen)}); every rank must feed embeddings of the same width"
                )
            dtype = _DTYPES[max(s[-1] for s in shapes)] if is_list else _DTYPES[reference[-1]]
            shape = tuple(reference[1 : 1 + reference[0]])
            value = getattr(self, name)
            if is_list:
                if not value:
                    setattr(self, name, [torch.zeros((0, *shape[1:]), dtype=dtype, device=self.device)])
                else:
                    setattr(self, name, [v.to(dtype) for v in value])
            elif value.numel() == 0:
                setattr(self, name, torch.zeros(shape, dtype=value.dtype, device=value.device))

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
            if (
                self._reductions[attr] is dim_zero_sum
                and isinstance(value, Tensor)
                and value.numel() == 0
                and local.numel() > 0
            ):
                incoming_state[attr] = torch.zeros_like(local)  # nothing accumulated yet
            elif (
                self._reductions[attr] is dim_zero_sum
                and isinstance(value, Tensor)
                and local.numel() == 0
                and value.numel() > 0
            ):
                setattr(self, attr, torch.zeros_like(value))
            elif self._reductions[attr] is merge_centred_moments and isinstance(value, Tensor):
                # One side saw nothing yet: give it the other's shape with n = 0, which the merge ignores.
                if value.numel() == 0 and local.numel() > 0:
                    incoming_state[attr] = torch.zeros_like(local)
                elif local.numel() == 0 and value.numel() > 0:
                    setattr(self, attr, torch.zeros_like(value))
        super()._reduce_states(incoming_state)

    # ---- devices and dtypes -----------------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> Any:
        """Move states with the module (``.to(device)``, ``.cuda()``), never change their dtype.

        torchmetrics applies ``fn`` to the states, dtype included, for ``.to(dtype)``; a float16 Gram
        matrix or sample would change every value. Accumulators keep the dtype chosen at construction.
        """
        names = tuple(self._defaults)
        this = super()._apply(fn, exclude_state=(*exclude_state, *names))
        device = fn(torch.zeros(1, device=self.device)).device  # the device fn moves to (if any)
        for name in names:
            if name in exclude_state:
                continue
            default = this._defaults[name]
            if isinstance(default, Tensor):
                this._defaults[name] = default.to(device)
            value = getattr(this, name)
            if isinstance(value, Tensor):
                setattr(this, name, value.to(device))
            else:
                setattr(this, name, [v.to(device) for v in value])
        this._device = device
        return this

    # ---- reading a statistic (see reprmetrics.statistics) ----
    def value_names(self) -> tuple[str, ...]:
        """Suffixes of the values :meth:`values_from` gives: ``""`` is the metric itself (``"r2"``: α-ReQ's
        fit quality)."""
        return ("",)

    def values_from(self, stat: Any, cache: dict[Any, Any]) -> dict[str, Tensor]:
        """The metric's values computed from ``stat`` (itself, or a statistic shared with other metrics).

        ``cache`` is shared by every metric reading ``stat`` in one computation: an eigendecomposition
        or a kNN search made for one is reused by the others.
        """
        raise NotImplementedError(f"{type(self).__name__} does not read a shared statistic")

    def artifacts_from(self, stat: Any, cache: dict[Any, Any]) -> dict[str, Any]:
        """Extra results for figures (a spectrum, per-sample values), from the same computation."""
        return {}

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot a value or a sequence of values (needs matplotlib). Returns ``(figure, axes)``."""
        return self._plot(val, ax)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _describe(value: Tensor | None) -> list[int]:
    """``[ndim, size_0, ..., size_3, dtype code]`` of a state (``ndim = -1``: nothing, e.g. an empty list)."""
    if value is None:
        return [-1] + [0] * _MAX_NDIM + [0]
    if value.ndim > _MAX_NDIM:
        raise ValueError(f"state of {value.ndim} dimensions; at most {_MAX_NDIM} are supported")
    sizes = list(value.shape) + [0] * (_MAX_NDIM - value.ndim)
    return [value.ndim, *sizes, _DTYPES.index(value.dtype)]


def _numel(descriptor: Sequence[int]) -> int:
    ndim = descriptor[0]
    count = 1
    for size in descriptor[1 : 1 + ndim]:
        count *= size
    return count
