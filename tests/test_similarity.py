import pickle

import numpy as np
import pytest
import torch
from _helpers.harness import assert_rejects, rel_err
from ddp import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from references_similarity import (
    cka_ref,
    gram_linear_ref,
    hsic_biased_ref,
    hsic_unbiased_ref,
    linear_cka_ref,
    minibatch_cka_ref,
    squared_distances_ref,
)
from torchmetrics import MetricCollection

from reprmetrics import LinearCKA, MinibatchCKA
from reprmetrics.functional import cka, linear_cka
from reprmetrics.functional.similarity import _gram, _median_all_entries, _u_centre_

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def related(n, d1, d2, noise=0.5, seed=0, dtype=F64, decay=True):
    """x with a decaying spectrum and y = a random linear map of x plus noise: CKA strictly inside (0, 1)."""
    g = gen(seed)
    scale = torch.arange(1, d1 + 1, dtype=F64).pow(-0.5) if decay else torch.ones(d1, dtype=F64)
    x = torch.randn(n, d1, generator=g, dtype=F64) * scale
    y = x @ torch.randn(d1, d2, generator=g, dtype=F64) + noise * torch.randn(n, d2, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


def orthogonal(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def np64(t):
    return t.double().numpy()


def uneven_batches(n, sizes=(7, 50, 4, 90, 33)):
    """Consecutive slices of varied sizes covering 0..n."""
    out, start, i = [], 0, 0
    while start < n:
        stop = min(start + sizes[i % len(sizes)], n)
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


SHAPES = [(40, 8, 8), (300, 16, 5), (64, 3, 40), (25, 64, 64)]  # N < D included


# ----------------------------------------------------------------------------------------------
# functional: against the numpy references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d1,d2", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cka_matches_reference(n, d1, d2, dtype):
    x, y = related(n, d1, d2, seed=n + d1, dtype=dtype)
    value = linear_cka(x, y)
    assert value.dtype == dtype
    assert rel_err(value, linear_cka_ref(np64(x), np64(y))) <= (1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_gram_form_equals_feature_form_for_the_linear_kernel(n, d1, d2):
    x, y = related(n, d1, d2, seed=3 * n)
    gram_form = cka(x, y, kernel="linear", debiased=False)
    assert rel_err(gram_form, linear_cka(x, y)) <= 1e-12
    # and the reference Gram form (un-centred X Xᵀ, explicit H) agrees with the reference feature form
    k, l_ = gram_linear_ref(np64(x)), gram_linear_ref(np64(y))
    gram_ref_value = hsic_biased_ref(k, l_) / np.sqrt(hsic_biased_ref(k, k) * hsic_biased_ref(l_, l_))
    assert rel_err(gram_form, gram_ref_value) <= 1e-12
    assert rel_err(gram_ref_value, linear_cka_ref(np64(x), np64(y))) <= 1e-12


@pytest.mark.parametrize("kernel,sigma", [("linear", 1.0), ("rbf", 1.0), ("rbf", 0.4), ("rbf", 3.0)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_cka_matches_reference(kernel, sigma, debiased, n, d1, d2):
    x, y = related(n, d1, d2, seed=n * d2 + 1)
    got = cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased)
    assert rel_err(got, cka_ref(np64(x), np64(y), kernel, sigma, debiased)) <= 1e-10


@pytest.mark.parametrize("n", [4, 5, 8, 33])
def test_u_centred_inner_product_is_song_unbiased_hsic(n):
    # Any symmetric matrices, not only PSD kernels: the identity is algebraic.
    g = gen(n)
    a, b = torch.randn(n, n, generator=g, dtype=F64), torch.randn(n, n, generator=g, dtype=F64)
    k, l_ = a + a.T, b @ b.T
    ku, lu = _u_centre_(k.clone()), _u_centre_(l_.clone())
    got = float((ku * lu).sum()) / (n * (n - 3))
    assert rel_err(got, hsic_unbiased_ref(k.numpy(), l_.numpy())) <= 1e-10
    assert float((ku * ku).sum()) / (n * (n - 3)) == pytest.approx(hsic_unbiased_ref(k.numpy(), k.numpy()), rel=1e-10)


def test_unbiased_hsic_of_independent_representations_is_centred_on_zero():
    # Unbiased: the mean of HSIC₁ over many independent draws is ≈ 0, while the biased HSIC is
    # positive on every draw (what inflates biased CKA at N ≪ D).
    biased, unbiased = [], []
    for seed in range(200):
        g = gen(seed)
        x, y = torch.randn(12, 30, generator=g, dtype=F64), torch.randn(12, 30, generator=g, dtype=F64)
        k, l_ = gram_linear_ref(x.numpy()), gram_linear_ref(y.numpy())
        biased.append(hsic_biased_ref(k, l_))
        unbiased.append(hsic_unbiased_ref(k, l_))
        assert float(cka(x, y, debiased=True)) == pytest.approx(
            unbiased[-1] / np.sqrt(hsic_unbiased_ref(k, k) * hsic_unbiased_ref(l_, l_)), rel=1e-9
        )
    assert min(biased) > 0
    assert abs(np.mean(unbiased)) < 3 * np.std(unbiased) / np.sqrt(len(unbiased))


@pytest.mark.parametrize("n", [5, 6, 31])  # N² odd and even
def test_rbf_bandwidth_is_the_median_over_all_n_squared_entries(n):
    x = torch.randn(n, 4, generator=gen(n), dtype=F64)
    centred = x - x.mean(0)
    sq = squared_distances_ref(x.numpy())
    assert float(_median_all_entries(torch.tensor(sq))) == pytest.approx(np.median(sq), rel=1e-12)
    # the diagonal's N zeros count: the off-diagonal median alone is larger
    assert np.median(sq) < np.median(sq[~np.eye(n, dtype=bool)])
    sigma = 0.7
    expected = np.exp(-sq / (2 * sigma**2 * np.median(sq)))
    np.testing.assert_allclose(_gram(centred, "rbf", sigma, "cka").numpy(), expected, rtol=1e-10, atol=1e-14)


def test_rbf_cka_approaches_linear_cka_for_a_wide_bandwidth():
    x, y = related(200, 10, 6, seed=4)
    wide = float(cka(x, y, kernel="rbf", sigma=100.0))
    assert wide == pytest.approx(float(linear_cka(x, y)), rel=1e-3)
    assert abs(float(cka(x, y, kernel="rbf", sigma=0.2)) - float(linear_cka(x, y))) > 1e-2


# ----------------------------------------------------------------------------------------------
# invariances and bounds
# ----------------------------------------------------------------------------------------------

VARIANTS = [
    ("linear_cka", lambda x, y: linear_cka(x, y)),
    ("cka_linear", lambda x, y: cka(x, y)),
    ("cka_linear_debiased", lambda x, y: cka(x, y, debiased=True)),
    ("cka_rbf", lambda x, y: cka(x, y, kernel="rbf", sigma=0.8)),
    ("cka_rbf_debiased", lambda x, y: cka(x, y, kernel="rbf", sigma=0.8, debiased=True)),
]


@pytest.mark.parametrize("name,fn", VARIANTS, ids=[v[0] for v in VARIANTS])
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(8, 80),
    d1=st.integers(1, 24),
    d2=st.integers(1, 24),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-100.0, 100.0),
    which=st.sampled_from(["x", "y"]),
)
def test_invariant_to_orthogonal_maps_isotropic_scaling_and_offsets(name, fn, seed, n, d1, d2, scale, offset, which):
    x, y = related(n, d1, d2, seed=seed, noise=1.0)
    base = float(fn(x, y))
    if which == "x":
        moved = fn(scale * x @ orthogonal(d1, seed + 1) + offset, y)
    else:
        moved = fn(x, scale * y @ orthogonal(d2, seed + 1) + offset)
    assert float(moved) == pytest.approx(base, rel=1e-8, abs=1e-10)
    assert float(fn(x, x)) == pytest.approx(1.0, rel=1e-10)
    assert float(fn(y, scale * y @ orthogonal(d2, seed + 2))) == pytest.approx(1.0, rel=1e-10)
    low = -1.0 if "debiased" in name else 0.0
    assert low - 1e-12 <= base <= 1.0 + 1e-12


def test_linear_cka_is_not_invariant_to_general_invertible_maps():
    # A sanity check that the invariance test can fail: an anisotropic scaling changes linear CKA.
    x, y = related(200, 8, 8, seed=5, decay=False)
    stretch = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0], dtype=F64))
    assert abs(float(linear_cka(x @ stretch, y)) - float(linear_cka(x, y))) > 1e-2


