import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _helpers.harness import assert_rejects, rel_err, uneven_batches
from ddp import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from references_multiview import alignment_ref, lidar_ref, uniformity_ref
from torchmetrics import MetricCollection

from reprmetrics.functional.multiview import (
    _CPU_TILE,
    _CUDA_TILE,
    _uniformity_from_points,
    _uniformity_tile,
    _uniformity_tiles,
    alignment,
    lidar,
    uniformity,
)
from reprmetrics.multiview import Alignment, LiDAR, Uniformity

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def grouped(n, q, d, rank=None, within=0.3, offset=0.0, seed=0, exact_means=False):
    """n groups of q views: group centres (spanning `rank` directions if given) plus per-view noise.

    ``exact_means``: the noise of each group sums to zero, so the group means are the centres.
    """
    g = gen(seed)
    if rank is None:
        centres = torch.randn(n, d, generator=g, dtype=F64)
    else:
        centres = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, d, generator=g, dtype=F64)
    noise = within * torch.randn(n, q, d, generator=g, dtype=F64)
    if exact_means:
        noise = noise - noise.mean(dim=1, keepdim=True)
    return centres.unsqueeze(1) + noise + offset


def views_varying_in_few_directions(n, q, d, k, seed=0):
    """Views of a sample differ only in k of the d directions: Σ_w is δ in the other d − k."""
    g = gen(seed)
    noise = torch.zeros(n, q, d, dtype=F64)
    noise[..., :k] = torch.randn(n, q, k, generator=g, dtype=F64)
    return torch.randn(n, 1, d, generator=g, dtype=F64) + noise


LIDAR_CASES = {
    "isotropic_q2": lambda: grouped(300, 2, 32),
    "q4": lambda: grouped(150, 4, 48, seed=1),
    "means_span_3_directions": lambda: grouped(300, 2, 64, rank=3, seed=2),
    "few_directions_low_within": lambda: grouped(200, 3, 64, rank=3, within=1e-3, seed=3),
    "views_vary_in_4_directions": lambda: views_varying_in_few_directions(250, 2, 64, k=4, seed=4),
    "n_lt_d": lambda: grouped(20, 3, 64, seed=5),
    "large_offset": lambda: grouped(300, 2, 32, offset=1e3, seed=6),
}


def group_batches(v, sizes=(7, 50, 1, 90)):
    return uneven_batches(v, sizes)


# ----------------------------------------------------------------------------------------------
# LiDAR
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(LIDAR_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lidar_matches_reference(case, dtype):
    v = LIDAR_CASES[case]().to(dtype)
    expected = lidar_ref(v.double().numpy())
    value = lidar(v)
    assert value.dtype == torch.promote_types(dtype, torch.float32)
    assert rel_err(value, expected) <= 1e-4
    metric = LiDAR()
    for b in group_batches(v):
        metric.update(b)
    assert rel_err(metric.compute(), expected) <= 1e-4


@pytest.mark.parametrize("case", list(LIDAR_CASES))
def test_lidar_class_equals_functional_on_concatenation(case):
    v = LIDAR_CASES[case]()
    metric = LiDAR(delta=1e-3, eps=1e-6)
    for b in group_batches(v, sizes=(33, 2, 64)):
        metric.update(b)
    assert rel_err(metric.compute(), lidar(v, delta=1e-3, eps=1e-6)) <= 1e-6


def test_lidar_other_delta_and_eps_match_reference():
    v = grouped(120, 3, 24, rank=6, seed=7)
    for delta, eps in ((1e-2, 0.0), (0.0, 1e-8), (1.0, 1e-4)):
        assert rel_err(lidar(v, delta=delta, eps=eps), lidar_ref(v.numpy(), delta, eps)) <= 1e-6


@pytest.mark.parametrize("k", [1, 3, 8])
def test_lidar_of_means_spanning_k_directions_is_at_most_k(k):
    v = grouped(400, 2, 48, rank=k, seed=k, exact_means=True)
    value = lidar(v).item()
    assert 1.0 - 1e-6 <= value <= k + 1e-3
    if k > 1:
        assert value > 0.5 * k  # not collapsed to one direction either
    metric = LiDAR()
    metric.update(v)
    assert metric.compute().item() <= k + 1e-3


def test_lidar_grows_with_the_number_of_discriminable_directions():
    values = [lidar(grouped(300, 2, 32, rank=k, seed=10, exact_means=True)).item() for k in (2, 8, 24)]
    assert values[0] < values[1] < values[2]


def test_lidar_degenerate_inputs_give_finite_documented_values():
    d = 16
    same = torch.randn(1, 1, d, dtype=F64).expand(10, 3, d).contiguous()  # every view of every sample identical
    assert lidar(same).item() == pytest.approx(np.exp(-d * 1e-8 * np.log(1e-8)), rel=1e-9)
    assert lidar(same, eps=0.0).item() == 1.0
    assert lidar(torch.zeros(5, 2, d), eps=0.0).item() == 1.0
    # Identical views inside each group: Σ_w = δI exactly, still finite and as defined.
    no_within = torch.randn(30, 1, d, dtype=F64).expand(30, 4, d).contiguous()
    assert rel_err(lidar(no_within), lidar_ref(no_within.numpy())) <= 1e-6
    metric = LiDAR(eps=0.0)
    metric.update(same)
    assert metric.compute().item() == 1.0
    # Every sample has the same views (Σ_b = 0) far from the origin: the streamed Σ_b is round-off only.
    copies = (1e3 + torch.randn(1, 4, d, dtype=F64)).expand(500, 4, d).contiguous()
    assert lidar(copies, eps=0.0).item() == 1.0
    metric = LiDAR(eps=0.0)
    for b in copies.split(64):
        metric.update(b)
    assert metric.compute().item() == 1.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(12, 40), q=st.integers(2, 4), d=st.integers(1, 6))
