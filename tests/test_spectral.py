import pickle

import numpy as np
import pytest
import torch
from _helpers import embeddings
from _helpers.harness import rel_err, state_of, uneven_batches
from ddp import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from references import alpha_req_ref, covariance_eigenvalues_ref, rankme_ref
from torchmetrics import MetricCollection

from reprmetrics import AlphaReQ, RankMe
from reprmetrics.functional import alpha_req, eigenspectrum, rankme, singular_values

CASES = embeddings.SPECTRAL_CASES


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rankme_matches_numpy_reference(case, dtype):
    z = CASES[case](dtype)
    expected = rankme_ref(z.double().numpy())
    assert rel_err(rankme(z), expected) <= 1e-4
    metric = RankMe()
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_req_matches_numpy_reference(case, dtype):
    z = CASES[case](dtype)
    fit_range = (11, 100)
    expected = alpha_req_ref(z.double().numpy(), fit_range, torch.finfo(dtype).eps)
    assert rel_err(alpha_req(z, fit_range), expected) <= 1e-3
    metric = AlphaReQ(fit_range=fit_range)
    for b in uneven_batches(z):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_class_equals_functional_on_concatenation(case):
    z = CASES[case](torch.float64)
    r, a = RankMe(), AlphaReQ()
    for b in uneven_batches(z, sizes=(33, 1, 64)):
        r.update(b)
        a.update(b)
    assert rel_err(r.compute(), rankme(z)) <= 1e-6
    assert rel_err(a.compute(), alpha_req(z)) <= 1e-6


def test_spectra_match_numpy():
    z = embeddings.decaying(300, 40, dtype=torch.float64)
    np.testing.assert_allclose(singular_values(z).numpy(), np.linalg.svd(z.numpy(), compute_uv=False), rtol=1e-9)
    np.testing.assert_allclose(eigenspectrum(z).numpy(), covariance_eigenvalues_ref(z.numpy()), rtol=1e-9)
    wide = embeddings.gaussian(20, 50)
    assert singular_values(wide).shape == (20,)
    np.testing.assert_allclose(
        eigenspectrum(wide).numpy(), covariance_eigenvalues_ref(wide.numpy())[:20], rtol=1e-8, atol=1e-12
    )


def test_alpha_recovers_a_known_power_law():
    z = embeddings.decaying(20000, 128, alpha=1.5)
    assert abs(alpha_req(z).item() - 1.5) < 0.1


def test_float64_accumulator_keeps_small_singular_values_and_float32_does_not():
    """The measurement behind the float64 default (see reprmetrics/_linalg.py)."""
    z = embeddings.near_collapsed(4096, 64, noise=1e-3, dtype=torch.float32)
    expected = rankme_ref(z.double().numpy())
    errors = {}
    for dtype in (torch.float64, torch.float32):
        metric = RankMe(accumulate_dtype=dtype)
        for b in z.split(256):
            metric.update(b)
        errors[dtype] = rel_err(metric.compute(), expected)
    assert errors[torch.float64] < 1e-6
    assert errors[torch.float32] > 10 * errors[torch.float64]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), n=st.integers(5, 80), d=st.integers(2, 40))
def test_rankme_invariant_to_rotation_and_positive_rescaling(seed, scale, n, d):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    base = rankme(z)
    assert rel_err(rankme(z @ q), base) <= 1e-9
    assert rel_err(rankme(z * scale), base) <= 1e-9
    assert 1.0 - 1e-6 <= base.item() <= min(n, d) + 1e-3


def test_low_precision_and_autocast_are_computed_at_full_precision():
    z = embeddings.decaying(512, 64, dtype=torch.float32)
    for low in (torch.float16, torch.bfloat16):
        zl = z.to(low)
        expected = rankme_ref(zl.double().numpy())
        assert rankme(zl).dtype == torch.float32
        assert rel_err(rankme(zl), expected) <= 1e-4
        metric = RankMe()
        metric.update(zl)
        assert rel_err(metric.compute(), expected) <= 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rankme(z)
        metric = AlphaReQ()
        metric.update(z)
        inside_alpha = metric.compute()
    assert rel_err(inside, rankme_ref(z.double().numpy())) <= 1e-4
    assert rel_err(inside_alpha, alpha_req_ref(z.double().numpy(), input_eps=torch.finfo(torch.float32).eps)) <= 1e-3


def test_degenerate_inputs_give_finite_documented_values():
    assert rankme(torch.zeros(10, 5)).item() == pytest.approx(np.exp(-5 * 1e-7 * np.log(1e-7)), rel=1e-6)
    assert rankme(torch.zeros(10, 5), eps=0.0).item() == 1.0
    same = torch.ones(50, 8) * torch.randn(1, 8)
    assert rankme(same, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)
    metric = RankMe()
    metric.update(torch.zeros(4, 3))
    assert torch.isfinite(metric.compute())


