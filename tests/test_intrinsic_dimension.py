import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from _helpers import embeddings
from _helpers.harness import rel_err, uneven_batches
from ddp import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from references_intrinsic_dimension import knn_distances_ref, ldreg_ref_torch, lid_ref, mle_ref, twonn_ref
from torchmetrics import MetricCollection

from reprmetrics.functional.intrinsic_dimension import (
    LID_CAP,
    ldreg_regularizer,
    local_intrinsic_dimension,
    mle_dimension,
    twonn_dimension,
)
from reprmetrics.intrinsic_dimension import LocalIntrinsicDimension, MLEDimension, TwoNN

LOG_CAP = math.log(LID_CAP)


def swiss_roll(n, ambient=64, seed=0, dtype=torch.float64):
    """A 2-D curved manifold (the Swiss roll) isometrically embedded in `ambient` dimensions."""
    g = torch.Generator().manual_seed(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    height = 21 * torch.rand(n, generator=g, dtype=torch.float64)
    roll = torch.stack([t * torch.cos(t), height, t * torch.sin(t)], dim=1)
    basis, _ = torch.linalg.qr(torch.randn(ambient, 3, generator=g, dtype=torch.float64))
    return (roll @ basis.T).to(dtype)


CASES = {
    "subspace_5d_in_64d": lambda dt: embeddings.rank_deficient(1200, 64, rank=5, dtype=dt),
    "swiss_roll_in_64d": lambda dt: swiss_roll(1200, dtype=dt),
    "gaussian_16d": lambda dt: embeddings.gaussian(600, 16, dtype=dt),
    "large_offset": lambda dt: embeddings.offset(600, 32, shift=1e3, dtype=dt),
    "near_collapsed": lambda dt: embeddings.near_collapsed(600, 32, noise=1e-3, dtype=dt),
}


def max_rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# ----------------------------------------------------------------------------------------------
# values against independent references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-9)])
@pytest.mark.parametrize("estimator", ["mle", "mom"])
def test_lid_matches_float64_reference(case, dtype, tol, estimator):
    # float32 input: distances are exact for the given float32 values, so the reference on the same
    # values cast to float64 agrees to float64 round-off, not float32's.
    x = CASES[case](dtype)
    expected = lid_ref(x.double().numpy(), 20, estimator)
    lid = local_intrinsic_dimension(x, k=20, estimator=estimator)
    assert lid.dtype == dtype and lid.shape == (len(x),)
    assert max_rel_err(lid.double(), expected) <= (tol if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("estimator", ["mle", "mom"])
@pytest.mark.parametrize("k", [2, 5, 50])
def test_lid_with_a_reference_set(estimator, k):
    x = embeddings.gaussian(150, 12, seed=1)
    other = embeddings.gaussian(300, 12, seed=2)
    reference = torch.cat([other[:100], x, other[100:]])
    for exclude_self in (False, True):
        lid = local_intrinsic_dimension(x, k=k, reference=reference, estimator=estimator, exclude_self=exclude_self)
        if not exclude_self:
            assert torch.all(lid == 0) if estimator == "mle" else torch.all(lid >= 0)  # own copy at distance 0
            continue
        expected = lid_ref(x.numpy(), k, estimator, reference.numpy(), exclude_self)
        assert max_rel_err(lid, expected) <= 1e-9
    # The own copy dropped == the point excluded by index from x ∪ other.
    together = local_intrinsic_dimension(torch.cat([x, other]), k=k, estimator=estimator)[: len(x)]
    assert max_rel_err(lid, together) <= 1e-12
    # A query with no copy in the reference keeps its nearest match.
    lid_other = local_intrinsic_dimension(x, k=k, reference=other, estimator=estimator, exclude_self=True)
    assert max_rel_err(lid_other, lid_ref(x.numpy(), k, estimator, other.numpy(), False)) <= 1e-9


@pytest.mark.parametrize("case", list(CASES))
def test_twonn_and_mle_match_numpy_references(case):
    x = CASES[case](torch.float64)
    assert rel_err(twonn_dimension(x), twonn_ref(x.numpy())) <= 1e-9
    assert rel_err(twonn_dimension(x, 0.3), twonn_ref(x.numpy(), 0.3)) <= 1e-9
    assert rel_err(mle_dimension(x, k=20), mle_ref(x.numpy(), 20)) <= 1e-9
    assert rel_err(mle_dimension(x, k=7), mle_ref(x.numpy(), 7)) <= 1e-9


@pytest.mark.parametrize("case,true_dim", [("subspace_5d_in_64d", 5), ("swiss_roll_in_64d", 2)])
def test_twonn_and_mle_match_scikit_dimension(case, true_dim):
    skdim = pytest.importorskip("skdim")
    x = CASES[case](torch.float64)
    for fraction in (0.1, 0.25):
        expected = skdim.id.TwoNN(discard_fraction=fraction).fit(x.numpy()).dimension_
        assert rel_err(twonn_dimension(x, fraction), expected) <= 1e-4
    for k in (5, 20):
        expected = skdim.id.MLE().fit(x.numpy(), n_neighbors=k).dimension_
        assert rel_err(mle_dimension(x, k), expected) <= 1e-4
    # The estimators see the manifold's dimension, not the ambient 64.
    assert abs(twonn_dimension(x).item() - true_dim) < 0.25 * true_dim
    assert abs(mle_dimension(x).item() - true_dim) < 0.25 * true_dim


def test_twonn_drops_duplicates_like_scikit_dimension():
    """skdim drops points with r1 = 0. Its own distances (the ‖a‖² + ‖b‖² − 2a·b expansion) put some
    duplicates at ~2e-7 instead of 0, so it is given exact (r1, r2) here (``dist=True``)."""
    skdim = pytest.importorskip("skdim")
    x = embeddings.rank_deficient(800, 40, rank=4)
    x = torch.cat([x, x[:50]])  # 100 points now have r1 = 0
    r1_r2 = knn_distances_ref(x.numpy(), 2)
    assert np.sum(r1_r2[:, 0] == 0) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fraction in (0.1, 0.3):
            expected = skdim.id.TwoNN(discard_fraction=fraction, dist=True).fit(r1_r2).dimension_
            assert rel_err(twonn_dimension(x, fraction), expected) <= 1e-9


def test_lid_recovers_the_dimension_of_a_subspace():
    x = embeddings.rank_deficient(4000, 32, rank=6)
    lid = local_intrinsic_dimension(x, k=50, estimator="mle")
    # MLE LID with numerator k (not k − 1) is biased up by about k/(k − 2)
    assert 5.0 < lid.log().mean().exp().item() < 7.5


# ----------------------------------------------------------------------------------------------
# degenerate input: finite, documented values
# ----------------------------------------------------------------------------------------------


def test_fully_collapsed_input():
    x = torch.full((40, 8), 2.5)
    for estimator in ("mle", "mom"):
        assert torch.equal(local_intrinsic_dimension(x, k=5, estimator=estimator), torch.zeros(40))
    assert twonn_dimension(x).item() == 0.0
    assert mle_dimension(x, k=5).item() == 0.0
    z = x.clone().requires_grad_()
    loss = ldreg_regularizer(z, k=5)
    loss.backward()
    assert loss.item() == pytest.approx(-LOG_CAP) and torch.equal(z.grad, torch.zeros_like(z))
    for cls in (LocalIntrinsicDimension, TwoNN, MLEDimension):
        metric = cls(k=5) if cls is not TwoNN else cls()
        metric.update(x)
        value = metric.compute()
        assert torch.isfinite(value) and 0.0 <= value.item() < 1e-30


def test_duplicates():
    base = embeddings.gaussian(300, 10)
    x = torch.cat([base, base[:30]])  # points 0..29 and 300..329 are pairs
    pairs = torch.zeros(len(x), dtype=torch.bool)
    pairs[:30] = pairs[300:] = True
    mle = local_intrinsic_dimension(x, k=10, estimator="mle")
    mom = local_intrinsic_dimension(x, k=10, estimator="mom")
    assert torch.all(mle[pairs] == 0) and torch.all(mle[~pairs] > 0)
    # mom stays positive with one duplicate among k neighbours, and matches its formula
    expected_mom = lid_ref(x.numpy(), 10, "mom")
    assert max_rel_err(mom, expected_mom) <= 1e-9 and torch.all(mom > 0)
    # Without the duplicated points the values are those of the reference.
    with np.errstate(divide="ignore"):
        expected_mle = lid_ref(x.numpy(), 10, "mle")
    assert max_rel_err(mle[~pairs], expected_mle[~pairs.numpy()]) <= 1e-9
    # mle_dimension: a duplicate has m_i = 0, so the harmonic mean is 0 (as scikit-dimension).
    assert mle_dimension(x, k=10).item() == 0.0
    # The geometric mean stays finite; 60 of 330 log-values clamped at −88.7 pull it down.
    metric = LocalIntrinsicDimension(k=10)
    metric.update(x)
    expected = math.exp((np.log(mle[~pairs].double().numpy()).sum() - 60 * LOG_CAP) / len(x))
    assert rel_err(metric.compute(), expected) <= 1e-5
    # The regulariser stays finite with finite gradients.
    z = x.clone().requires_grad_()
    for estimator in ("mle", "mom"):
        loss = ldreg_regularizer(z, k=10, estimator=estimator)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_equidistant_neighbourhoods_give_the_cap():
    # One-hot rows: every pair at distance sqrt(2), so all k distances are equal.
    x = torch.eye(30, dtype=torch.float64)
    for estimator in ("mle", "mom"):
        assert torch.all(local_intrinsic_dimension(x, k=5, estimator=estimator) == LID_CAP)
    assert twonn_dimension(x).item() == LID_CAP
    assert mle_dimension(x, k=5).item() == LID_CAP
    assert (
        torch.isfinite(twonn_dimension(x.float())) and torch.isfinite(local_intrinsic_dimension(x.float(), k=5)).all()
    )
    assert ldreg_regularizer(x, k=5).item() == pytest.approx(-LOG_CAP)


def test_partial_collapse_to_a_few_points():
    # 3 clusters of exact duplicates and one outlier: finite everywhere.
    centres = embeddings.gaussian(3, 16)
    x = torch.cat([centres.repeat_interleave(50, dim=0), embeddings.gaussian(1, 16, seed=5)])
    for estimator in ("mle", "mom"):
        lid = local_intrinsic_dimension(x, k=10, estimator=estimator)
        assert torch.isfinite(lid).all() and torch.all(lid[:150] == 0)
    assert twonn_dimension(x).item() == 0.0  # only the outlier has r1 > 0: no ratio kept
    assert torch.isfinite(mle_dimension(x, k=10))


# ----------------------------------------------------------------------------------------------
# the regulariser
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["mom", "mle"])
def test_ldreg_gradcheck(estimator):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(30, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: ldreg_regularizer(z, reference, k=6, estimator=estimator), (x,))


@pytest.mark.parametrize("estimator", ["mom", "mle"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_ldreg_value_and_gradient_match_ldreg_recipe(estimator, with_reference):
    x = embeddings.rank_deficient(200, 24, rank=8).requires_grad_()
    reference = embeddings.gaussian(400, 24, seed=3) if with_reference else None
    ours = ldreg_regularizer(x, reference, k=16, estimator=estimator)
    expected = ldreg_ref_torch(x, reference, 16, estimator)
    assert rel_err(ours, expected) <= 1e-9
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_ref,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_ldreg_with_the_gathered_batch_as_reference_drops_the_own_copy():
    x = embeddings.gaussian(100, 16).requires_grad_()
    gathered = torch.cat([embeddings.gaussian(100, 16, seed=7), x.detach()])
    ours = ldreg_regularizer(x, gathered, k=10, exclude_self=True)
    lid = lid_ref(x.detach().numpy(), 10, "mom", gathered.numpy(), exclude_self=True)
    assert rel_err(ours, -np.abs(np.log(lid)).mean()) <= 1e-9
    # and equals the batch-local value on the concatenation (own copy excluded by index)
    together = torch.cat([x, embeddings.gaussian(100, 16, seed=7)])
    lid_together = local_intrinsic_dimension(together, k=10, estimator="mom")[:100]
    assert rel_err(ours, -lid_together.log().abs().mean()) <= 1e-9


def test_ldreg_raises_local_dimension():
    """A few gradient steps on the regulariser alone lift LID of a nearly flat representation."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=g) @ torch.randn(2, 16, generator=g) + 0.01 * torch.randn(256, 16, generator=g)
    z.requires_grad_()
    before = local_intrinsic_dimension(z.detach(), k=16, estimator="mom").log().mean().exp()
    opt = torch.optim.Adam([z], lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        ldreg_regularizer(z, k=16).backward()
        opt.step()
    after = local_intrinsic_dimension(z.detach(), k=16, estimator="mom").log().mean().exp()
    assert after > 1.3 * before


# ----------------------------------------------------------------------------------------------
# invariances, precision, devices
# ----------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
    n=st.integers(12, 80),
    d=st.integers(2, 12),
)
def test_invariant_to_rotation_translation_and_scale(seed, scale, shift, n, d):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    moved = (x @ q) * scale + shift
    for estimator in ("mle", "mom"):
        base = local_intrinsic_dimension(x, k=5, estimator=estimator)
        assert max_rel_err(local_intrinsic_dimension(moved, k=5, estimator=estimator), base) <= 1e-7
    assert rel_err(twonn_dimension(moved), twonn_dimension(x)) <= 1e-7
    assert rel_err(mle_dimension(moved, k=5), mle_dimension(x, k=5)) <= 1e-7


def test_low_precision_and_autocast():
    x = embeddings.rank_deficient(500, 32, rank=6, dtype=torch.float32)
    for low in (torch.float16, torch.bfloat16):
        xl = x.to(low)
        lid = local_intrinsic_dimension(xl, k=10)
        assert lid.dtype == torch.float32
        assert max_rel_err(lid, lid_ref(xl.double().numpy(), 10)) <= 1e-6
        assert twonn_dimension(xl).dtype == torch.float32
        metric = TwoNN()
        metric.update(xl)
        assert rel_err(metric.compute(), twonn_ref(xl.double().numpy())) <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = local_intrinsic_dimension(x, k=10)
        z = x.clone().requires_grad_()
        loss = ldreg_regularizer(z, k=10)
    assert max_rel_err(inside, lid_ref(x.double().numpy(), 10)) <= 1e-6
    assert loss.dtype == torch.float32 and rel_err(loss, ldreg_ref_torch(x.double(), None, 10, "mom")) <= 1e-6


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = swiss_roll(3000, dtype=torch.float32)
    xc = x.cuda()
    lid = local_intrinsic_dimension(xc, k=20)
    assert lid.device.type == "cuda"
    assert max_rel_err(lid.cpu(), local_intrinsic_dimension(x, k=20)) <= 1e-6
    assert rel_err(twonn_dimension(xc).cpu(), twonn_ref(x.double().numpy())) <= 1e-6
    assert rel_err(mle_dimension(xc).cpu(), mle_ref(x.double().numpy())) <= 1e-6
    metric = LocalIntrinsicDimension().cuda()
    for b in xc.split(500):
        metric.update(b)
    assert metric.compute().device.type == "cuda"
    z = xc[:512].clone().requires_grad_()
    ldreg_regularizer(z, k=16).backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_to_functions():
    x = embeddings.gaussian(30, 4)
    cases = [
        (lambda: local_intrinsic_dimension(x, k=30), "k=30"),  # 29 neighbours available
        (lambda: local_intrinsic_dimension(x, k=1), "k"),
        (lambda: local_intrinsic_dimension(x[:2], k=2), "at least 3 rows"),
        (lambda: local_intrinsic_dimension(x, estimator="lb"), "estimator"),
        (lambda: local_intrinsic_dimension(x.unsqueeze(0)), "shape"),
        (lambda: local_intrinsic_dimension(torch.full((30, 4), float("nan"))), "NaN"),
        (lambda: local_intrinsic_dimension(x, k=5, reference=x[:, :3]), "`reference` has 3 features but `x` has 4"),
        (lambda: local_intrinsic_dimension(x, k=5, reference=x[:5], exclude_self=True), "k=5"),
        (lambda: local_intrinsic_dimension(x, k=5, exclude_self="yes"), "exclude_self"),
        (lambda: twonn_dimension(x[:2]), "at least 3 rows"),
        (lambda: twonn_dimension(x, discard_fraction=0.0), "discard_fraction"),
        (lambda: twonn_dimension(x, discard_fraction=1.0), "discard_fraction"),
        (lambda: twonn_dimension(torch.full((5, 2), float("inf"))), "infinite"),
        (lambda: mle_dimension(x, k=30), "k=30"),
        (lambda: mle_dimension(x.numpy()), "torch.Tensor"),
        (lambda: ldreg_regularizer(x, k=64), "k=64"),
        (lambda: ldreg_regularizer(x, estimator="x"), "estimator"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert fragment in message, message
        assert message.split(":")[0] in (
            "local_intrinsic_dimension",
            "twonn_dimension",
            "mle_dimension",
            "ldreg_regularizer",
        )
    # k equal to the neighbours available is fine
    assert local_intrinsic_dimension(x, k=29).shape == (30,)


def test_bad_arguments_to_classes():
    for kwargs in ({"k": 1}, {"estimator": "x"}, {"max_samples": 0}):
        with pytest.raises(ValueError, match="LocalIntrinsicDimension"):
            LocalIntrinsicDimension(**kwargs)
    with pytest.raises(ValueError, match="TwoNN"):
        TwoNN(discard_fraction=-0.1)
    with pytest.raises(ValueError, match="MLEDimension"):
        MLEDimension(k=0)


def test_compute_needs_enough_samples():
    with pytest.raises(ValueError, match="before any update"):
        TwoNN().compute()
    metric = LocalIntrinsicDimension(k=20)
    metric.update(torch.randn(20, 8))
    with pytest.raises(ValueError, match="at least 21 samples"):
        metric.compute()
    metric.update(torch.randn(1, 8))
    assert torch.isfinite(metric.compute())
    metric = TwoNN()
    metric.update(torch.randn(2, 8))
    with pytest.raises(ValueError, match="at least 3 samples"):
        metric.compute()


# ----------------------------------------------------------------------------------------------
# Metric classes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["subspace_5d_in_64d", "swiss_roll_in_64d", "near_collapsed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_classes_equal_functionals_on_the_concatenation(case, dtype):
    x = CASES[case](dtype)
    lid_metric, twonn_metric, mle_metric = LocalIntrinsicDimension(k=20, estimator="mom"), TwoNN(), MLEDimension(k=10)
    for b in uneven_batches(x):
        lid_metric.update(b)
        twonn_metric.update(b)
        mle_metric.update(b)
    lid = local_intrinsic_dimension(x, k=20, estimator="mom")
    value = lid_metric.compute()
    assert value.dtype == torch.get_default_dtype()
    assert rel_err(value, lid.double().log().mean().exp()) <= 1e-6
    assert max_rel_err(lid_metric.per_sample(), lid) <= 1e-6
    assert rel_err(twonn_metric.compute(), twonn_dimension(x)) <= 1e-6
    assert rel_err(mle_metric.compute(), mle_dimension(x, k=10)) <= 1e-6
    # and against the independent references
    assert rel_err(twonn_metric.compute(), twonn_ref(x.double().numpy())) <= 1e-6


def test_bounded_sample_is_what_is_measured():
    x = swiss_roll(3000)
    metric = LocalIntrinsicDimension(k=10, max_samples=1000)
    for b in x.split(128):
        metric.update(b)
    sample = metric._sample()
    assert sample.shape == (1000, 64)
    assert rel_err(metric.compute(), local_intrinsic_dimension(sample, k=10).log().mean().exp()) <= 1e-6
    assert metric.per_sample().shape == (1000,)


def test_torchmetrics_conventions():
    x = embeddings.rank_deficient(600, 24, rank=4, dtype=torch.float32)
    coll = MetricCollection({"lid": LocalIntrinsicDimension(k=10), "twonn": TwoNN(), "mle": MLEDimension(k=10)})
    for b in x.split(100):
        coll.update(b)
    values = coll.compute()
    assert rel_err(values["twonn"], twonn_dimension(x)) <= 1e-6
    assert rel_err(values["mle"], mle_dimension(x, k=10)) <= 1e-6

    metric = LocalIntrinsicDimension(k=10)
    batch_value = metric(x[:100])  # forward: value of this batch, state accumulates
    assert rel_err(batch_value, local_intrinsic_dimension(x[:100], k=10).log().mean().exp()) <= 1e-6
    metric.update(x[100:])
    assert metric.per_sample().shape == (600,)  # the accumulated state, not the last batch
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), local_intrinsic_dimension(x, k=10).log().mean().exp()) <= 1e-6
    metric.reset()
    metric.update(x[:50, :7])  # a new width after reset
    assert metric.per_sample().shape == (50,)
    for cls in (LocalIntrinsicDimension, TwoNN, MLEDimension):
        assert cls.full_state_update is False and cls.higher_is_better is True and cls.is_differentiable is False


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = TwoNN()
    metric.update(torch.randn(50, 8))
    fig, ax = metric.plot()
    assert fig is not None and ax is not None


def _ddp_dimensions(rank, world_size, x):
    cut = int(0.4 * len(x))
    mine = x[:cut].split(cut // 3 + 1) if rank == 0 else x[cut:].split((len(x) - cut) // 2 + 1)
    out = {}
    for max_samples in (25_600, 300):
        metrics = [
            LocalIntrinsicDimension(k=10, max_samples=max_samples),
            TwoNN(max_samples=max_samples),
            MLEDimension(k=10, max_samples=max_samples),
        ]
        for b in mine:
            for m in metrics:
                m.update(b)
        values = [m.compute() for m in metrics]
        per_sample = metrics[0].per_sample()
        metrics[0].sync()
        sample = metrics[0]._sample().clone()
        metrics[0].unsync()
        out[max_samples] = (values, per_sample, sample)
    return out, sum(len(b) for b in mine)


def test_ddp_two_processes():
    x = swiss_roll(901, ambient=32)
    (res0, n0), (res1, n1) = run_distributed(_ddp_dimensions, x)
    assert n0 != n1 and n0 + n1 == len(x)
    # Everything kept: each rank's value equals the functional on all 901 points.
    expected = [local_intrinsic_dimension(x, k=10).log().mean().exp(), twonn_dimension(x), mle_dimension(x, k=10)]
    for values, per_sample, sample in (res0[25_600], res1[25_600]):
        assert sample.shape == x.shape and per_sample.shape == (901,)
        for v, e in zip(values, expected):
            assert rel_err(v, e) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(res0[25_600][0], res1[25_600][0]))
    assert torch.equal(res0[25_600][1], res1[25_600][1])
    # A bounded sample: the same 300 points on both ranks, and the values are those of that sample.
    (values0, _, sample0), (values1, _, sample1) = res0[300], res1[300]
    assert sample0.shape == (300, 32) and torch.equal(sample0, sample1)
    assert all(torch.equal(a, b) for a, b in zip(values0, values1))
    assert rel_err(values0[1], twonn_ref(sample0.numpy())) <= 1e-6
    assert rel_err(values0[2], mle_ref(sample0.numpy(), 10)) <= 1e-6
