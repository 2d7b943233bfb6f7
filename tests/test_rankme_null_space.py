"""RankMe on exactly rank-deficient input: zero singular values must not be read as rank (issue 11, part 2)."""

import numpy as np
import pytest
import torch
from references import rankme_ref

from reprmetrics import RankMe
from reprmetrics._linalg import gram_zero_tolerance
from reprmetrics.functional import rankme, singular_values
from reprmetrics.functional.spectral import rankme_diagnostics


def exact_rank(n, d, r, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, r)) @ rng.standard_normal((r, d)))


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


SHAPES = [(300, 64), (2048, 256), (600, 2048), (512, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 5, 16])
def test_exact_rank_matches_svd(shape, rank):
    z = exact_rank(*shape, rank, seed=rank)
    assert rel(rankme(z, eps=0.0), rankme_ref(z.numpy(), eps=0.0)) <= 1e-9
    assert rel(rankme(z), rankme_ref(z.numpy())) <= 1e-6
    sigma = singular_values(z)
    assert int((sigma > 0).sum()) == rank


@pytest.mark.parametrize("rank", [1, 3, 16])
@pytest.mark.parametrize("shape", [(2048, 128), (1200, 1024)])
def test_streaming_exact_rank_matches_svd(shape, rank):
    z = exact_rank(*shape, rank, seed=10 + rank)
    metric, plain = RankMe(eps=0.0), RankMe()
    for b in z.split(256):
        metric.update(b)
        plain.update(b)
    # compute() returns float32 (torchmetrics convention); diagnostics() carries the float64 value.
    assert rel(metric.diagnostics()["rankme"], rankme_ref(z.numpy(), eps=0.0)) <= 1e-9
    assert rel(metric.compute(), rankme_ref(z.numpy(), eps=0.0)) <= 1e-7
    assert rel(plain.diagnostics()["rankme"], rankme_ref(z.numpy())) <= 1e-6


@pytest.mark.parametrize("rank", list(range(1, 17)))
def test_every_rank_up_to_16(rank):
    z = exact_rank(400, 96, rank, seed=rank)
    assert rel(rankme(z, eps=0.0), rankme_ref(z.numpy(), eps=0.0)) <= 1e-9


def test_full_rank_inputs_unchanged():
    """No genuine singular value is anywhere near the round-off level: nothing is zeroed."""
    rng = np.random.default_rng(3)
    k = np.arange(1, 129)
    cases = [
        rng.standard_normal((1000, 128)),
        rng.standard_normal((1000, 128)) * k**-1.0,  # σ spread over two decades
        rng.standard_normal((1000, 1)) @ rng.standard_normal((1, 128)) + 1e-3 * rng.standard_normal((1000, 128)),
        rng.standard_normal((50, 300)),
    ]
    for z in cases:
        t = torch.from_numpy(z)
        assert int((singular_values(t) > 0).sum()) == min(z.shape)
        np.testing.assert_allclose(singular_values(t).numpy(), np.linalg.svd(z, compute_uv=False), rtol=1e-6)
        assert rel(rankme(t), rankme_ref(z)) <= 1e-9


def test_tolerance_bounds_the_measured_round_off_with_margin():
    """The spurious eigenvalues of exact rank-r Grams stay below a fifth of gram_zero_tolerance."""
    for n, d, r in [(512, 64, 1), (1000, 2048, 4), (2048, 512, 16)]:
        z = exact_rank(n, d, r, seed=r)
        g = z.T @ z if n >= d else z @ z.T
        lam = torch.linalg.eigvalsh(g).flip(0)
        tol = gram_zero_tolerance(float(lam.sum()), n, d)
        assert float(lam[r:].abs().max()) < 0.2 * tol < float(lam[r - 1])


def test_diagnostics_top_singular_value_and_condition_number():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((500, 40)) * np.linspace(1.0, 0.1, 40)
    sigma = np.linalg.svd(z, compute_uv=False)
    diag = rankme_diagnostics(torch.from_numpy(z))
    assert rel(diag["top_singular_value"], sigma[0]) <= 1e-9
    assert rel(diag["condition_number"], sigma[0] / sigma[-1]) <= 1e-6
    assert diag["numerical_rank"] == 40 and rel(diag["rankme"], rankme_ref(z)) <= 1e-9
    metric = RankMe()
    for b in torch.from_numpy(z).split(128):
        metric.update(b)
    streamed = metric.diagnostics()
    assert rel(streamed["top_singular_value"], sigma[0]) <= 1e-9
    assert rel(streamed["condition_number"], sigma[0] / sigma[-1]) <= 1e-6
    assert rel(streamed["rankme"], metric.compute()) <= 1e-6
    low = rankme_diagnostics(exact_rank(300, 50, 3))
    assert low["numerical_rank"] == 3 and np.isfinite(low["condition_number"])
    zero = rankme_diagnostics(torch.zeros(10, 4))
    assert zero == {
        "rankme": 1.0 + zero["rankme"] - 1.0,
        "top_singular_value": 0.0,
        "condition_number": 1.0,
        "numerical_rank": 0,
    }