# ----------------------------------------------------------------------------------------------
# large common offset (the representation has collapsed towards a point far from the origin)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
def test_large_offset_keeps_full_accuracy(offset):
    x, y = related(500, 12, 7, seed=6)
    spread = float(x.std())
    shift_x = offset * spread * torch.linspace(1.0, 2.0, x.shape[1], dtype=F64)
    shift_y = -offset * spread * torch.ones(y.shape[1], dtype=F64)
    xo, yo = x + shift_x, y + shift_y
    # reference: the same float64 data, centred in float64 first
    expected = linear_cka_ref(np64(xo), np64(yo))
    assert rel_err(linear_cka(xo, yo), expected) <= 1e-6
    assert rel_err(cka(xo, yo), expected) <= 1e-6
    assert (
        rel_err(
            cka(xo, yo, debiased=True), cka_ref(np64(xo) - np64(xo).mean(0), np64(yo) - np64(yo).mean(0), debiased=True)
        )
        <= 1e-6
    )
    assert (
        rel_err(cka(xo, yo, kernel="rbf"), cka_ref(np64(xo) - np64(xo).mean(0), np64(yo) - np64(yo).mean(0), "rbf"))
        <= 1e-6
    )
    if offset >= 1e6:
        # the uncentred one-pass formula (XᵀX − N m mᵀ) loses it: the test can fail
        n = x.shape[0]

        def naive_cov(a, b):
            return a.T @ b - torch.outer(a.sum(0), b.sum(0)) / n

        naive = naive_cov(xo, yo).square().sum() / (
            torch.linalg.matrix_norm(naive_cov(xo, xo)) * torch.linalg.matrix_norm(naive_cov(yo, yo))
        )
        assert not rel_err(naive, expected) <= 1e-6


