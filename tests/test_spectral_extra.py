"""NESum and coding rate: numpy references, streaming, DDP, validation and sanity properties."""

import math
import pickle

import pytest
import torch
from _helpers import embeddings
from _helpers.harness import rel_err, uneven_batches
from ddp import run_distributed
from references_isotropy import coding_rate_ref, coding_rate_slogdet_ref, nesum_ref
from torchmetrics import MetricCollection

from reprmetrics import CodingRate, NESum
from reprmetrics.functional import coding_rate, nesum

CASES = embeddings.SPECTRAL_CASES


# ---- NESum ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nesum_matches_numpy_reference(case, dtype):
    z = CASES[case](dtype)
    expected = nesum_ref(z.double().numpy())
    assert rel_err(nesum(z), expected) <= 1e-6
    metric = NESum()
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-6


def test_nesum_of_an_isotropic_gaussian_is_about_d():
    g = torch.Generator().manual_seed(0)
    for d in (4, 16, 32):
        n = 4000 * d
        value = float(nesum(torch.randn(n, d, generator=g, dtype=torch.float64)))
        assert value == pytest.approx(d, rel=0.1)
        assert value == pytest.approx(d / (1 + math.sqrt(d / n)) ** 2, rel=0.03)  # λ₁'s sampling excess
    eye = torch.eye(12, dtype=torch.float64)
    assert float(nesum(torch.cat([eye, -eye]) + 100.0)) == pytest.approx(12.0, rel=1e-12)  # covariance exactly ∝ I


def test_nesum_known_values_and_degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(300, 1, generator=g, dtype=torch.float64) * torch.randn(1, 20, generator=g, dtype=torch.float64)
    assert float(nesum(line + 1e3)) == pytest.approx(1.0, abs=1e-9)
    scales = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64) * scales.sqrt()
    assert float(nesum(torch.cat([eye, -eye]))) == pytest.approx(8.0 / 4.0, rel=1e-12)  # Σλ/λ₁ = 8/4
    assert float(nesum(torch.ones(10, 5) * 3)) == 0.0  # identical embeddings: no direction
    metric = NESum()
    metric.update(torch.ones(4, 3))
    assert float(metric.compute()) == 0.0
    z = embeddings.decaying(500, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert float(nesum(2.5 * z @ q - 7.0)) == pytest.approx(float(nesum(z)), rel=1e-10)


# ---- coding rate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps, normalize", [(0.5, True), (0.1, True), (2.0, False)])
def test_coding_rate_matches_numpy_references(case, dtype, eps, normalize):
    z = CASES[case](dtype)
    expected = coding_rate_ref(z.double().numpy(), eps, normalize)
    assert rel_err(coding_rate_slogdet_ref(z.double().numpy(), eps, normalize), expected) <= 1e-9
    assert rel_err(coding_rate(z, eps=eps, normalize=normalize), expected) <= 1e-6
    metric = CodingRate(eps=eps, normalize=normalize)
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-6


def test_coding_rate_known_values():
    d, eps = 8, 0.5
    assert float(coding_rate(torch.ones(100, d, dtype=torch.float64) * 3)) == pytest.approx(
        0.5 * math.log(1 + d / eps**2), rel=1e-9
    )
    # D orthonormal rows: ZᵀZ = I, so R = (D/2) log(1 + 1/ε²).
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    assert float(coding_rate(q)) == pytest.approx(d / 2 * math.log(1 + 1 / eps**2), rel=1e-12)
    assert float(coding_rate(torch.zeros(5, 4))) == 0.0  # zero rows stay zero
    assert float(coding_rate(torch.zeros(5, 4), normalize=False)) == 0.0


def test_coding_rate_grows_with_rank():
    g = torch.Generator().manual_seed(0)
    values = []
    for rank in (1, 2, 4, 8, 16, 32):
        z = torch.randn(2000, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, 32, generator=g, dtype=torch.float64
        )
        values.append(float(coding_rate(z)))
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_coding_rate_bad_arguments_and_input():
    for kwargs in ({"eps": 0.0}, {"eps": -1.0}, {"eps": float("inf")}, {"eps": float("nan")}, {"normalize": 1}):
        with pytest.raises(ValueError, match="^coding_rate: "):
            coding_rate(torch.randn(5, 3), **kwargs)
        with pytest.raises(ValueError, match="^CodingRate: "):
            CodingRate(**kwargs)
    with pytest.raises(ValueError, match="^coding_rate: `embeddings` contains NaN"):
        coding_rate(torch.full((3, 2), float("nan")))


# ---- shared ----------------------------------------------------------------------------------------------
# Bad batches, and compute() before any update: the shared harness (test_metric_table.py).
@pytest.mark.parametrize("cls", [NESum, CodingRate])
def test_num_features_must_be_positive(cls):
    with pytest.raises(ValueError, match="num_features"):
        cls(num_features=0)


def test_nesum_needs_two_samples():
    with pytest.raises(ValueError, match="^nesum: `embeddings` needs at least 2 rows"):
        nesum(torch.randn(1, 4))
    metric = NESum()
    metric.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metric.compute()
    one = CodingRate()
    one.update(torch.randn(1, 4))
    assert float(one.compute()) == pytest.approx(0.5 * math.log(1 + 4 / 0.25), rel=1e-6)


@pytest.mark.parametrize("cls, fn", [(NESum, nesum), (CodingRate, coding_rate)])
def test_torchmetrics_conventions(cls, fn):
    z = embeddings.decaying(600, 32, dtype=torch.float32) + 2.0
    coll = MetricCollection({"m": cls()})
    for b in z.split(100):
        coll.update(b)
    assert rel_err(coll.compute()["m"], fn(z)) <= 1e-6
    metric = cls(num_features=32)
    assert rel_err(metric(z[:100]), fn(z[:100])) <= 1e-6  # forward: this batch's value
    metric.update(z[100:])
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), fn(z)) <= 1e-6
    with pytest.raises(ValueError, match=cls.__name__):
        metric(torch.randn(3, 31))
    assert rel_err(metric.compute(), fn(z)) <= 1e-6
    lazy = cls()
    for b in z.split(150):
        assert torch.isfinite(lazy(b))
    assert rel_err(lazy.compute(), fn(z)) <= 1e-6
    lazy.reset()
    lazy.update(torch.randn(10, 6))
    assert torch.isfinite(lazy.compute())
    assert cls.full_state_update is False and cls.higher_is_better is True


