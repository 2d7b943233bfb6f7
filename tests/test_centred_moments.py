"""Streaming centred moments (reprmetrics._linalg) and the centred metrics built on them, at large offsets."""

import numpy as np
import pytest
import torch
from ddp import run_distributed
from references_centred import alpha_req_centred_ref, centred_covariance_eigenvalues_ref, exact_power_law

from reprmetrics import AlphaReQ
from reprmetrics._linalg import (
    add_gram_,
    centred_moments,
    centred_moments_count,
    centred_moments_of,
    centred_moments_state,
    centred_moments_update_,
    merge_centred_moments,
    symmetric_from_upper,
)
from reprmetrics.functional import alpha_req, eigenspectrum

OFFSETS = [1e0, 1e2, 1e4, 1e6, 1e8]


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def scatter_ref(z):
    z = np.asarray(z, dtype=np.float64)
    zc = z - z.mean(axis=0)
    return zc.T @ zc


def full_scatter(state):
    n, mean, scatter = centred_moments(state)
    return n, mean, symmetric_from_upper(scatter)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("sizes", [(128,), (1, 7, 300, 2)])
def test_streaming_scatter_matches_centring_first(offset, sizes):
    z = exact_power_law(1000, 24, 1.0, offset)
    state, start, i = centred_moments_state(), 0, 0
    while start < len(z):
        state = centred_moments_update_(state, z[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    n, mean, scatter = full_scatter(state)
    ref = scatter_ref(z.numpy())
    assert n == 1000
    np.testing.assert_allclose(mean.numpy(), z.numpy().mean(axis=0), rtol=1e-12)
    assert np.abs(scatter.numpy() - ref).max() <= 1e-10 * np.abs(ref).max()


@pytest.mark.parametrize("d", [1, 127, 128, 129, 200, 511, 512, 1030])
def test_gram_update_fills_the_upper_triangle_exactly_at_every_block_layout(d):
    # Widths either side of the blocking thresholds and of uneven last blocks.
    x = torch.randn(37, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    gram = torch.full((d, d), 3.0, dtype=torch.float64)
    add_gram_(gram, x)
    want = 3.0 + x.numpy().T @ x.numpy()
    upper = np.triu_indices(d)
    np.testing.assert_allclose(gram.numpy()[upper], want[upper], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(symmetric_from_upper(gram).numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [1e0, 1e8])
def test_merge_is_exact_ignores_empty_parts_and_every_order_agrees(offset):
    z = exact_power_law(900, 16, 1.0, offset)
    # Parts with very different shifts: sorted along a direction, then cut.
    order = torch.argsort(z[:, 0])
    chunks = z[order].split(200)
    parts = [centred_moments_of(c) for c in chunks] + [centred_moments_state(16)]
    ref = scatter_ref(z.numpy())
    results = []
    for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 5, 0, 4, 1, 3]):
        merged = merge_centred_moments(torch.stack([parts[p] for p in perm]))
        n, mean, scatter = full_scatter(merged)
        assert n == 900
        assert np.abs(scatter.numpy() - ref).max() <= 1e-10 * np.abs(ref).max()
        np.testing.assert_allclose(mean.numpy(), z.numpy().mean(axis=0), rtol=1e-12)
        results.append(scatter)
    # A merged state keeps streaming correctly.
    more = exact_power_law(100, 16, 1.0, offset, seed=1)
    state = centred_moments_update_(merge_centred_moments(torch.stack(parts)), more)
    both = np.concatenate([z.numpy(), more.numpy()])
    _, _, scatter = full_scatter(state)
    assert np.abs(scatter.numpy() - scatter_ref(both)).max() <= 1e-10 * np.abs(scatter_ref(both)).max()


def test_merge_of_only_empty_parts_and_bad_input():
    empty = centred_moments_state(5)
    merged = merge_centred_moments(torch.stack([empty, empty]))
    assert centred_moments_count(merged) == 0 and merged.shape == (8, 5)
    assert centred_moments_count(centred_moments_state()) == 0
    with pytest.raises(ValueError, match="centred_moments_update_"):
        centred_moments_update_(centred_moments_state(5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="centred_moments"):
        centred_moments(centred_moments_state())


def test_joint_state_gives_the_cross_covariance():
    x = exact_power_law(500, 6, 1.0, 1e6, seed=2)
    y = exact_power_law(500, 4, 1.0, 1e6, seed=3) + 0.5 * x[:, :4]
    state = centred_moments_state()
    for bx, by in zip(x.split(128), y.split(128)):
        state = centred_moments_update_(state, torch.cat([bx, by], dim=1))
    _, _, scatter = full_scatter(state)
    xc, yc = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    cross = xc.T @ yc
    assert np.abs(scatter[:6, 6:].numpy() - cross).max() <= 1e-10 * np.abs(cross).max()


@pytest.mark.parametrize("offset", OFFSETS)
def test_alpha_req_and_spectrum_at_large_offsets_float64(offset):
    """Issue 11: α and the top-100 eigenvalues within 1e-6 of a reference that centres first."""
    z = exact_power_law(2048, 128, 1.003, offset)
    expected_alpha, expected_r2 = alpha_req_centred_ref(z.numpy())
    expected_lam = centred_covariance_eigenvalues_ref(z.numpy())[:100]
    assert abs(expected_alpha - 1.003) < 1e-6  # the data really has α = 1.003
    assert rel(alpha_req(z), expected_alpha) <= 1e-6
    np.testing.assert_allclose(eigenspectrum(z).numpy()[:100], expected_lam, rtol=1e-6)
    metric = AlphaReQ()
    for b in z.split(128):
        metric.update(b)
    assert rel(metric.compute(), expected_alpha) <= 1e-6
    fit = metric.spectrum_fit()
    assert fit["last"] == 100 and abs(fit["r2"] - expected_r2) <= 1e-9
    np.testing.assert_allclose(metric.covariance_eigenvalues().numpy()[:100], expected_lam, rtol=1e-6)


@pytest.mark.parametrize("spread", [1e-4, 1e-5, 1e-8])
def test_collapse_towards_a_point_keeps_the_fit_range(spread):
    """Complete collapse far from the origin (issue 11's table): spread ≪ offset, float64 input."""
    z = exact_power_law(2048, 128, 1.003, 1.0 / spread)
    expected, _ = alpha_req_centred_ref(z.numpy())
    metric = AlphaReQ()
    for b in z.split(128):
        metric.update(b)
    assert rel(metric.compute(), expected) <= 1e-6
    assert metric.spectrum_fit()["last"] == 100


@pytest.mark.parametrize("offset", [1e0, 1e2, 1e4, 1e5, 2e5])
def test_float32_input_holds_up_to_offsets_of_2e5(offset):
    """Measured bound: float32 data holds α to 1e-6 of the reference on the same data up to 2e5 × the spread."""
    z = exact_power_law(2048, 128, 1.003, offset, dtype=torch.float32)
    expected, _ = alpha_req_centred_ref(z.double().numpy())
    assert rel(alpha_req(z), expected) <= 1e-6
    metric = AlphaReQ()
    for b in z.split(128):
        metric.update(b)
    assert rel(metric.compute(), expected) <= 1e-6


def test_float32_beyond_its_precision_refuses_instead_of_fitting_rounding_noise():
    # At 1e8 × the spread float32 rounds every entry by more than the spread: the data is noise.
    z = exact_power_law(2048, 128, 1.003, 1e8, dtype=torch.float32)
    with pytest.raises(ValueError, match="alpha_req: the fit range"):
        alpha_req(z)


def _ddp_alpha(rank, world_size, z, offsets):
    # Each rank's first batch sits at its own offset: the shifts differ across ranks.
    mine = z[rank::world_size]
    metric = AlphaReQ()
    first = mine[:128].clone()
    first[:1] += offsets[rank]  # one far point moves that rank's shift
    metric.update(first)
    for b in mine[128:].split(128):
        metric.update(b)
    return metric.compute(), metric.spectrum_fit()["eigenvalues"], first[:1]


@pytest.mark.parametrize("offset", [1e0, 1e8])
def test_ddp_two_processes_with_different_shifts(offset):
    z = exact_power_law(2048, 128, 1.003, offset)
    spread = float(z.std(dim=0).mean())
    results = run_distributed(_ddp_alpha, z, [10 * spread, -30 * spread])
    full = torch.cat([z[0::2], z[1::2]])
    full[0], full[1024] = results[0][2][0], results[1][2][0]
    expected, _ = alpha_req_centred_ref(full.numpy())
    lam = centred_covariance_eigenvalues_ref(full.numpy())[:100]
    for value, eigenvalues, _ in results:
        assert rel(value, expected) <= 1e-6
        np.testing.assert_allclose(eigenvalues.numpy()[:100], lam, rtol=1e-6)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_forward_merges_lazily_shaped_state():
    z = exact_power_law(640, 128, 1.003, 1e6)
    metric = AlphaReQ()
    for b in z.split(128):
        assert torch.isfinite(metric(b))
    expected, _ = alpha_req_centred_ref(z.numpy())
    assert rel(metric.compute(), expected) <= 1e-6
    known = AlphaReQ(num_features=128)
    for b in z.split(128):
        known(b)
    assert rel(known.compute(), expected) <= 1e-6


# ---- LiDAR and NormalizedStd on the same accumulator ------------------------------------------------

from references_centred import lidar_ref, normalized_std_ref, views_at_offset  # noqa: E402

from reprmetrics import LiDAR, NormalizedStd  # noqa: E402
from reprmetrics.functional import lidar, normalized_std  # noqa: E402


@pytest.mark.parametrize("offset", OFFSETS)
def test_lidar_at_large_offsets_float64(offset):
    views = views_at_offset(1024, 2, 32, offset)
    expected = lidar_ref(views.numpy())
    assert rel(lidar(views), expected) <= 1e-6
    metric = LiDAR()
    for b in views.split(128):
        metric.update(b)
    assert rel(metric.compute(), expected) <= 1e-6


@pytest.mark.parametrize("offset", OFFSETS)
def test_normalized_std_at_large_offsets_float64(offset):
    z = exact_power_law(2048, 64, 1.0, offset)
    expected = normalized_std_ref(z.numpy())
    assert rel(normalized_std(z), expected) <= 1e-6
    metric = NormalizedStd()
    for b in z.split(128):
        metric.update(b)
    assert rel(metric.compute(), expected) <= 1e-6


def _ddp_lidar_std(rank, world_size, views, z, offsets):
    mine_v, mine_z = views[rank::world_size].clone(), z[rank::world_size].clone()
    mine_v[:1] += offsets[rank]  # each rank's first batch (hence its shift) sits elsewhere
    mine_z[:1] += offsets[rank]
    lid, std = LiDAR(), NormalizedStd()
    for b in mine_v.split(128):
        lid.update(b)
    for b in mine_z.split(128):
        std.update(b)
    return lid.compute(), std.compute(), mine_v[:1], mine_z[:1]


@pytest.mark.parametrize("offset", [1e0, 1e8])
def test_ddp_lidar_and_normalized_std_with_different_shifts(offset):
    views = views_at_offset(512, 2, 16, offset)
    z = exact_power_law(1024, 32, 1.0, offset)
    spread = float(z.std(dim=0).mean())
    results = run_distributed(_ddp_lidar_std, views, z, [10 * spread, -30 * spread])
    all_v = torch.cat([results[0][2], views[2::2], results[1][2], views[3::2]])
    all_z = torch.cat([results[0][3], z[2::2], results[1][3], z[3::2]])
    for lid_value, std_value, _, _ in results:
        assert rel(lid_value, lidar_ref(all_v.numpy())) <= 1e-6
        assert rel(std_value, normalized_std_ref(all_z.numpy())) <= 1e-6
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_normalized_std_streaming_forward_and_degenerate_cases():
    z = exact_power_law(300, 16, 1.0, 1e3)
    metric = NormalizedStd()
    for b in z.split(100):
        assert torch.isfinite(metric(b))
    assert rel(metric.compute(), normalized_std_ref(z.numpy())) <= 1e-6
    assert NormalizedStd.full_state_update is False and NormalizedStd.higher_is_better is True
    same = NormalizedStd()
    same.update(torch.ones(50, 8) * 1e6)
    same.update(torch.ones(7, 8) * 3)
    assert same.compute().item() == 0.0  # identical directions: exactly 0
    single = NormalizedStd()
    single.update(torch.randn(1, 3))
    with pytest.raises(ValueError, match="NormalizedStd: needs at least 2"):
        single.compute()
    with pytest.raises(ValueError, match="NormalizedStd: compute"):
        NormalizedStd().compute()
    before = single.moments.clone()
    with pytest.raises(ValueError, match="NormalizedStd"):
        single.update(torch.randn(4, 5))
    assert torch.equal(before, single.moments)


def test_lidar_identical_sample_means_far_from_origin_give_one():
    """Σ_b is zero up to the input's rounding noise: all λ are 0 and LiDAR is 1 for eps = 0."""
    base = torch.randn(1, 1, 16, dtype=torch.float64) * 1e6
    noise = 0.1 * torch.randn(200, 1, 16, dtype=torch.float64)
    views = base + torch.cat([noise, -noise], dim=1)  # every sample's mean view is `base`
    assert lidar(views, eps=0.0).item() == 1.0
    metric = LiDAR(eps=0.0)
    for b in views.split(64):
        metric.update(b)
    assert metric.compute().item() == 1.0


@pytest.mark.parametrize("offset", [1e0, 1e4, 1e6])
def test_lidar_and_normalized_std_float32_hold_up_to_1e6(offset):
    """Measured bounds for float32 input (the reference centres the same float32 data in float64)."""
    views = views_at_offset(1024, 2, 32, offset, dtype=torch.float32)
    assert rel(lidar(views), lidar_ref(views.double().numpy())) <= 1e-6
    z = exact_power_law(2048, 64, 1.0, offset, dtype=torch.float32)
    assert rel(normalized_std(z), normalized_std_ref(z.double().numpy())) <= 1e-6


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=199), min_size=1, max_size=6),
    log_offset=st.integers(min_value=0, max_value=8),
    diagonal=st.booleans(),
)
def test_any_split_merged_in_any_grouping_equals_centring_first(cuts, log_offset, diagonal):
    z = exact_power_law(200, 6, 1.0, 10.0**log_offset, seed=len(cuts))
    bounds = [0, *sorted(set(cuts)), 200]
    parts = [centred_moments_of(z[a:b], diagonal=diagonal) for a, b in zip(bounds, bounds[1:])]
    # Merge pairwise left to right (as forward() does) and all at once (as a DDP sync does).
    running = parts[0]
    for p in parts[1:]:
        running = merge_centred_moments(torch.stack([running, p]))
    at_once = merge_centred_moments(torch.stack(parts)) if len(parts) > 1 else parts[0]
    ref = scatter_ref(z.numpy())
    for state in (running, at_once):
        n, mean, scatter = centred_moments(state)
        assert n == 200
        got = scatter.numpy() if diagonal else symmetric_from_upper(scatter).numpy()
        want = np.diag(ref) if diagonal else ref
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