# ----------------------------------------------------------------------------------------------
# degenerate input: zero variance gives 0, documented
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("constant_value", [0.0, 0.1, 3.7e8, -1e-20])
def test_zero_variance_input_gives_zero(constant_value):
    x, _ = related(40, 6, 3, seed=7)
    const = torch.full((40, 5), constant_value, dtype=F64)
    const[:, 1] = 1 / 3  # rows identical, columns not
    for name, fn in VARIANTS:
        assert float(fn(x, const)) == 0.0, name
        assert float(fn(const, x)) == 0.0, name
        assert float(fn(const, const)) == 0.0, name
    m = MinibatchCKA()
    m.update(x[:20], const[:20])
    m.update(x[20:], const[20:])
    assert float(m.compute()) == 0.0


def test_tiny_but_real_variance_is_not_treated_as_constant():
    x, y = related(100, 6, 4, seed=8)
    tiny = 1e-12 * y + 5.0  # spread 1e-12 of the offset: far above float64 round-off
    assert rel_err(linear_cka(x, tiny), linear_cka_ref(np64(x), np64(tiny))) <= 1e-3
    assert float(linear_cka(x, tiny)) > 0.1


def test_rbf_with_mostly_duplicate_rows_raises():
    x = torch.zeros(10, 3, dtype=F64)
    x[0] = 1.0  # 18 of 100 entries non-zero: the median squared distance is 0
    y = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match="cka: the RBF bandwidth is 0"):
        cka(x, y, kernel="rbf")
    assert float(cka(x, y)) >= 0.0  # the linear kernel is fine


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_functional_bad_input():
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    cases = [
        (lambda: linear_cka(x, y[:9]), "linear_cka: `x` and `y` must have the same number of rows"),
        (lambda: cka(x, y[:9]), "cka: `x` and `y` must have the same number of rows"),
        (lambda: linear_cka(x[:1], y[:1]), "linear_cka: needs at least 2 rows"),
        (lambda: cka(x[:3], y[:3], debiased=True), "cka: needs at least 4 rows"),
        (lambda: linear_cka(x.reshape(10, 2, 2), y), "linear_cka: `x` must have shape (N, D)"),
        (lambda: cka(x, y[:, 0]), "cka: `y` must have shape (N, D)"),
        (lambda: linear_cka(x, torch.full((10, 3), float("nan"))), "linear_cka: `y` contains NaN"),
        (lambda: cka(torch.full((10, 4), float("inf")), y), "cka: `x` contains NaN or infinite"),
        (lambda: cka(x, y, kernel="cosine"), "cka: `kernel` must be 'linear' or 'rbf'"),
        (lambda: cka(x, y, kernel="rbf", sigma=0.0), "cka: `sigma`"),
        (lambda: cka(x, y, kernel="rbf", sigma=float("nan")), "cka: `sigma`"),
        (lambda: linear_cka(np.zeros((10, 4)), y), "linear_cka: `x` must be a torch.Tensor"),
        (lambda: linear_cka(torch.randn(10, 0), y), "linear_cka: `x` has no features"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert fragment in str(info.value), str(info.value)
    assert float(cka(x[:3], y[:3])) >= 0.0  # the biased form needs only 2 rows


def test_low_precision_input_is_upcast_and_autocast_is_ignored():
    x, y = related(200, 16, 8, seed=9, dtype=torch.float32)
    expected = linear_cka_ref(np64(x.bfloat16()), np64(y.bfloat16()))
    for fn in (linear_cka, cka):
        value = fn(x.bfloat16(), y.bfloat16())
        assert value.dtype == torch.float32
        assert rel_err(value, expected) <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rel_err(fn(x, y), linear_cka_ref(np64(x), np64(y))) <= 1e-5


# ----------------------------------------------------------------------------------------------
# LinearCKA (streaming)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d1,d2", SHAPES + [(700, 300, 260)])  # the last crosses the blocked Gram path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cka_class_equals_functional_on_the_concatenation(n, d1, d2, dtype):
    x, y = related(n, d1, d2, seed=n + 2 * d1, dtype=dtype)
    metric = LinearCKA()
    for s in uneven_batches(n, sizes=(1, 7, 50, 2, 90, 33)):  # a 1-row batch included
        metric.update(x[s], y[s])
    value = metric.compute()
    assert value.dtype == torch.get_default_dtype()
    assert rel_err(value, linear_cka(x, y)) <= 1e-6
    assert rel_err(value, linear_cka_ref(np64(x), np64(y))) <= 1e-6
    # memory does not grow with N: the state is the (D + 3) × D packed moments of the joint width
    d = d1 + d2
    assert metric.moments.shape == (d + 3, d) and int(metric.num_features_x) == d1


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
def test_linear_cka_streaming_stays_accurate_at_a_large_offset(offset):
    x, y = related(1000, 16, 9, seed=15)
    spread = float(x.std())
    xo = x + offset * spread * torch.linspace(-1.0, 3.0, 16, dtype=F64)
    yo = y + offset * spread
    expected = linear_cka_ref(np64(xo), np64(yo))  # centred in float64 first
    metric = LinearCKA()
    for s in uneven_batches(len(x)):
        metric.update(xo[s], yo[s])
    assert rel_err(metric.compute(), expected) <= 1e-6
    # also when the first batch's mean (the shift) is far from the overall mean
    drift = LinearCKA()
    order = torch.argsort(xo[:, 0])
    for s in uneven_batches(len(x)):
        drift.update(xo[order][s], yo[order][s])
    assert rel_err(drift.compute(), expected) <= 1e-6


def test_linear_cka_zero_variance_gives_zero():
    x, _ = related(60, 6, 3, seed=16)
    for value in (0.0, 0.1, 3.7e8):
        const = torch.full((60, 4), value, dtype=F64)
        metric = LinearCKA()
        for s in uneven_batches(60):
            metric.update(x[s], const[s])
        assert float(metric.compute()) == 0.0
        metric.reset()
        metric.update(const, const)
        assert float(metric.compute()) == 0.0


def test_linear_cka_bad_input_raises_and_leaves_state_unchanged():
    metric = LinearCKA()
    metric.update(torch.randn(10, 5), torch.randn(10, 3))
    assert_rejects(metric, bad_pairs(5, 3), "LinearCKA")
    with pytest.raises(ValueError, match="LinearCKA: needs at least 2 samples"):
        metric(torch.randn(1, 5), torch.randn(1, 3))  # forward needs the batch's own value
    metric.update(torch.randn(1, 5), torch.randn(1, 3))  # one row is fine for update()
    assert int(metric.moments[0, 0]) == 11
    with pytest.raises(ValueError, match=r"LinearCKA: compute\(\) called before any update"):
        LinearCKA().compute()
    single = LinearCKA()
    single.update(torch.randn(1, 5), torch.randn(1, 3))
    with pytest.raises(ValueError, match="LinearCKA: needs at least 2 samples"):
        single.compute()
    for bad in ((4,), (4, 0), 4, (4, 2.5)):
        with pytest.raises(ValueError, match="LinearCKA: `num_features"):
            LinearCKA(num_features=bad)


def test_failed_forward_keeps_the_accumulated_state_and_widths():
    metric = LinearCKA()
    x, y = related(50, 5, 3, seed=17)
    metric.update(x[:30], y[:30])
    with pytest.raises(ValueError, match="NaN"):
        metric(x[30:], torch.full((20, 3), float("nan")))
    with pytest.raises(ValueError, match="earlier batches had 5"):
        metric.update(torch.randn(5, 6), torch.randn(5, 3))
    metric.update(x[30:], y[30:])
    assert rel_err(metric.compute(), linear_cka(x, y)) <= 1e-6


def test_linear_cka_torchmetrics_conventions():
    x, y = related(300, 12, 6, seed=18)
    metric = LinearCKA()
    first = metric(x[:100], y[:100])  # forward: this batch's value, and it accumulates
    assert rel_err(first, linear_cka(x[:100], y[:100])) <= 1e-6
    metric.update(x[100:], y[100:])
    assert rel_err(metric.compute(), linear_cka(x, y)) <= 1e-6
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), linear_cka(x, y)) <= 1e-6
    collection = MetricCollection({"cka": LinearCKA(), "known_widths": LinearCKA(num_features=(12, 6))})
    for s in uneven_batches(300):
        collection.update(x[s], y[s])
    for value in collection.compute().values():
        assert rel_err(value, linear_cka(x, y)) <= 1e-6
    metric.reset()
    metric.update(torch.randn(8, 7), torch.randn(8, 2))  # reset allows new widths
    assert metric.moments.shape == (12, 9)
    assert LinearCKA.full_state_update is False and LinearCKA.higher_is_better is True


