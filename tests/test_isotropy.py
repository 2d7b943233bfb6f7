"""SIGReg, Wasserstein uniformity and IsoScore: references, streaming, DDP, validation, sanity properties."""

import math
import pickle

import numpy as np
import pytest
import torch
from _helpers import embeddings
from _helpers.harness import rel_err, uneven_batches
from ddp import run_distributed
from references_isotropy import isoscore_steps_ref, lejepa_sigreg_transcription, sigreg_ref, wasserstein_uniformity_ref
from torchmetrics import MetricCollection

from reprmetrics import IsoScore, SIGReg, WassersteinUniformity
from reprmetrics.functional import isoscore, sigreg, wasserstein_uniformity

CASES = {
    "gaussian": lambda dt: embeddings.gaussian(600, 48, dtype=dt),
    "gaussian_n_lt_d": lambda dt: embeddings.gaussian(40, 96, dtype=dt),
    "rank_deficient": lambda dt: embeddings.rank_deficient(500, 48, rank=12, dtype=dt),
    "large_offset": lambda dt: embeddings.offset(500, 48, shift=1e3, dtype=dt),
    "near_collapsed": lambda dt: embeddings.near_collapsed(500, 48, noise=1e-3, dtype=dt),
}


def lejepa_directions(d, k, seed):
    """The directions LeJEPA's SlicingUnivariateTest draws at global step ``seed`` on CPU (unnormalised)."""
    return torch.randn((d, k), generator=torch.Generator().manual_seed(seed))


# ---- SIGReg -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigreg_matches_the_definition_and_lejepas_formula(case, dtype):
    z = CASES[case](dtype)
    a = torch.randn(z.shape[1], 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    by_definition = sigreg_ref(z.double().numpy(), a.numpy())
    by_lejepa = lejepa_sigreg_transcription(z.double().numpy(), a.numpy())
    assert rel_err(by_lejepa, by_definition) <= 1e-10  # the folded weights are the symmetric trapezoid
    assert rel_err(sigreg(z, directions=a), by_definition) <= 1e-5
    assert rel_err(sigreg(z, directions=a), by_lejepa) <= 1e-5
    metric = SIGReg(directions=a)
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), by_definition) <= 1e-5


@pytest.mark.parametrize("t_max, num_points", [(3.0, 17), (5.0, 21), (1.0, 2), (2.5, 8)])
def test_sigreg_other_grids_match_the_definition(t_max, num_points):
    z = embeddings.decaying(300, 16, alpha=1.0)
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = sigreg_ref(z.numpy(), a.numpy(), t_max, num_points)
    assert rel_err(sigreg(z, directions=a, t_max=t_max, num_points=num_points), expected) <= 1e-10
    assert rel_err(lejepa_sigreg_transcription(z.numpy(), a.numpy(), t_max, num_points), expected) <= 1e-10


@pytest.mark.parametrize("seed", [0, 7])
def test_sigreg_seeded_directions_are_lejepas_and_leave_the_global_rng_alone(seed):
    z = embeddings.gaussian(400, 32, seed=5)
    expected = sigreg_ref(z.numpy(), lejepa_directions(32, 256, seed).double().numpy())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    value = sigreg(z, seed=seed)
    assert torch.equal(torch.get_rng_state(), before)
    assert rel_err(value, expected) <= 1e-5
    torch.manual_seed(999)  # the global seed does not matter
    assert sigreg(z, seed=seed).item() == value.item()
    before = torch.get_rng_state()
    metric = SIGReg(seed=seed)
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-5
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.allclose(
        metric.directions(), torch.nn.functional.normalize(lejepa_directions(32, 256, seed).double(), dim=0)
    )


