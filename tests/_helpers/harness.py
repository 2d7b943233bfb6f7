"""A shared metric test harness, in the spirit of torchmetrics' ``MetricTester``.

Each :class:`MetricCase` row names a Metric class (its row of :data:`_helpers.metrics.METRIC_SPECS`
gives the input kind and width), how to build it, its functional form and an independent float64
numpy/scipy reference. :class:`MetricTester` then checks, for any row:

- ``check_batches_and_total``: each batch's ``forward()`` value against the reference on that batch,
  and the accumulated ``compute()`` against the reference on the whole stream;
- ``check_streaming_equals_functional``: uneven batches (fewer rows than D among them) give the
  functional's value on the concatenation;
- ``check_bad_input``: wrong ndim, wrong width after the first batch, a bool tensor, a non-tensor, NaN
  and infinity raise a ``ValueError`` naming the metric, and every state tensor and list is left as it was;
- ``check_copies``: ``clone()``, a pickle round trip and ``state_dict()``/``load_state_dict()`` give
  the same value (and keep accumulating alike);
- ``check_half_precision``: half-precision input to a ``.half()``-ed metric keeps the accumulators'
  dtype and the value within tolerance of the reference on the half-rounded input;
- ``check_ddp``: two ranks with different row counts give the value of the whole on every rank
  (through the test run's one process pool, :func:`_helpers.ddp.run_distributed`).

A new Metric class is two rows: its :class:`_helpers.metrics.MetricSpec` (input kind, width, how few rows
make it fail) and its :class:`MetricCase` in ``tests/test_metric_table.py`` (factory, functional form,
float64 reference, tolerances); every check above then runs on it.

The small helpers (:func:`rel_err`, :func:`uneven_batches`, :func:`state_of`, :func:`same_state`,
:func:`assert_rejects`) are the ones the per-metric test files used to write out each.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from _helpers.metrics import SPECS_BY_NAME, MetricSpec

UNEVEN_SIZES = (7, 100, 1, 250)


def rel_err(a: Any, b: Any) -> float:
    """Relative error of ``a`` against the reference ``b`` (numbers or one-element tensors)."""
    a, b = (float(v.detach()) if isinstance(v, Tensor) else float(v) for v in (a, b))
    return abs(a - b) / max(abs(b), 1e-300)


def uneven_batches(z: Tensor, sizes: Sequence[int] = UNEVEN_SIZES) -> list[Tensor]:
    """Uneven batches covering all of ``z`` (the sizes repeat until it is used up)."""
    out, start, i = [], 0, 0
    while start < len(z):
        out.append(z[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return out


def state_of(metric: Any) -> dict[str, Any]:
    """A copy of every state of ``metric``: tensors cloned, list states as lists of clones."""
    out = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        out[name] = [v.clone() for v in value] if isinstance(value, list) else value.clone()
    return out


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`state_of` snapshots hold the same shapes, dtypes and values."""
    if a.keys() != b.keys():
        return False
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, list) != isinstance(y, list):
            return False
        if isinstance(x, list):
            if len(x) != len(y) or not all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(x, y)):
                return False
        elif x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            return False
    return True


def assert_rejects(metric: Any, calls: dict[str, tuple], name: str, forward: bool = True) -> None:
    """Each call (message fragment -> update arguments) raises a ``ValueError`` whose message starts with
    ``"{name}:"`` and holds the fragment, through ``update()`` and (``forward``) ``forward()``, and leaves every
    state of ``metric`` as it was."""
    before = state_of(metric)
    for fragment, args in calls.items():
        for method in (metric.update, metric) if forward else (metric.update,):
            with pytest.raises(ValueError) as info:
                method(*args)
            assert str(info.value).startswith(f"{name}:"), str(info.value)
            assert fragment in str(info.value), str(info.value)
            assert same_state(before, state_of(metric)), f"{fragment!r} changed the state of {name}"