# ----------------------------------------------------------------------------------------------
# MinibatchCKA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,sigma", [("linear", 1.0), ("rbf", 0.8)])
@pytest.mark.parametrize("d1,d2", [(8, 8), (20, 5)])
def test_minibatch_cka_matches_reference_over_uneven_minibatches(kernel, sigma, d1, d2):
    x, y = related(250, d1, d2, seed=d1 + d2)
    metric = MinibatchCKA(kernel=kernel, sigma=sigma)
    batches = uneven_batches(len(x))
    for s in batches:
        metric.update(x[s], y[s])
    expected = minibatch_cka_ref([np64(x[s]) for s in batches], [np64(y[s]) for s in batches], kernel, sigma)
    assert int(metric.num_batches) == len(batches)
    assert rel_err(metric.compute(), expected) <= 1e-6  # compute() returns the default dtype (float32)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_cka_of_one_minibatch_is_debiased_cka(kernel):
    x, y = related(120, 10, 6, seed=11)
    metric = MinibatchCKA(kernel=kernel)
    metric.update(x, y)
    assert rel_err(metric.compute(), cka(x, y, kernel=kernel, debiased=True)) <= 1e-6


def test_minibatch_cka_converges_to_the_population_value():
    # Unbiased per-batch estimates: many small minibatches approach the full-data linear CKA, while
    # averaging biased per-batch CKA stays inflated at N ≪ D.
    x, y = related(4096, 64, 64, noise=3.0, seed=12, decay=False)
    full = float(linear_cka(x, y))
    metric = MinibatchCKA()
    biased = []
    for xb, yb in zip(x.split(32), y.split(32)):
        metric.update(xb, yb)
        biased.append(float(cka(xb, yb)))
    assert abs(float(metric.compute()) - full) < 0.02
    assert np.mean(biased) - full > 0.1


