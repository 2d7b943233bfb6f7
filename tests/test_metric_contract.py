"""What every Metric class guarantees, checked on each row of the metric table.

- accumulators keep their dtype whatever ``.to(dtype)``, ``.half()``, ``.bfloat16()`` or ``set_dtype``
  the metric receives, and its values do not move;
- ``forward()`` never loses the accumulated state, list states included, when the batch's own value
  cannot be computed;
- a batch with no rows is a no-op, and every metric accepts the same batches (zero rows, D = 1 for
  point metrics), so a ``MetricCollection`` never applies a batch to some members only;
- unsupported tensors (sparse, meta, float8) raise ``ValueError`` naming the metric, state unchanged.
"""

import math

import pytest
import torch
from _helpers.harness import same_state, state_of
from _helpers.metrics import METRIC_SPECS, SPECS_BY_NAME
from torchmetrics import MetricCollection

NAMES = [spec.name for spec in METRIC_SPECS]


def _fed(spec, batches, **kwargs):
    metric = spec.make(**kwargs)
    for args in batches:
        metric.update(*args)
    return metric


def _batches(spec, seed=0, sizes=(60, 40)):
    g = torch.Generator().manual_seed(seed)
    return [spec.batch(n, g, dtype=torch.float32) for n in sizes]


@pytest.mark.parametrize("cast", ["to_half", "half", "bfloat16", "set_dtype", "to_double"])
@pytest.mark.parametrize("name", NAMES)
def test_accumulators_keep_their_dtype_and_values_do_not_move(name, cast):
    spec = SPECS_BY_NAME[name]
    batches = _batches(spec)
    reference = _fed(spec, batches)
    metric = spec.make()
    dtypes = {k: v.dtype for k, v in metric._defaults.items() if isinstance(v, torch.Tensor)}
    {
        "to_half": lambda m: m.to(torch.float16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "set_dtype": lambda m: m.set_dtype(torch.float16),
        "to_double": lambda m: m.to(dtype=torch.float64),
    }[cast](metric)
    assert {k: metric._defaults[k].dtype for k in dtypes} == dtypes
    for args in batches:
        metric.update(*args)
    assert {k: getattr(metric, k).dtype for k in dtypes} == dtypes
    assert float(metric.compute()) == pytest.approx(float(reference.compute()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_forward_whose_batch_value_fails_keeps_the_accumulated_state(name):
    spec = SPECS_BY_NAME[name]
    metric = _fed(spec, _batches(spec))
    before = state_of(metric)
    tiny = spec.batch(max(spec.too_few, spec.min_batch), torch.Generator().manual_seed(5), dtype=torch.float32)
    if spec.too_few >= 1:
        with pytest.raises(ValueError, match=name):
            metric(*tiny)  # this batch alone is too small for a value
        assert same_state(before, state_of(metric)), "forward() lost or changed the accumulated state"
    expected = _fed(spec, [*_batches(spec), tiny] if spec.too_few == 0 else _batches(spec))
    if spec.too_few == 0:
        metric(*tiny)
    assert float(metric.compute()) == pytest.approx(float(expected.compute()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_is_a_no_op(name):
    spec = SPECS_BY_NAME[name]
    batches = _batches(spec)
    reference = _fed(spec, batches)
    metric = _fed(spec, [spec.empty(torch.float32), batches[0], spec.empty(torch.float32), batches[1]])
    assert float(metric.compute()) == pytest.approx(float(reference.compute()), rel=1e-12, abs=1e-15)


POINT_METRICS = [spec.name for spec in METRIC_SPECS if spec.kind == "points"]


def test_point_metrics_accept_the_same_batches_zero_rows_and_one_dimension():
    """One batch reaches every member of a collection or none: the metrics agree on what is valid."""
    z = torch.randn(50, 8)
    z[:3] = 0.0  # zero rows: no direction; they stay zero wherever rows are normalised
    collection = MetricCollection({name: SPECS_BY_NAME[name].make() for name in POINT_METRICS})
    collection.update(z)
    values = {k: float(v) for k, v in collection.compute().items()}
    assert all(math.isfinite(v) for v in values.values()), values
    one_d = MetricCollection({name: SPECS_BY_NAME[name].make() for name in POINT_METRICS})
    one_d.update(torch.randn(50, 1))  # every member takes it; IsoScore says at compute that it needs D >= 2
    assert all(int(m._update_count) == 1 for m in one_d.values())
    with pytest.raises(ValueError, match="IsoScore.*D"):
        one_d["IsoScore"].compute()
    for name in set(POINT_METRICS) - {"IsoScore", "AlphaReQ"}:
        assert math.isfinite(float(one_d[name].compute())), name


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda z: z.to_sparse(), "dense"),
        (lambda z: torch.empty(z.shape, device="meta"), "meta"),
        (lambda z: z.to(torch.float8_e4m3fn), "float8"),
        (lambda z: z.to(torch.complex64), "real-valued"),
    ],
    ids=["sparse", "meta", "float8", "complex"],
)
@pytest.mark.parametrize("name", POINT_METRICS)
def test_unsupported_tensors_raise_value_error_and_leave_state(name, bad, match):
    spec = SPECS_BY_NAME[name]
    metric = _fed(spec, _batches(spec))
    before = state_of(metric)
    with pytest.raises(ValueError, match=f"{name}.*{match}"):
        metric.update(bad(torch.randn(10, spec.width)))
    assert same_state(before, state_of(metric))