@pytest.mark.parametrize("cls", [RankMe, AlphaReQ])
def test_compute_before_update_and_too_few_samples(cls):
    with pytest.raises(ValueError, match="before any update"):
        cls().compute()
    metric = cls()
    metric.update(torch.randn(1, 16))
    if cls is AlphaReQ:
        with pytest.raises(ValueError, match="at least 2 samples"):
            metric.compute()
        metric.update(torch.randn(5, 16))
        with pytest.raises(ValueError, match="at least 3"):
            metric.compute()  # only 5 non-zero eigenvalues, fit range starts at 11
    else:
        assert metric.compute().item() == pytest.approx(1.0, abs=1e-4)


def test_bad_arguments():
    for kwargs in ({"eps": -1.0}, {"num_features": 0}, {"accumulate_dtype": torch.float16}):
        with pytest.raises(ValueError, match="RankMe"):
            RankMe(**kwargs)
    for fit_range in ((0, 10), (5, 6), (3,), "ab"):
        with pytest.raises(ValueError, match="AlphaReQ"):
            AlphaReQ(fit_range=fit_range)


def test_torchmetrics_conventions():
    z = embeddings.decaying(600, 32, dtype=torch.float32)
    coll = MetricCollection({"rankme": RankMe(), "alpha": AlphaReQ(fit_range=(3, 30))})
    for b in z.split(100):
        coll.update(b)
    values = coll.compute()
    assert rel_err(values["rankme"], rankme(z)) <= 1e-6
    assert rel_err(values["alpha"], alpha_req(z, (3, 30))) <= 1e-6

    metric = RankMe(num_features=32)
    batch_value = metric(z[:100])  # forward: value of this batch, state accumulates
    assert rel_err(batch_value, rankme(z[:100])) <= 1e-6
    metric.update(z[100:])
    clone = pickle.loads(pickle.dumps(metric))
    assert rel_err(clone.compute(), rankme(z)) <= 1e-6
    metric.reset()
    metric.update(z[:50])
    assert rel_err(metric.compute(), rankme(z[:50])) <= 1e-6
    assert RankMe.full_state_update is False and RankMe.higher_is_better is True


def test_reset_allows_a_new_width():
    metric = RankMe()
    metric.update(torch.randn(10, 4))
    metric.reset()
    metric.update(torch.randn(10, 6))
    assert metric.moments.shape == (6 + 3, 6)  # the packed centred moments of 6 features


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = RankMe()
    metric.update(torch.randn(50, 8))
    fig, ax = metric.plot()
    assert fig is not None and ax is not None


def _ddp_spectral(rank, world_size, z):
    # Uneven split: rank 0 gets 3 batches of the first 40 %, rank 1 the rest in 2 batches.
    cut = int(0.4 * len(z))
    mine = z[:cut].split(cut // 3 + 1) if rank == 0 else z[cut:].split((len(z) - cut) // 2 + 1)
    r, a = RankMe(), AlphaReQ()
    for b in mine:
        r.update(b)
        a.update(b)
    return r.compute(), a.compute(), sum(len(b) for b in mine)


def test_ddp_two_processes_equal_one_process_on_all_data():
    z = embeddings.decaying(901, 48, dtype=torch.float64)
    results = run_distributed(_ddp_spectral, z)
    single_r, single_a = rankme(z), alpha_req(z)
    assert results[0][2] != results[1][2] and results[0][2] + results[1][2] == len(z)
    for r_val, a_val, _ in results:
        assert rel_err(r_val, single_r) <= 1e-6
        assert rel_err(a_val, single_a) <= 1e-6
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    z = embeddings.decaying(2048, 256, dtype=torch.float32)
    metric = RankMe().cuda()
    for b in z.cuda().split(256):
        metric.update(b)
    assert metric.compute().device.type == "cuda"
    assert rel_err(metric.compute().cpu(), rankme_ref(z.double().numpy())) <= 1e-4
    assert (
        rel_err(alpha_req(z.cuda()).cpu(), alpha_req_ref(z.double().numpy(), input_eps=torch.finfo(torch.float32).eps))
        <= 1e-3
    )


@pytest.mark.parametrize("cls", [RankMe, AlphaReQ])
def test_forward_accumulates_without_num_features_and_keeps_state_on_error(cls):
    z = embeddings.decaying(400, 32, dtype=torch.float64)
    metric = cls()
    for b in z.split(100):
        batch_value = metric(b)
        assert torch.isfinite(batch_value)
    before = state_of(metric)
    with pytest.raises(ValueError, match=cls.__name__):
        metric(
            torch.randn(3, 32, dtype=torch.float64) if cls is AlphaReQ else torch.randn(3, 31)
        )  # too few / wrong width
    after = state_of(metric)
    assert all(torch.equal(before[k], after[k]) for k in before)
    expected = rankme(z) if cls is RankMe else alpha_req(z)
    assert rel_err(metric.compute(), expected) <= 1e-6