def test_low_precision_and_autocast():
    z = embeddings.decaying(500, 24, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(nesum(z), nesum_ref(z.double().numpy())) <= 1e-6
        assert rel_err(coding_rate(z), coding_rate_ref(z.double().numpy())) <= 1e-6
        for cls, ref in ((NESum, nesum_ref), (CodingRate, coding_rate_ref)):
            metric = cls()
            metric.update(z)
            assert rel_err(metric.compute(), ref(z.double().numpy())) <= 1e-6
    assert nesum(z.half()).dtype == torch.float32 and coding_rate(z.double()).dtype == torch.float64


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    for cls in (NESum, CodingRate):
        metric = cls()
        metric.update(torch.randn(50, 8))
        fig, ax = metric.plot()
        assert fig is not None and ax is not None


def _ddp_extra(rank, world_size, z):
    cut = int(0.4 * len(z))
    mine = z[:cut].split(cut // 3 + 1) if rank == 0 else z[cut:].split((len(z) - cut) // 2 + 1)
    metrics = [NESum(), CodingRate()]
    for b in mine:
        for m in metrics:
            m.update(b)
    return [m.compute() for m in metrics], sum(len(b) for b in mine)


def test_ddp_two_processes_equal_one_process_on_all_data():
    z = embeddings.decaying(901, 48, dtype=torch.float64) + 1e3
    results = run_distributed(_ddp_extra, z)
    singles = [nesum(z), coding_rate(z)]
    assert results[0][1] != results[1][1] and results[0][1] + results[1][1] == len(z)
    for values, _ in results:
        for value, single in zip(values, singles):
            assert rel_err(value, single) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    z = embeddings.decaying(2048, 256, dtype=torch.float32)
    for cls, ref in ((NESum, nesum_ref), (CodingRate, coding_rate_ref)):
        metric = cls().cuda()
        for b in z.cuda().split(256):
            metric.update(b)
        assert metric.compute().device.type == "cuda"
        assert rel_err(metric.compute().cpu(), ref(z.double().numpy())) <= 1e-6