def test_sigreg_normalises_given_directions():
    z = embeddings.gaussian(200, 12)
    a = torch.randn(12, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scaled = a * torch.tensor([0.01, 1.0, 3.0, 100.0, 0.5, 7.0], dtype=torch.float64)
    assert rel_err(sigreg(z, directions=scaled), sigreg(z, directions=a)) <= 1e-12
    assert SIGReg(directions=scaled).num_slices == 6


def test_sigreg_is_small_for_standard_gaussians_and_large_for_collapse():
    # For N(0, I) samples E[EP_j] = Σ_t w_t (1 − φ(t)²), whatever N.
    t = np.linspace(0, 3, 17)
    w = np.full(17, 2 * 3 / 16)
    w[[0, -1]] = 3 / 16
    phi = np.exp(-(t**2) / 2)
    expected = float(np.sum(w * phi * (1 - phi**2)))
    assert expected == pytest.approx(1.0525, abs=1e-3)
    # One sample's directions share its covariance error, so average over independent samples (sd ≈ 0.03).
    values = [float(sigreg(embeddings.gaussian(500, 16, seed=s), num_slices=16, seed=s)) for s in range(40)]
    assert np.mean(values) == pytest.approx(expected, rel=0.15)
    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn(2000, 1, generator=g, dtype=torch.float64) * torch.randn(
        1, 32, generator=g, dtype=torch.float64
    )
    point = torch.ones(2000, 32, dtype=torch.float64) + 1e-3 * torch.randn(2000, 32, generator=g, dtype=torch.float64)
    assert float(sigreg(collapsed)) > 50 * expected
    assert float(sigreg(point)) > 200 * expected
    # It grows like N for a non-Gaussian distribution: twice the samples, about twice the statistic.
    assert float(sigreg(torch.cat([point, point]))) == pytest.approx(2 * float(sigreg(point)), rel=1e-9)


def test_sigreg_low_precision_and_autocast():
    z = embeddings.gaussian(300, 16, dtype=torch.float32)
    expected = sigreg_ref(z.double().numpy(), lejepa_directions(16, 256, 0).double().numpy())
    assert (
        rel_err(
            sigreg(z.to(torch.bfloat16)),
            sigreg_ref(z.to(torch.bfloat16).double().numpy(), lejepa_directions(16, 256, 0).double().numpy()),
        )
        <= 1e-5
    )
    assert sigreg(z.half()).dtype == torch.float32 and sigreg(z.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(sigreg(z), expected) <= 1e-5
        metric = SIGReg()
        metric.update(z)
        assert rel_err(metric.compute(), expected) <= 1e-5


def test_sigreg_functional_rejects_nan():  # the class's bad batches: the shared harness (test_metric_table.py)
    with pytest.raises(ValueError, match="^sigreg: `embeddings` contains NaN"):
        sigreg(torch.full((3, 4), float("nan")))


def test_sigreg_bad_arguments():
    bad = [
        {"num_slices": 0},
        {"num_slices": 2.5},
        {"seed": "0"},
        {"seed": 1.0},
        {"t_max": 0.0},
        {"t_max": -1.0},
        {"t_max": float("inf")},
        {"t_max": float("nan")},
        {"num_points": 1},
        {"directions": torch.zeros(8, 3)},
        {"directions": torch.randn(8)},
        {"directions": torch.full((8, 3), float("nan"))},
        {"directions": "abc"},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="^SIGReg: "):
            SIGReg(**kwargs)
        with pytest.raises(ValueError, match="^sigreg: "):
            sigreg(torch.randn(10, 8), **kwargs)
    with pytest.raises(ValueError, match="D=5, but the embeddings have 8 features"):
        sigreg(torch.randn(10, 8), directions=torch.randn(5, 3))
    metric = SIGReg(directions=torch.randn(5, 3))
    with pytest.raises(ValueError, match="SIGReg: `embeddings` has 8 features but earlier batches had 5"):
        metric.update(torch.randn(10, 8))


def test_sigreg_torchmetrics_conventions():
    z = embeddings.decaying(600, 24, dtype=torch.float32)
    coll = MetricCollection({"sigreg": SIGReg(num_slices=64)})
    for b in z.split(100):
        coll.update(b)
    assert rel_err(coll.compute()["sigreg"], sigreg(z, num_slices=64)) <= 1e-6

    metric = SIGReg(num_slices=64)
    batch_value = metric(z[:100])  # forward: the value of this batch; the state accumulates
    assert rel_err(batch_value, sigreg(z[:100], num_slices=64)) <= 1e-6
    metric.update(z[100:])
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), sigreg(z, num_slices=64)) <= 1e-6
    with pytest.raises(ValueError, match="SIGReg"):
        metric(torch.randn(3, 25))  # wrong width: state kept
    assert rel_err(metric.compute(), sigreg(z, num_slices=64)) <= 1e-6
    metric.reset()
    metric.update(torch.randn(50, 10))  # reset allows a new width (seeded directions are redrawn)
    assert metric.directions().shape == (10, 64)
    assert SIGReg.full_state_update is False and SIGReg.higher_is_better is False
    assert metric.cos_sum.shape == (64, 17) and metric.cos_sum.dtype == torch.float64


def test_sigreg_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = SIGReg(num_slices=8)
    metric.update(torch.randn(50, 8))
    fig, ax = metric.plot()
    assert fig is not None and ax is not None


