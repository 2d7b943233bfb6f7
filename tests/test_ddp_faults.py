"""Fault injection under a real 2-process gloo group: no rank aborts, hangs or gets a poisoned metric.

Every Metric class × {a rank that saw no rows, a rank whose rows were all non-finite, a compute that
fails on the union} × dist_sync_on_step False/True, on the test run's shared process pool. Each
case ends with the metric still usable: more batches, then the value one process gets on the union.
"""

import math

import pytest
import torch
from _helpers.ddp import run_distributed
from _helpers.metrics import METRIC_SPECS, SPECS_BY_NAME
from torchmetrics import Metric

import reprmetrics as rm

CASES = ("no_rows", "nonfinite_rows", "union_too_small")


def _value(metric):
    value = metric.compute()
    return float(value)


def _attempt(fn):
    """``("ok", value)`` or ``("error", message)``: what a rank saw."""
    try:
        return ("ok", fn())
    except ValueError as error:
        return ("error", str(error))


def _feed(metric, args, on_step):
    """update(), or forward() with dist_sync_on_step (whose batch value is synced across ranks)."""
    if on_step:
        return _attempt(lambda: float(metric(*args)))
    metric.update(*args)
    return ("ok", None)


def _fault_case(rank, world_size, name, case, on_step, batches, extra):
    """Rank 0 feeds ``batches``; rank 1 feeds nothing, NaN rows, or (union_too_small) nothing either."""
    spec = SPECS_BY_NAME[name]
    metric = spec.make(dist_sync_on_step=on_step)
    seen = []
    for args in batches:
        if rank == 0:
            seen.append(_feed(metric, args, on_step))
        elif case == "nonfinite_rows":
            seen.append(
                _attempt(
                    lambda args=args: (
                        metric(*spec.nonfinite(len(args[0])))
                        if on_step
                        else metric.update(*spec.nonfinite(len(args[0])))
                    )
                )
            )
        elif on_step:  # forward() is collective: the rank without rows still takes part
            seen.append(_feed(metric, spec.empty(), on_step))
    first = _attempt(lambda: _value(metric))
    # The metric stays usable on every rank: more data (split over both ranks), then the value.
    for i, args in enumerate(extra):
        if i % 2 == rank:
            _feed(metric, args, on_step)
        elif on_step:
            _feed(metric, spec.empty(), on_step)
    after = _attempt(lambda: _value(metric))
    return {"seen": seen, "first": first, "after": after, "synced": metric._is_synced}


def _reference(name, batches):
    """One process on the union, or the error it raises."""
    metric = SPECS_BY_NAME[name].make()
    for args in batches:
        metric.update(*args)
    return _attempt(lambda: _value(metric))


def _close(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))


@pytest.mark.parametrize("on_step", [False, True], ids=["sync_on_compute", "sync_on_step"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", [spec.name for spec in METRIC_SPECS])
def test_every_metric_survives_ranks_without_rows_and_failed_computes(name, case, on_step):
    spec = SPECS_BY_NAME[name]
    g = torch.Generator().manual_seed(0)
    rows = spec.too_few if case == "union_too_small" else 40
    batches = [spec.batch(rows, g)] if rows else []
    if case != "union_too_small":
        batches.append(spec.batch(24, g))
    extra = [spec.batch(30, g), spec.batch(26, g)]
    rank0, rank1 = run_distributed(_fault_case, name, case, on_step, batches, extra)

    # forward() keeps out a batch whose own value failed: what was accumulated is what rank 0 kept.
    kept = [b for b, s in zip(batches, rank0["seen"]) if s[0] == "ok"] if on_step else batches
    # Both ranks computed the same thing: one process's value on the union, or the same error.
    expected_first = _reference(name, kept)
    for rank in (rank0, rank1):
        assert not rank["synced"]
        assert rank["first"][0] == expected_first[0], (rank["first"], expected_first)
        assert _close(rank["first"][1], expected_first[1]), (rank["first"], expected_first)
    if case == "union_too_small":
        assert expected_first[0] == "error" and name in expected_first[1]
    # Usable afterwards: the value of everything accumulated.
    expected_after = _reference(name, kept + extra)
    assert rank0["after"][0] == rank1["after"][0] == "ok", (rank0["after"], rank1["after"])
    assert _close(rank0["after"][1], expected_after[1]) and _close(rank1["after"][1], expected_after[1]), (
        rank0["after"],
        rank1["after"],
        expected_after,
    )
    if on_step:
        # Each forward() returned the value of that step's union (rank 0's batch; rank 1 had none).
        for args, (kind, value) in zip(batches, rank0["seen"]):
            reference = _reference(name, [args])
            assert kind == reference[0] and _close(value, reference[1]), (kind, value, reference)
        if case == "nonfinite_rows":
            assert all(kind == "error" and "NaN" in message for kind, message in rank1["seen"])


def test_every_metric_class_is_in_the_table():
    exported = {n for n in rm.__all__ if isinstance(getattr(rm, n), type) and issubclass(getattr(rm, n), Metric)}
    assert exported == set(SPECS_BY_NAME), exported ^ set(SPECS_BY_NAME)


def _widths_disagree(rank, world_size):
    metric = rm.RankMe()
    metric.update(torch.randn(10, 8 + rank))
    return _attempt(lambda: _value(metric)), metric._is_synced


def test_ranks_with_different_widths_get_the_same_clear_error():
    (a, synced_a), (b, synced_b) = run_distributed(_widths_disagree)
    assert a == b and a[0] == "error" and "different shapes" in a[1] and "RankMe" in a[1]
    assert not synced_a and not synced_b