def point_bad_inputs(width: int) -> dict[str, tuple]:
    """Bad batches for a metric fed ``(N, D)`` points after a first batch of width ``width``."""
    return {
        "NaN": (torch.full((4, width), float("nan")),),
        "infinite": (torch.full((4, width), float("inf")),),
        "shape": (torch.randn(4, 2, width // 2),),
        f"earlier batches had {width}": (torch.randn(4, width + 1),),
        "must be a torch.Tensor": (np.zeros((4, width)),),
    }


def _numpy(args: Sequence[Tensor]) -> tuple[np.ndarray, ...]:
    return tuple(a.detach().double().cpu().numpy() for a in args)


@dataclass(frozen=True)
class MetricCase:
    """One row of a metric test table.

    ``reference(*arrays)`` is the float64 reference on one stream's update arguments (numpy arrays,
    the batches concatenated); a metric whose value depends on the batching (``MinibatchCKA``) gives
    ``stream_reference(batches)`` instead, on the list of batches' arrays. ``functional(*tensors)``
    is the functional form (``None`` if the metric has none).
    """

    name: str
    make: Callable[[], Any]
    reference: Callable[..., float] | None = None
    functional: Callable[..., Tensor] | None = None
    stream_reference: Callable[[list[tuple[np.ndarray, ...]]], float] | None = None
    rtol: float = 1e-6  # value against the float64 reference (float64 input)
    half_rtol: float = 1e-3  # value on half-precision input against the reference on the rounded input
    sizes: tuple[int, ...] = UNEVEN_SIZES
    ddp_rows: tuple[int, int] = (100, 258)
    seed: int = 0
    extra_bad: dict[str, tuple] = field(default_factory=dict)

    @property
    def spec(self) -> MetricSpec:
        return SPECS_BY_NAME[self.name]

    def expected(self, batches: list[tuple[Tensor, ...]]) -> float:
        arrays = [_numpy(b) for b in batches]
        if self.stream_reference is not None:
            return float(self.stream_reference(arrays))
        assert self.reference is not None
        return float(self.reference(*(np.concatenate(parts) for parts in zip(*arrays))))

    def data(self, rows: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
        """``rows`` samples of this row's input kind, one cloud (split it into batches)."""
        return self.spec.batch(rows, torch.Generator().manual_seed(self.seed), dtype)

    def batches(
        self, dtype: torch.dtype = torch.float64, sizes: Sequence[int] | None = None
    ) -> list[tuple[Tensor, ...]]:
        sizes = [max(s, self.spec.min_batch) for s in (sizes or self.sizes)]
        whole = self.data(sum(sizes), dtype)
        out, start = [], 0
        for s in sizes:
            out.append(tuple(t[start : start + s] for t in whole))
            start += s
        return out


def _feed(metric: Any, batches: list[tuple[Tensor, ...]]) -> Any:
    for args in batches:
        metric.update(*args)
    return metric


def _concat(batches: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*batches))


class MetricTester:
    """The checks every row of a metric table gets (see the module docstring)."""

    def __init__(self, case: MetricCase) -> None:
        self.case = case

    def check_batches_and_total(self) -> None:
        case, spec = self.case, self.case.spec
        batches = case.batches()
        metric = case.make()
        for args in batches:
            if len(args[0]) <= spec.too_few:  # this batch alone has no value: forward() raises
                before = state_of(metric)
                with pytest.raises(ValueError, match=case.name):
                    metric(*args)
                assert same_state(before, state_of(metric)), "a failed forward() changed the state"
                metric.update(*args)  # update() takes it: the union has enough rows
                continue
            value = metric(*args)
            expected = case.expected([args])
            assert rel_err(value, expected) <= case.rtol, (len(args[0]), float(value), expected)
        assert rel_err(metric.compute(), case.expected(batches)) <= case.rtol

    def check_streaming_equals_functional(self) -> None:
        case = self.case
        if case.functional is None:
            pytest.skip(f"{case.name} has no functional form")
        batches = case.batches()
        assert any(len(b[0]) < case.spec.width for b in batches), "some batch must have fewer rows than D"
        streamed = _feed(case.make(), batches).compute()
        assert rel_err(streamed, case.functional(*_concat(batches))) <= 1e-6  # both float32 values

    def check_bad_input(self) -> None:
        case, spec = self.case, self.case.spec
        (first,) = case.batches(sizes=(30,))
        metric = case.make()
        metric.update(*first)
        d = spec.width

        def like(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
            return tuple(torch.randn(*s).to(dtype) for s in shapes)

        shapes = [tuple(t.shape[1:]) for t in first]
        wider = [(4, *s[:-1], s[-1] + 1) for s in shapes]
        calls = {
            # one more dimension than the metric reads
            "shape": like(*[(4, 2, *s) for s in shapes]),
            # a width other than the first batch's (only the first argument's width changes)
            f"earlier batches had {shapes[0][-1]}": like(wider[0], *[(4, *s) for s in shapes[1:]]),
            "NaN": tuple(torch.full((4, *s), float("nan"), dtype=torch.float64) for s in shapes),
            "infinite": tuple(torch.full((4, *s), float("inf"), dtype=torch.float64) for s in shapes),
            "": like(*[(4, *s) for s in shapes], dtype=torch.bool),
            "must be a torch.Tensor": (np.zeros((4, *shapes[0])), *like(*[(4, *s) for s in shapes[1:]])),
            **case.extra_bad,
        }
        assert d == shapes[0][-1]
        assert_rejects(metric, calls, case.name)
        # The metric still takes good batches and computes on what it had.
        (second,) = case.batches(sizes=(40,))
        metric.update(*second)
        assert rel_err(metric.compute(), case.expected([first, second])) <= case.rtol
        with pytest.raises(ValueError, match="before any update"):
            case.make().compute()

    def check_copies(self) -> None:
        case = self.case
        batches = case.batches()
        metric = _feed(case.make(), batches[:-1])
        metric.persistent(True)
        restored = case.make()
        restored.persistent(True)
        restored.load_state_dict(copy.deepcopy(metric.state_dict()))
        assert same_state(state_of(metric), state_of(restored)), "state_dict"
        copies = {"clone": metric.clone(), "pickle": pickle.loads(pickle.dumps(metric)), "state_dict": restored}
        expected = case.expected(batches)
        metric.update(*batches[-1])
        assert rel_err(metric.compute(), expected) <= case.rtol
        for how, other in copies.items():
            other.update(*batches[-1])
            if how != "state_dict":  # a restored sampler draws its keys afresh: the same rows, other keys
                assert same_state(state_of(metric), state_of(other)), how
            assert float(other.compute()) == float(metric.compute()), how

    def check_half_precision(self) -> None:
        case = self.case
        batches = case.batches(dtype=torch.float16)
        fresh = case.make()
        dtypes = {k: v.dtype for k, v in fresh._defaults.items() if isinstance(v, Tensor)}
        metric = case.make().half()
        _feed(metric, batches)
        assert {k: getattr(metric, k).dtype for k in dtypes} == dtypes
        value = metric.compute()
        assert value.dtype in (torch.float32, torch.float64)
        assert rel_err(value, case.expected(batches)) <= case.half_rtol

    def check_ddp(self, run_distributed: Callable[..., list[Any]], task: Callable[..., Any]) -> None:
        """``task(rank, world_size, name, shards)`` must be a module-level function of the test file that
        looks the row up by ``name``, feeds ``shards[rank]`` and returns ``(compute(), rows fed)``."""
        case = self.case
        first, second = case.ddp_rows
        whole = case.batches(sizes=(first + second,))[0]
        shards = [
            uneven_batches_of(tuple(t[:first] for t in whole), [max(s, case.spec.min_batch) for s in (7, 60, 1)]),
            uneven_batches_of(tuple(t[first:] for t in whole), [max(s, case.spec.min_batch) for s in (150, 3)]),
        ]
        results = run_distributed(task, case.name, shards)
        assert [rows for _, rows in results] == [first, second]
        expected = case.expected(shards[0] + shards[1])
        for value, _ in results:
            assert rel_err(value, expected) <= case.rtol
        assert torch.equal(results[0][0], results[1][0])


def uneven_batches_of(args: tuple[Tensor, ...], sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """:func:`uneven_batches` for a tuple of update arguments split alike."""
    parts = [uneven_batches(t, sizes) for t in args]
    return [tuple(p[i] for p in parts) for i in range(len(parts[0]))]


def ddp_feed(case: MetricCase, shard: list[tuple[Tensor, ...]]) -> tuple[Tensor, int]:
    """What one rank does in :meth:`MetricTester.check_ddp`."""
    metric = _feed(case.make(), shard)
    return metric.compute(), sum(len(b[0]) for b in shard)
