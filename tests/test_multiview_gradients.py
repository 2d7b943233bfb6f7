"""uniformity and alignment as training losses: gradients and the backward pass's memory (issue 11, part 3)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from reprmetrics import Alignment, Uniformity
from reprmetrics.functional import alignment, uniformity


def naive_uniformity(x, t=2.0, normalize=True):
    """Wang & Isola's formulation: every pair through torch.pdist, autograd end to end."""
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    sq = torch.pdist(x).square()
    return torch.logsumexp(-t * sq, dim=0) - torch.log(torch.tensor(float(sq.numel()), dtype=x.dtype))


def naive_alignment(x, y, alpha=2.0):
    x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("tile", [None, 4])
def test_uniformity_gradcheck(normalize, t, tile):
    from reprmetrics.functional.multiview import _uniformity_from_points

    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _uniformity_from_points(a, t, normalize, "uniformity", tile=tile), (x,))
    assert torch.autograd.gradcheck(lambda a: uniformity(a, t=t, normalize=normalize), (x,))


def test_uniformity_gradcheck_near_collapse_and_far_from_origin():
    # The expm1 (near-zero) branch and a cloud far from the origin relative to its spread.
    x = (1.0 + 1e-3 * torch.randn(9, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: uniformity(a, normalize=False), (x,))
    assert torch.autograd.gradcheck(lambda a: uniformity(a), (x,))


@pytest.mark.parametrize("normalize", [True, False])
def test_uniformity_gradient_equals_naive_pdist_at_2000_points(normalize):
    x = torch.randn(2000, 32, dtype=torch.float64)
    if not normalize:
        x = x / 4  # keep t·d² in a range where the naive form's log-sum-exp is accurate
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    value = uniformity(a, normalize=normalize)
    (grad,) = torch.autograd.grad(value, a)
    expected_value = naive_uniformity(b, normalize=normalize)
    (expected,) = torch.autograd.grad(expected_value, b)
    assert abs(value.item() - expected_value.item()) <= 1e-10 * abs(expected_value.item())
    assert float((grad - expected).norm() / expected.norm()) <= 1e-6
    assert float((grad - expected).abs().max() / expected.abs().max()) <= 1e-6


def test_uniformity_float32_gradient_is_close_and_has_the_input_dtype():
    x = torch.randn(600, 16)
    a = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(uniformity(a), a)
    b = x.double().requires_grad_()
    (expected,) = torch.autograd.grad(naive_uniformity(b), b)
    assert grad.dtype == torch.float32
    assert float((grad.double() - expected).norm() / expected.norm()) <= 1e-4


def test_uniformity_of_identical_points_has_zero_gradient():
    x = torch.randn(1, 8, dtype=torch.float64).expand(50, 8).clone().requires_grad_()
    value = uniformity(x)
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == 0.0 and float(grad.abs().max()) <= 1e-12


def test_uniformity_without_grad_is_unchanged_and_builds_no_graph():
    x = torch.randn(300, 8, dtype=torch.float64)
    with torch.no_grad():
        plain = uniformity(x.clone().requires_grad_())
    assert not plain.requires_grad
    assert float(plain) == pytest.approx(float(naive_uniformity(x)), rel=1e-12)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_alignment_gradcheck(alpha, normalize):
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: alignment(p, q, alpha=alpha, normalize=normalize), (x, y))


def test_alignment_gradient_equals_naive_and_is_finite_at_identical_pairs():
    x = torch.randn(500, 16, dtype=torch.float64)
    y = x + 0.1 * torch.randn(500, 16, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (g,) = torch.autograd.grad(alignment(a, y), a)
    (e,) = torch.autograd.grad(naive_alignment(b, y), b)
    assert float((g - e).norm() / e.norm()) <= 1e-10
    same = x.clone().requires_grad_()
    (g0,) = torch.autograd.grad(alignment(same, x), same)
    assert torch.equal(g0, torch.zeros_like(g0))


def test_alignment_class_forward_is_a_loss_and_state_is_detached():
    assert Alignment.is_differentiable is True and Uniformity.is_differentiable is False
    metric = Alignment()
    x = torch.randn(32, 8, requires_grad=True)
    y = torch.randn(32, 8)
    for _ in range(3):
        loss = metric(x, y)
        loss.backward()
        assert not metric.sum_distances.requires_grad
    assert torch.allclose(x.grad, 3 * torch.autograd.grad(naive_alignment(x, y), x)[0], rtol=1e-4, atol=1e-7)


_BACKWARD_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from reprmetrics.functional.multiview import uniformity
    torch.set_num_threads(1)
    x = torch.randn(16_384, 128, dtype=torch.{dtype}).requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far (imports, x)
    value = uniformity(x)
    value.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before, value.item(), bool(torch.isfinite(x.grad).all()))
    """
)


@pytest.mark.slow  # peak RSS of a fresh interpreter on 16,384 points
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_uniformity_backward_at_16384_points_stays_under_300mb(dtype):
    """Peak RSS growth of forward + backward in a fresh process (an N×N float32 matrix alone is 1 GiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _BACKWARD_RSS_SCRIPT.format(dtype=dtype)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    extra_kib, value, finite = out.stdout.split()
    assert int(extra_kib) * 1024 < 300 * 10**6  # measured about 200 MiB (float32), 172 MiB (float64)
    assert float(value) == pytest.approx(-2 * 2 + 2 * 4 / 128, abs=0.02) and finite == "True"