def test_lidar_without_ridge_is_invariant_to_invertible_linear_maps(seed, n, q, d):
    """LDA is affine-invariant: with δ = 0, z → Az + b leaves every λ, so LiDAR, unchanged."""
    g = gen(seed)
    v = torch.randn(n, q, d, generator=g, dtype=F64) + torch.randn(n, 1, d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64) + 3 * torch.eye(d, dtype=F64)
    shift = torch.randn(d, generator=g, dtype=F64)
    base = lidar(v, delta=0.0)
    assert rel_err(lidar(v @ a.T + shift, delta=0.0), base) <= 1e-6
    assert 1.0 - 1e-6 <= base.item() <= d + 1e-3


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------


def pair(n, d, noise=0.3, seed=0, dtype=F64):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x.to(dtype), (x + noise * torch.randn(n, d, generator=g, dtype=F64)).to(dtype)


@pytest.mark.parametrize("shape", [(1, 3), (257, 16), (1000, 128)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_alignment_matches_reference(shape, dtype, alpha, normalize):
    x, y = pair(*shape, dtype=dtype)
    expected = alignment_ref(x.double().numpy(), y.double().numpy(), alpha, normalize)
    value = alignment(x, y, alpha=alpha, normalize=normalize)
    assert value.dtype == torch.promote_types(dtype, torch.float32)
    assert rel_err(value, expected) <= 1e-4
    metric = Alignment(alpha=alpha, normalize=normalize)
    for xb, yb in zip(x.split(100), y.split(100)):
        metric.update(xb, yb)
    assert rel_err(metric.compute(), expected) <= 1e-4


def test_alignment_near_identical_views_keep_relative_precision():
    x, y = pair(500, 64, noise=1e-6)
    assert rel_err(alignment(x, y), alignment_ref(x.numpy(), y.numpy())) <= 1e-6


def test_alignment_is_zero_for_identical_views_and_bounded_on_the_sphere():
    x = torch.randn(300, 32)
    assert alignment(x, x).item() == 0.0
    assert alignment(x, 5.0 * x).item() == pytest.approx(0.0, abs=1e-12)  # same direction
    metric = Alignment()
    metric.update(x, x.clone())
    assert metric.compute().item() == 0.0
    assert alignment(x, -x).item() == pytest.approx(4.0, rel=1e-6)  # antipodal: ‖x̂ − ŷ‖² = 4


# ----------------------------------------------------------------------------------------------
# uniformity
# ----------------------------------------------------------------------------------------------


def clusters(k, n, d, spread, seed=0):
    g = gen(seed)
    centres = 3 * torch.randn(k, d, generator=g, dtype=F64)
    return torch.cat([c + spread * torch.randn(n // k, d, generator=g, dtype=F64) for c in centres])


UNIFORMITY_CASES = {
    "isotropic": lambda: torch.randn(1100, 64, generator=gen(0), dtype=F64),  # crosses 1024-point tiles
    "one_tight_cluster": lambda: clusters(1, 1025, 32, 1e-3, seed=1),  # last tile is 1×1
    "very_tight_cluster": lambda: clusters(1, 600, 32, 1e-5, seed=2),  # value ≈ −1e-10
    "two_clusters": lambda: clusters(2, 800, 32, 1e-3, seed=3),
    # Value near 0 although the mean squared distance is not: the log-sum-exp pass is redone with expm1.
    "mostly_one_cluster": lambda: torch.cat([clusters(1, 950, 32, 1e-4, seed=9), clusters(1, 50, 32, 1e-4, seed=10)]),
    "five_clusters": lambda: clusters(5, 800, 32, 1e-2, seed=4),
    "rank_3": lambda: (
        torch.randn(900, 3, generator=gen(5), dtype=F64) @ torch.randn(3, 48, generator=gen(6), dtype=F64)
    ),
    "large_offset": lambda: torch.randn(700, 16, generator=gen(7), dtype=F64) + 1e3,
    "two_points": lambda: torch.randn(2, 8, generator=gen(8), dtype=F64),
}


@pytest.mark.parametrize("case", list(UNIFORMITY_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [2.0, 0.5, 50.0])
def test_uniformity_matches_reference(case, dtype, t):
    x = UNIFORMITY_CASES[case]().to(dtype)
    for normalize in (True, False):
        expected = uniformity_ref(x.double().numpy(), t, normalize)
        value = uniformity(x, t=t, normalize=normalize)
        assert value.dtype == torch.promote_types(dtype, torch.float32)
        assert rel_err(value, expected) <= 1e-4, (normalize, float(value), expected)
    metric = Uniformity(t=t)
    for b in x.split(333):
        metric.update(b)
    assert rel_err(metric.compute(), uniformity_ref(x.double().numpy(), t)) <= 1e-4


def test_uniformity_class_equals_functional_on_concatenation():
    x = UNIFORMITY_CASES["five_clusters"]()
    metric = Uniformity(t=3.0, normalize=False)
    for b in x.split(77):
        metric.update(b)
    assert rel_err(metric.compute(), uniformity(x, t=3.0, normalize=False)) <= 1e-6  # float32 result


@pytest.mark.parametrize("num_points", [2, 3, 7, 8, 50])
@pytest.mark.parametrize("tile", [1, 3, 7, 64])
def test_uniformity_tiles_cover_every_pair_exactly_once(num_points, tile):
    covered = []
    for r0, r1, c0, c1 in _uniformity_tiles(num_points, tile):
        covered += [(i, j) for i in range(r0, r1) for j in range(c0, c1) if i < j]
        assert c0 >= r0 and r1 - r0 <= tile and c1 - c0 <= tile  # nothing below the diagonal
    assert sorted(covered) == [(i, j) for i in range(num_points) for j in range(i + 1, num_points)]
    x = torch.randn(num_points, 5, generator=gen(num_points), dtype=F64)
    for normalize in (True, False):
        value = _uniformity_from_points(x, 2.0, normalize, "uniformity", tile=tile)
        assert rel_err(value, uniformity_ref(x.numpy(), 2.0, normalize)) <= 1e-9


def test_uniformity_on_the_sphere_is_close_to_the_closed_form():
    # cos θ of two uniform points on S^{d−1} is about N(0, 1/d): E exp(−t(2 − 2cos θ)) ≈ exp(−2t + 2t²/d).
    for t, d in ((2.0, 128), (1.0, 64)):
        x = torch.randn(4000, d, generator=gen(d))
        assert uniformity(x, t=t).item() == pytest.approx(-2 * t + 2 * t * t / d, abs=0.01)  # −3.94, −1.97


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_uniformity_of_identical_points_is_exactly_zero(dtype):
    x = torch.randn(1, 24).expand(700, 24).to(dtype)
    for normalize in (True, False):
        assert uniformity(x, normalize=normalize).item() == 0.0
        assert uniformity(x, t=500.0, normalize=normalize).item() == 0.0
    metric = Uniformity()
    metric.update(x[:300])
    metric.update(x[300:])
    assert metric.compute().item() == 0.0


def test_uniformity_tiles_are_bounded_and_independent_of_n():
    """The memory bound behind 'never an N×N matrix', checked without timing or allocation stats."""
    assert _uniformity_tile(torch.device("cpu")) == _CPU_TILE
    assert _uniformity_tile(torch.device("cuda")) == _CUDA_TILE
    assert 4 * _CPU_TILE**2 <= 4 * 2**20 and 4 * _CUDA_TILE**2 <= 64 * 2**20  # float32 tile: 4 MiB CPU, 64 MiB GPU
    for tile in (_CPU_TILE, _CUDA_TILE):
        tiles = _uniformity_tiles(30_000, tile)
        assert max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles) == tile * tile
        assert sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles) < 0.6 * 30_000**2  # about half


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from reprmetrics.functional.multiview import uniformity
    torch.set_num_threads(1)  # robust timing on a busy machine; memory does not depend on it
    x = torch.randn(30_000, 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far (imports, x)
    value = uniformity(x).item()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before, value)
    """
)


@pytest.mark.slow  # peak RSS of a fresh interpreter on 30,000 points
def test_uniformity_of_30000_points_uses_far_less_than_1gb():
    """Peak RSS growth of a fresh process: an upper bound on the extra memory (N×N float32 would be 3.6 GB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    extra_kib, value = out.stdout.split()
    assert int(extra_kib) * 1024 < 256 * 2**20  # measured about 80 MiB; the requirement is 1 GB
    assert float(value) == pytest.approx(-2 * 2 + 2 * 4 / 64, abs=0.02)


def test_uniformity_keeps_a_bounded_sample():
    x = torch.randn(5000, 16, generator=gen(3))
    metric = Uniformity(max_samples=1000)
    for b in x.split(250):
        metric.update(b)
        assert sum(len(s) for s in metric.samples) <= 4 * 1000 + 250
    kept = metric._sample()
    assert kept.shape == (1000, 16)
    assert rel_err(metric.compute(), uniformity(kept)) <= 1e-9
    assert metric.compute().item() == pytest.approx(uniformity(x).item(), abs=0.05)  # a random subset


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60), d=st.integers(1, 12), scale=st.floats(1e-3, 1e3))
def test_uniformity_and_alignment_are_invariant_to_rotation_and_row_scaling(seed, n, d, scale):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x + 0.5 * torch.randn(n, d, generator=g, dtype=F64)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    row_scale = scale * torch.rand(n, 1, generator=g, dtype=F64) + 1e-3
    u = uniformity(x)
    assert uniformity(x @ rot * row_scale).item() == pytest.approx(u.item(), rel=1e-9, abs=1e-15)
    assert uniformity(x).item() <= 0.0
    a = alignment(x, y)
    assert alignment(x @ rot * row_scale, y @ rot).item() == pytest.approx(a.item(), rel=1e-9, abs=1e-15)


def test_uniformity_ignores_a_reduced_float32_matmul_precision():
    x = UNIFORMITY_CASES["two_clusters"]().float()
    expected = uniformity_ref(x.double().numpy())
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert rel_err(uniformity(x), expected) <= 1e-4
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(previous)


# ----------------------------------------------------------------------------------------------
# all three: precision, bad input, conventions
# ----------------------------------------------------------------------------------------------


def test_low_precision_and_autocast_are_computed_at_full_precision():
    v = grouped(200, 2, 16, seed=11).float()
    x, y = pair(400, 32, dtype=torch.float32)
    for low in (torch.float16, torch.bfloat16):
        vl, xl, yl = v.to(low), x.to(low), y.to(low)
        assert lidar(vl).dtype == torch.float32
        assert rel_err(lidar(vl), lidar_ref(vl.double().numpy())) <= 1e-4
        assert rel_err(alignment(xl, yl), alignment_ref(xl.double().numpy(), yl.double().numpy())) <= 1e-4
        assert rel_err(uniformity(xl), uniformity_ref(xl.double().numpy())) <= 1e-4
        m = Uniformity()
        m.update(xl)
        assert m.samples[0].dtype == torch.float32
        assert rel_err(m.compute(), uniformity_ref(xl.double().numpy())) <= 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (lidar(v), alignment(x, y), uniformity(x))
        metric = LiDAR()
        metric.update(v)
        inside_class = metric.compute()
    assert rel_err(inside[0], lidar_ref(v.double().numpy())) <= 1e-4
    assert rel_err(inside_class, lidar_ref(v.double().numpy())) <= 1e-4
    assert rel_err(inside[1], alignment_ref(x.double().numpy(), y.double().numpy())) <= 1e-4
    assert rel_err(inside[2], uniformity_ref(x.double().numpy())) <= 1e-4


def test_lidar_bad_input_raises_and_leaves_state_unchanged():
    metric = LiDAR()
    metric.update(torch.randn(10, 3, 8))
    assert_rejects(
        metric,
        {
            "NaN or infinite": (torch.full((4, 3, 8), float("nan")),),
            "infinite": (torch.full((4, 3, 8), float("inf")),),
            "shape (N, Q, D)": (torch.randn(4, 8),),
            "earlier batches had 8": (torch.randn(4, 3, 9),),
            "earlier batches had q=3": (torch.randn(4, 2, 8),),
            "at least 2 augmented views": (torch.randn(4, 1, 8),),
            "must be a torch.Tensor": (np.zeros((4, 3, 8)),),
        },
        "LiDAR",
    )
    with pytest.raises(ValueError, match="LiDAR: needs at least 2 samples"):
        metric(torch.randn(1, 3, 8))  # forward()'s value of this batch alone; the state keeps out the batch
    metric.update(torch.randn(1, 3, 8))  # a single group is fine for update()
    assert int(metric.num_groups) == 11


def test_alignment_bad_input_raises_and_leaves_state_unchanged():
    metric = Alignment()
    metric.update(torch.randn(10, 8), torch.randn(10, 8))
    zero_row = torch.randn(4, 8)
    zero_row[2] = 0
    assert_rejects(
        metric,
        {
            "same shape": (torch.randn(4, 8), torch.randn(5, 8)),
            "earlier batches had 8": (torch.randn(4, 9), torch.randn(4, 9)),
            "NaN or infinite": (torch.randn(4, 8), torch.full((4, 8), float("nan"))),
            "shape (N, D)": (torch.randn(4, 2, 8), torch.randn(4, 2, 8)),
        },
        "Alignment",
    )
    # A zero row has no direction and stays zero when normalised: distance 1 to its unit partner.
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    zero = torch.zeros(4, 8)
    pairs = Alignment()
    pairs.update(x, zero)
    assert pairs.compute().item() == pytest.approx(1.0)


def test_uniformity_bad_input_raises_and_leaves_state_unchanged():
    metric = Uniformity()
    metric.update(torch.randn(10, 8))
    zero_row = torch.randn(4, 8)
    zero_row[0] = 0
    assert_rejects(
        metric,
        {
            "NaN or infinite": (torch.full((4, 8), float("-inf")),),
            "earlier batches had 8": (torch.randn(4, 9),),
            "shape (N, D)": (torch.randn(4, 2, 8),),
        },
        "Uniformity",
    )
    metric.update(zero_row)  # a zero row stays zero when normalised (the one zero-row policy)
    Uniformity(normalize=False).update(zero_row)


def test_functional_bad_input():
    cases = [
        (lambda: lidar(torch.randn(1, 3, 8)), "lidar: `views` needs at least 2 rows"),
        (lambda: lidar(torch.randn(5, 1, 8)), "q >= 2"),
        (lambda: lidar(torch.randn(5, 8)), "shape (N, Q, D)"),
        (lambda: lidar(torch.full((5, 2, 8), float("nan"))), "NaN"),
        (lambda: lidar(torch.randn(5, 2, 8), delta=-1.0), "lidar: `delta`"),
        (lambda: lidar(torch.randn(5, 2, 8), delta=0.0), "singular"),  # n(q − 1) = 5 < 8
        (lambda: alignment(torch.randn(5, 8), torch.randn(5, 7)), "alignment: `x` and `y` must have the same shape"),
        (lambda: alignment(torch.randn(5, 8), torch.randn(5, 8), alpha=0.0), "alignment: `alpha`"),
        (lambda: uniformity(torch.randn(1, 8)), "uniformity: `embeddings` needs at least 2 rows"),
        (lambda: uniformity(torch.randn(5, 8), t=-2.0), "uniformity: `t`"),
        (lambda: uniformity(torch.randn(5)), "shape (N, D)"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert fragment in str(info.value), str(info.value)
    assert alignment(torch.zeros(5, 8), torch.zeros(5, 8), normalize=False).item() == 0.0
    assert uniformity(torch.zeros(5, 8), normalize=False).item() == 0.0
    # Zero rows stay zero when normalised: identical points (0), at distance 1 from unit rows.
    assert uniformity(torch.zeros(5, 8)).item() == 0.0
    assert alignment(torch.eye(8)[:5], torch.zeros(5, 8)).item() == pytest.approx(1.0)


def test_compute_before_update_too_few_samples_and_bad_arguments():
    for metric in (LiDAR(), Alignment(), Uniformity()):
        with pytest.raises(ValueError, match=f"{type(metric).__name__}: compute\\(\\) called before any update"):
            metric.compute()
    lid = LiDAR()
    lid.update(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="LiDAR: needs at least 2 samples"):
        lid.compute()
    uni = Uniformity()
    uni.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="Uniformity: needs at least 2 samples"):
        uni.compute()
    for make in (
        lambda: LiDAR(delta=-1.0),
        lambda: LiDAR(eps=float("nan")),
        lambda: LiDAR(num_features=0),
        lambda: Alignment(alpha=-1.0),
        lambda: Uniformity(t=0.0),
        lambda: Uniformity(max_samples=0),
    ):
        with pytest.raises(ValueError, match="LiDAR|Alignment|Uniformity"):
            make()


def test_torchmetrics_conventions():
    v = grouped(120, 2, 16, seed=12)
    x, y = pair(300, 16)
    lidars = MetricCollection({"lidar": LiDAR(), "lidar_wide_ridge": LiDAR(delta=1e-1)})
    aligns = MetricCollection({"align2": Alignment(), "align1": Alignment(alpha=1.0)})
    unifs = MetricCollection({"unif": Uniformity(), "unif_t1": Uniformity(t=1.0)})
    for vb in v.split(50):
        lidars.update(vb)
    for xb, yb in zip(x.split(100), y.split(100)):
        aligns.update(xb, yb)
        unifs.update(xb)
    got = {**lidars.compute(), **aligns.compute(), **unifs.compute()}
    assert rel_err(got["lidar"], lidar(v)) <= 1e-6 and rel_err(got["lidar_wide_ridge"], lidar(v, delta=1e-1)) <= 1e-6
    assert rel_err(got["align1"], alignment(x, y, alpha=1.0)) <= 1e-6
    assert rel_err(got["unif_t1"], uniformity(x, t=1.0)) <= 1e-6
    assert all(value.dtype == torch.get_default_dtype() for value in got.values())

    for metric, first, rest, whole, functional in (
        (LiDAR(), (v[:40],), (v[40:],), (v,), lidar),
        (Alignment(), (x[:100], y[:100]), (x[100:], y[100:]), (x, y), alignment),
        (Uniformity(), (x[:100],), (x[100:],), (x,), uniformity),
    ):
        batch_value = metric(*first)  # forward: value of this batch, and it accumulates
        assert rel_err(batch_value, functional(*first)) <= 1e-6
        metric.update(*rest)
        clone = pickle.loads(pickle.dumps(metric))
        assert rel_err(clone.compute(), functional(*whole)) <= 1e-6
        assert rel_err(metric.compute(), functional(*whole)) <= 1e-6
        metric.reset()
        metric.update(*rest)
        assert rel_err(metric.compute(), functional(*rest)) <= 1e-6
        assert metric.full_state_update is False
    assert LiDAR.higher_is_better is True
    assert Alignment.higher_is_better is False and Uniformity.higher_is_better is False


def test_reset_allows_a_new_width_and_number_of_views():
    metric = LiDAR()
    metric.update(torch.randn(10, 2, 4))
    metric.reset()
    metric.update(torch.randn(10, 3, 6))
    assert metric.within.shape == (6, 6) and int(metric.num_views) == 3
    for m, args in (
        (Alignment(), lambda d: (torch.randn(5, d), torch.randn(5, d))),
        (Uniformity(), lambda d: (torch.randn(5, d),)),
    ):
        m.update(*args(4))
        m.reset()
        m.update(*args(6))
        assert torch.isfinite(m.compute())


def test_uniformity_forward_keeps_drawing_new_sampling_keys():
    metric = Uniformity(max_samples=8)
    for b in torch.randn(4, 16, 3).unbind(0):
        metric(b)
    keys = torch.cat(metric.keys)
    assert len(keys.unique()) == len(keys)  # a restarted generator would repeat the first batch's keys


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    for metric, args in (
        (LiDAR(), (torch.randn(8, 2, 4),)),
        (Alignment(), (torch.randn(8, 4), torch.randn(8, 4))),
        (Uniformity(), (torch.randn(8, 4),)),
    ):
        metric.update(*args)
        fig, ax = metric.plot()
        assert fig is not None and ax is not None


# ----------------------------------------------------------------------------------------------
# distributed and GPU
# ----------------------------------------------------------------------------------------------


def _ddp_multiview(rank, world_size, v, x, y):
    # Uneven: rank 0 gets 3 batches of the first 30 %, rank 1 the rest in 2 batches.
    def mine(data, cut_fraction=0.3):
        cut = int(cut_fraction * len(data))
        part = data[:cut] if rank == 0 else data[cut:]
        return part.split(len(part) // (3 if rank == 0 else 2) + 1)

    lid, ali, uni = LiDAR(), Alignment(), Uniformity()
    for b in mine(v):
        lid.update(b)
    for xb, yb in zip(mine(x), mine(y)):
        ali.update(xb, yb)
        uni.update(xb)
    values = [lid.compute(), ali.compute(), uni.compute(), sum(len(b) for b in mine(v))]

    # Only rank 0 sees data; with num_features given, rank 1's zero states still sync.
    lonely = LiDAR(num_features=v.shape[-1])
    if rank == 0:
        lonely.update(v[:50])
    values.append(lonely.compute())

    # Ranks that disagree on q are caught at compute().
    mixed = LiDAR(num_features=v.shape[-1])
    mixed.update(torch.randn(5, 2 + rank, v.shape[-1]))
    try:
        mixed.compute()
        values.append("no error")
    except ValueError as error:
        values.append(str(error))
    return values


def test_ddp_two_processes_equal_one_process_on_all_data():
    v = grouped(301, 3, 24, rank=10, seed=13)
    x, y = pair(901, 32, seed=14)
    results = run_distributed(_ddp_multiview, v, x, y)
    assert results[0][3] != results[1][3] and results[0][3] + results[1][3] == len(v)
    for lid, ali, uni, _, lonely, mixed in results:
        assert rel_err(lid, lidar(v)) <= 1e-6
        assert rel_err(ali, alignment(x, y)) <= 1e-6
        assert rel_err(uni, uniformity(x)) <= 1e-6  # 901 points < max_samples: all kept
        assert rel_err(lonely, lidar(v[:50])) <= 1e-6
        assert "LiDAR: the processes saw different numbers of views" in mixed
    for i in range(3):
        assert torch.equal(results[0][i], results[1][i])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    v = grouped(400, 2, 64, rank=20, seed=15).float()
    x, y = pair(5000, 128, dtype=torch.float32)
    metric = LiDAR().cuda()
    for b in v.cuda().split(64):
        metric.update(b)
    value = metric.compute()
    assert value.device.type == "cuda"
    assert rel_err(value.cpu(), lidar_ref(v.double().numpy())) <= 1e-4
    assert rel_err(lidar(v.cuda()).cpu(), lidar_ref(v.double().numpy())) <= 1e-4
    assert rel_err(alignment(x.cuda(), y.cuda()).cpu(), alignment_ref(x.double().numpy(), y.double().numpy())) <= 1e-4
    u = uniformity(x.cuda())
    assert u.device.type == "cuda"
    assert rel_err(u.cpu(), uniformity_ref(x.double().numpy())) <= 1e-4
    uni = Uniformity().cuda()
    for b in x.cuda().split(1000):
        uni.update(b)
    assert rel_err(uni.compute().cpu(), uniformity_ref(x.double().numpy())) <= 1e-4


def test_failed_forward_keeps_the_width_check():
    """A batch rejected inside forward() (after torchmetrics reset the state) must not unlock a new width."""
    metric = Alignment()
    metric.update(torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="NaN"):
        metric(torch.full((5, 8), float("nan")), torch.randn(5, 8))
    with pytest.raises(ValueError, match="earlier batches had 8"):
        metric.update(torch.randn(5, 9), torch.randn(5, 9))