def bad_pairs(d1, d2):
    return {
        "same number of rows": (torch.randn(6, d1), torch.randn(7, d2)),
        "NaN or infinite": (torch.randn(6, d1), torch.full((6, d2), float("nan"))),
        "shape (N, D)": (torch.randn(6, d1, 1), torch.randn(6, d2)),
        f"earlier batches had {d1}": (torch.randn(6, d1 + 1), torch.randn(6, d2)),
        f"earlier batches had {d2}": (torch.randn(6, d1), torch.randn(6, d2 + 2)),
        "must be a torch.Tensor": (np.zeros((6, d1)), torch.randn(6, d2)),
    }


def test_minibatch_cka_bad_input_raises_and_leaves_state_unchanged():
    metric = MinibatchCKA()
    metric.update(torch.randn(10, 5), torch.randn(10, 3))
    cases = bad_pairs(5, 3) | {"needs at least 4 rows": (torch.randn(3, 5), torch.randn(3, 3))}
    assert_rejects(metric, cases, "MinibatchCKA")
    rbf = MinibatchCKA(kernel="rbf")
    rbf.update(torch.randn(10, 5), torch.randn(10, 3))
    duplicates = torch.zeros(10, 5)
    duplicates[0] = 1
    assert_rejects(rbf, {"RBF bandwidth is 0": (duplicates, torch.randn(10, 3))}, "MinibatchCKA")
    for make, fragment in (
        (lambda: MinibatchCKA(kernel="poly"), "MinibatchCKA: `kernel`"),
        (lambda: MinibatchCKA(kernel="rbf", sigma=-1.0), "MinibatchCKA: `sigma`"),
    ):
        with pytest.raises(ValueError, match=fragment):
            make()
    with pytest.raises(ValueError, match=r"MinibatchCKA: compute\(\) called before any update"):
        MinibatchCKA().compute()