def _split_for(rank, z):
    # Uneven split: rank 0 gets 3 batches of the first 40 %, rank 1 the rest in 2 batches.
    cut = int(0.4 * len(z))
    return z[:cut].split(cut // 3 + 1) if rank == 0 else z[cut:].split((len(z) - cut) // 2 + 1)


def _ddp_sigreg(rank, world_size, z):
    metric = SIGReg(num_slices=32, seed=4)
    mine = _split_for(rank, z)
    for b in mine:
        metric.update(b)
    return metric.compute(), sum(len(b) for b in mine)


def test_sigreg_ddp_two_processes_equal_one_process_on_all_data():
    z = embeddings.decaying(901, 24, dtype=torch.float64)
    results = run_distributed(_ddp_sigreg, z)
    single = sigreg(z, num_slices=32, seed=4)
    assert results[0][1] != results[1][1] and results[0][1] + results[1][1] == len(z)
    for value, _ in results:
        assert rel_err(value, single) <= 1e-6
    assert torch.equal(results[0][0], results[1][0])


@pytest.mark.gpu
def test_sigreg_cuda_matches_cpu():
    z = embeddings.gaussian(2048, 64, dtype=torch.float32)
    metric = SIGReg().cuda()
    for b in z.cuda().split(256):
        metric.update(b)
    assert metric.compute().device.type == "cuda"
    expected = sigreg_ref(z.double().numpy(), lejepa_directions(64, 256, 0).double().numpy())
    assert rel_err(metric.compute().cpu(), expected) <= 1e-5
    assert rel_err(sigreg(z.cuda()).cpu(), expected) <= 1e-5


# ---- Wasserstein uniformity -------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wasserstein_uniformity_matches_numpy_reference(case, dtype):
    z = CASES[case](dtype)
    expected = wasserstein_uniformity_ref(z.double().numpy())
    assert rel_err(wasserstein_uniformity(z), expected) <= 1e-6
    metric = WassersteinUniformity()
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-6


def test_wasserstein_uniformity_tends_to_zero_for_uniform_points_as_d_grows():
    # Uniform on the sphere: normalised Gaussians. With N = 40·D² samples the sampling error
    # (W₂² ≈ D/(4N) + 1/N) shrinks as D grows, and the value follows it.
    g = torch.Generator().manual_seed(0)
    values = []
    for d in (4, 16, 64):
        n = 40 * d * d
        w = float(wasserstein_uniformity(torch.randn(n, d, generator=g, dtype=torch.float64)))
        assert w == pytest.approx(math.sqrt(d / (4 * n) + 1 / n), rel=0.25)
        values.append(w)
    assert values[0] > values[1] > values[2] and values[2] < 0.015
    # A design with mean exactly 0 and covariance exactly I/D (the cross-polytope ±e_k): W₂ = 0.
    for d in (3, 50):
        eye = torch.eye(d, dtype=torch.float64)
        assert float(wasserstein_uniformity(torch.cat([eye, -eye]) * 3.0)) <= 1e-7


def test_wasserstein_uniformity_sees_dimensional_collapse():
    # Points uniform on a k-dimensional great sphere of S^{D-1}: μ = 0, Σ = P_k / k, so
    # W₂² = 1 + 1 − (2/√D)·k·(1/√k) = 2 − 2√(k/D); Wang & Isola's uniformity barely moves between these.
    d = 64
    for k in (1, 4, 16, 64):
        eye = torch.eye(d, dtype=torch.float64)[:k]
        points = torch.cat([eye, -eye])
        assert float(wasserstein_uniformity(points)) == pytest.approx(math.sqrt(2 - 2 * math.sqrt(k / d)), abs=1e-7)
    assert float(wasserstein_uniformity(torch.ones(10, d) * 5)) == pytest.approx(math.sqrt(2), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(4000, d, generator=g, dtype=torch.float64)
    half = full.clone()
    half[:, d // 2 :] = 0  # half the dimensions unused
    assert float(wasserstein_uniformity(half)) > 3 * float(wasserstein_uniformity(full))


def test_wasserstein_uniformity_degenerate_inputs_are_finite():
    assert float(wasserstein_uniformity(torch.randn(1, 8))) == pytest.approx(math.sqrt(2), rel=1e-6)  # one point
    zeros = wasserstein_uniformity(torch.zeros(5, 4))  # zero rows stay at the origin: μ = 0, Σ = 0 -> W₂ = 1
    assert float(zeros) == pytest.approx(1.0)
    offset = torch.full((300, 16), 1e3, dtype=torch.float32) + torch.randn(300, 16) * 1e-3
    assert math.isfinite(float(wasserstein_uniformity(offset)))
    assert rel_err(wasserstein_uniformity(offset), wasserstein_uniformity_ref(offset.double().numpy())) <= 1e-6


# ---- IsoScore -----------------------------------------------------------------------------------------
def _isoscore_package(z):
    package = pytest.importorskip("IsoScore.IsoScore")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package calls torch.tensor() on a tensor-like input
        return float(package.IsoScore(np.asarray(z, dtype=np.float64)))


ISOSCORE_CASES = {**CASES, "decaying": lambda dt: embeddings.decaying(2000, 64, alpha=1.0, dtype=dt)}


@pytest.mark.parametrize("case", list(ISOSCORE_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_isoscore_matches_the_paper_steps_and_the_isoscore_package(case, dtype):
    z = ISOSCORE_CASES[case](dtype)
    steps = isoscore_steps_ref(z.double().numpy())
    package = _isoscore_package(z.double().numpy())
    ours = isoscore(z)
    assert rel_err(ours, steps) <= 1e-6
    metric = IsoScore()
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), steps) <= 1e-6
    if case == "near_collapsed":
        # IsoScore ≈ 4e-8 here. The package computes √D in float32 (torch.sqrt of an integer tensor)
        # and evaluates ((D − δ²(D − √D))² − D) / (D(D − 1)), which cancels: its absolute error is
        # about 1e-7·(D − √D)/D², so near 0 only an absolute comparison is meaningful.
        assert abs(float(ours) - package) <= 1e-7
    else:
        assert rel_err(ours, package) <= 1e-6


def test_isoscore_known_values():
    d = 10
    for k in (1, 3, 10):  # k equal-variance directions out of D: IsoScore = (k − 1)/(D − 1) exactly
        eye = torch.eye(d, dtype=torch.float64)[:k]
        assert float(isoscore(torch.cat([eye, -eye]) + 7.0)) == pytest.approx((k - 1) / (d - 1), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    assert float(isoscore(torch.randn(50000, 8, generator=g, dtype=torch.float64))) > 0.999
    assert float(isoscore(torch.randn(500, 1, generator=g) * torch.randn(1, 8, generator=g))) == pytest.approx(
        0.0, abs=1e-6
    )
    # Invariant to rotation, scale and translation.
    z = embeddings.decaying(800, 12)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert float(isoscore(3.0 * z @ q + 5.0)) == pytest.approx(float(isoscore(z)), rel=1e-10)


def test_isoscore_collapse_to_a_point_is_zero_not_isotropic_rounding_noise():
    # One point far from the origin, stored in float32: what varies is rounding, which is isotropic
    # but no signal. The covariance is below the input-precision tolerance, so IsoScore and NESum read 0.
    from reprmetrics.functional import nesum

    g = torch.Generator().manual_seed(0)
    point = (1e3 + torch.randn(1, 32, generator=g, dtype=torch.float64)) * torch.ones(400, 1, dtype=torch.float64)
    assert float(isoscore(point)) == 0.0 and float(nesum(point)) == 0.0
    # Spread of about one float32 ulp at 1e3 (6e-5): the rows differ only by how they were rounded.
    rounded = (point + 1e-4 * torch.randn(400, 32, generator=g, dtype=torch.float64)).float()
    assert len(torch.unique(rounded, dim=0)) > 100
    assert float(isoscore(rounded.double())) > 0.9  # read as float64 data, that spread is isotropic
    assert float(isoscore(rounded)) == 0.0 and float(nesum(rounded)) == 0.0
    metric = IsoScore()
    for b in rounded.split(100):
        metric.update(b)
    assert float(metric.compute()) == 0.0
    assert float(isoscore(torch.ones(5, 3))) == 0.0


def test_isoscore_bad_input():
    with pytest.raises(ValueError, match="^isoscore: IsoScore needs at least 2 features"):
        isoscore(torch.randn(10, 1))
    with pytest.raises(ValueError, match="^isoscore: `embeddings` needs at least 2 rows"):
        isoscore(torch.randn(1, 5))
    with pytest.raises(ValueError, match="^IsoScore: IsoScore needs at least 2 features"):
        IsoScore(num_features=1)
    # A D = 1 batch is accepted like by every other metric (a MetricCollection never applies a batch to
    # some members only); IsoScore says at compute that it needs D >= 2.
    metric = IsoScore()
    metric.update(torch.randn(10, 1))
    with pytest.raises(ValueError, match="^IsoScore: IsoScore needs at least 2 features"):
        metric.compute()
    metric = IsoScore()
    metric.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metric.compute()


# ---- shared: bad input, conventions, DDP for the moment-based classes --------------------------------
# Bad batches, and compute() before any update: the shared harness (test_metric_table.py).
@pytest.mark.parametrize("cls", [WassersteinUniformity, IsoScore])
def test_moment_classes_num_features_must_be_positive(cls):
    with pytest.raises(ValueError, match="num_features"):
        cls(num_features=0)


@pytest.mark.parametrize("cls, fn", [(WassersteinUniformity, wasserstein_uniformity), (IsoScore, isoscore)])
def test_moment_classes_torchmetrics_conventions(cls, fn):
    z = embeddings.decaying(600, 24, dtype=torch.float32) + 3.0
    coll = MetricCollection({"m": cls()})
    for b in z.split(100):
        coll.update(b)
    assert rel_err(coll.compute()["m"], fn(z)) <= 1e-6
    metric = cls(num_features=24)
    batch_value = metric(z[:100])
    assert rel_err(batch_value, fn(z[:100])) <= 1e-6
    metric.update(z[100:])
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), fn(z)) <= 1e-6
    with pytest.raises(ValueError, match=cls.__name__):
        metric(torch.randn(3, 25))
    assert rel_err(metric.compute(), fn(z)) <= 1e-6
    metric = cls()
    for b in z.split(150):
        assert torch.isfinite(metric(b))  # forward with a lazily shaped state
    assert rel_err(metric.compute(), fn(z)) <= 1e-6
    metric.reset()
    metric.update(torch.randn(50, 6))
    assert metric.moments.shape == (9, 6)
    assert cls.full_state_update is False
    assert cls.higher_is_better is (cls is IsoScore)


def test_zero_rows_give_finite_values():
    z = torch.randn(50, 8)
    z[3] = 0
    assert torch.isfinite(wasserstein_uniformity(z)) and torch.isfinite(isoscore(z))


def _ddp_moments(rank, world_size, z):
    mine = _split_for(rank, z)
    metrics = [WassersteinUniformity(), IsoScore()]
    for b in mine:
        for m in metrics:
            m.update(b)
    return [m.compute() for m in metrics], sum(len(b) for b in mine)


def test_moment_classes_ddp_two_processes_equal_one_process_on_all_data():
    z = embeddings.decaying(901, 24, dtype=torch.float64) + 1e3  # far from the origin: the merge must be exact
    results = run_distributed(_ddp_moments, z)
    singles = [wasserstein_uniformity(z), isoscore(z)]
    assert results[0][1] != results[1][1] and results[0][1] + results[1][1] == len(z)
    for values, _ in results:
        for value, single in zip(values, singles):
            assert rel_err(value, single) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


@pytest.mark.gpu
def test_moment_classes_cuda_match_cpu():
    z = embeddings.decaying(2048, 128, dtype=torch.float32)
    for cls, ref in ((WassersteinUniformity, wasserstein_uniformity_ref), (IsoScore, isoscore_steps_ref)):
        metric = cls().cuda()
        for b in z.cuda().split(256):
            metric.update(b)
        assert metric.compute().device.type == "cuda"
        assert rel_err(metric.compute().cpu(), ref(z.double().numpy())) <= 1e-6


def test_metrics_table_example_reads_the_new_metrics(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "metrics_table.py")
    spec = importlib.util.spec_from_file_location("metrics_table_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--samples", "600", "--dim", "32", "--batch", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[2].split("|")]
    rows = {line.split("|")[0].strip(): [float(c) for c in line.split("|")[1:]] for line in lines[4:] if "|" in line}
    for name in ("NESum ↑", "coding rate ↑", "W-uniformity ↓", "SIGReg ↓", "IsoScore ↑"):
        assert name in header
    column = {name: header.index(name) - 1 for name in header[1:]}
    healthy, dimensional, complete = (rows[k] for k in rows)
    # Collapse towards one direction: coding rate falls, Wasserstein uniformity rises towards √2.
    assert healthy[column["coding rate ↑"]] > dimensional[column["coding rate ↑"]] > complete[column["coding rate ↑"]]
    assert (
        healthy[column["W-uniformity ↓"]]
        < dimensional[column["W-uniformity ↓"]]
        < complete[column["W-uniformity ↓"]]
        <= math.sqrt(2) + 1e-3
    )
    assert healthy[column["IsoScore ↑"]] > dimensional[column["IsoScore ↑"]]