def test_minibatch_cka_torchmetrics_conventions():
    x, y = related(300, 12, 6, seed=13)
    collection = MetricCollection({"linear": MinibatchCKA(), "rbf": MinibatchCKA(kernel="rbf", sigma=0.5)})
    metric = MinibatchCKA()
    first = metric(x[:100], y[:100])  # forward: this batch's value, and it accumulates
    assert rel_err(first, cka(x[:100], y[:100], debiased=True)) <= 1e-6
    for s in (slice(0, 100), slice(100, 200), slice(200, 300)):
        collection.update(x[s], y[s])
    metric.update(x[100:200], y[100:200])
    metric.update(x[200:], y[200:])
    got = collection.compute()
    chunks = [slice(0, 100), slice(100, 200), slice(200, 300)]
    assert rel_err(got["linear"], minibatch_cka_ref([np64(x[s]) for s in chunks], [np64(y[s]) for s in chunks])) <= 1e-6
    assert (
        rel_err(got["rbf"], minibatch_cka_ref([np64(x[s]) for s in chunks], [np64(y[s]) for s in chunks], "rbf", 0.5))
        <= 1e-6
    )
    assert rel_err(metric.compute(), got["linear"]) <= 1e-12
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), got["linear"]) <= 1e-12
    assert metric.compute().dtype == torch.get_default_dtype()
    metric.reset()
    metric.update(torch.randn(8, 7), torch.randn(8, 2))  # reset allows new widths
    assert MinibatchCKA.full_state_update is False and MinibatchCKA.higher_is_better is True


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    for metric in (LinearCKA(), MinibatchCKA()):
        metric.update(torch.randn(8, 4), torch.randn(8, 3))
        fig, ax = metric.plot()
        assert fig is not None and ax is not None


# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------


def _ddp_similarity(rank, world_size, x, y, cut, offset):
    # Uneven: rank 0 gets the first `cut` rows in 3 minibatches, rank 1 the rest in 2.
    part = slice(0, cut) if rank == 0 else slice(cut, len(x))
    xs, ys = x[part], y[part]
    pieces = 3 if rank == 0 else 2
    size = len(xs) // pieces + 1
    linear, far, minibatch = LinearCKA(), LinearCKA(), MinibatchCKA()
    for xb, yb in zip(xs.split(size), ys.split(size)):
        linear.update(xb, yb)
        far.update(xb + offset * (1 + rank), yb - offset)  # each rank's shift is its own first batch
        minibatch.update(xb, yb)
    values = [linear.compute(), far.compute(), minibatch.compute(), [len(b) for b in xs.split(size)]]
    # Only rank 0 sees data; with num_features given, rank 1's empty state still syncs.
    lonely = LinearCKA(num_features=(x.shape[1], y.shape[1]))
    lonely_mb = MinibatchCKA()
    if rank == 0:
        lonely.update(x[:50], y[:50])
        lonely_mb.update(x[:50], y[:50])
    values += [lonely.compute(), lonely_mb.compute()]
    return values


def test_ddp_two_processes_equal_one_process_on_all_data():
    x, y = related(401, 24, 10, seed=14)
    cut, offset = 120, 1e7
    results = run_distributed(_ddp_similarity, x, y, cut, offset)
    sizes0, sizes1 = results[0][3], results[1][3]
    bounds, start = [], 0
    for size in sizes0 + sizes1:
        bounds.append(slice(start, start + size))
        start += size
    assert start == len(x)
    xo = torch.cat([x[:cut] + offset, x[cut:] + 2 * offset])
    expected_mb = minibatch_cka_ref([np64(x[s]) for s in bounds], [np64(y[s]) for s in bounds])
    for linear, far, minibatch, _, lonely, lonely_mb in results:
        assert rel_err(linear, linear_cka_ref(np64(x), np64(y))) <= 1e-6
        assert rel_err(far, linear_cka_ref(np64(xo), np64(y - offset))) <= 1e-6
        assert rel_err(minibatch, expected_mb) <= 1e-6
        assert rel_err(lonely, linear_cka_ref(np64(x[:50]), np64(y[:50]))) <= 1e-6
        assert rel_err(lonely_mb, cka_ref(np64(x[:50]), np64(y[:50]), debiased=True)) <= 1e-6
    for i in (0, 1, 2, 4, 5):
        assert torch.equal(results[0][i], results[1][i])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x, y = related(2000, 64, 32, seed=19, dtype=torch.float32)
    xc, yc = x.cuda(), y.cuda()
    expected = linear_cka_ref(np64(x), np64(y))
    value = linear_cka(xc, yc)
    assert value.device.type == "cuda" and rel_err(value.cpu(), expected) <= 1e-5
    metric = LinearCKA().cuda()
    minibatch = MinibatchCKA().cuda()
    for s in uneven_batches(len(x)):
        metric.update(xc[s], yc[s])
        minibatch.update(xc[s], yc[s])
    assert metric.compute().device.type == "cuda"
    assert rel_err(metric.compute().cpu(), expected) <= 1e-5
    batches = uneven_batches(len(x))
    assert (
        rel_err(
            minibatch.compute().cpu(), minibatch_cka_ref([np64(x[s]) for s in batches], [np64(y[s]) for s in batches])
        )
        <= 1e-5
    )
    for kernel in ("linear", "rbf"):
        for debiased in (False, True):
            got = cka(xc[:500], yc[:500], kernel=kernel, debiased=debiased).cpu()
            assert rel_err(got, cka_ref(np64(x[:500]), np64(y[:500]), kernel, 1.0, debiased)) <= 1e-5
