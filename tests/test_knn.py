import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from references_intrinsic_dimension import knn_distances_ref
from scipy.spatial.distance import cdist

from reprmetrics import _knn
from reprmetrics._knn import CPU_TILE_BYTES, CUDA_TILE_BYTES, default_tile_bytes, knn, neighbour_distances, tile_plan


def points(n, d, seed=0, dtype=torch.float64, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * scale) + shift).to(dtype)


def exact_neighbours(x, reference=None, exclude_self=True):
    """Reference distance matrix (float64, direct differences) with self pairs excluded by index."""
    q = x.double().numpy()
    dist = cdist(q, q if reference is None else reference.double().numpy())
    if reference is None and exclude_self:
        np.fill_diagonal(dist, np.inf)
    return dist


# Tile budgets: the default (full-width tiles) and tiny ones that force column tiles and merges.
@pytest.mark.parametrize("tile_bytes", [None, 8 * 128 * 50, 8 * 128 * 300])
@pytest.mark.parametrize("n,d,k", [(700, 16, 10), (257, 3, 1), (64, 100, 63)])
def test_self_knn_matches_brute_force(n, d, k, tile_bytes):
    x = points(n, d)
    dist, idx = knn(x, k, max_tile_bytes=tile_bytes)
    full = exact_neighbours(x)
    expected = np.sort(full, axis=1)[:, :k]
    np.testing.assert_allclose(dist.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Indices point at neighbours with exactly those distances, never at the point itself.
    np.testing.assert_allclose(np.take_along_axis(full, idx.numpy(), axis=1), expected, rtol=1e-12)
    assert not (idx == torch.arange(n).unsqueeze(1)).any()
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input_distances_are_exact_for_the_given_values(dtype):
    x = points(500, 24, dtype=dtype)
    dist, _ = knn(x, 8)
    assert dist.dtype == torch.float64
    expected = np.sort(exact_neighbours(x), axis=1)[:, :8]
    np.testing.assert_allclose(dist.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("shift,scale", [(1e4, 1.0), (0.0, 1e-30), (0.0, 1e15), (-3e3, 1e-2)])
def test_float32_selection_survives_offsets_and_extreme_scales(shift, scale):
    """Centring and power-of-two scaling keep the float32 GEMM meaningful."""
    x = points(600, 32, dtype=torch.float32, shift=shift, scale=scale)
    dist, _ = knn(x, 10)
    expected = np.sort(exact_neighbours(x), axis=1)[:, :10]
    np.testing.assert_allclose(dist.numpy(), expected, rtol=1e-6)


def test_duplicates_are_neighbours_at_exactly_zero_and_self_is_excluded_by_index():
    base = points(50, 8)
    x = torch.cat([base, base[:10], base[:10]])  # points 0..9 appear three times
    dist, idx = knn(x, 3)
    assert torch.all(dist[:10, :2] == 0) and torch.all(dist[:10, 2] > 0)
    assert torch.all(dist[10:50, 0] > 0)
    assert not (idx == torch.arange(len(x)).unsqueeze(1)).any()
    assert torch.all(dist >= 0)
    # A fully collapsed set: every distance is exactly 0.
    dist, _ = knn(torch.full((20, 5), 3.7), 4)
    assert torch.equal(dist, torch.zeros(20, 4, dtype=torch.float64))


def test_reference_with_and_without_dropping_the_own_copy():
    x = points(80, 6, seed=1)
    other = points(120, 6, seed=2)
    reference = torch.cat([other[:60], x, other[60:]])
    for exclude_self in (False, True):
        dist, idx = knn(x, 5, reference=reference, exclude_self=exclude_self)
        expected = knn_distances_ref(x.numpy(), 5, reference.numpy(), exclude_self)
        np.testing.assert_allclose(dist.numpy(), expected, rtol=1e-12, atol=0)
    # With the own copy dropped, the neighbours equal those within x ∪ other, self excluded by index.
    dist_self, _ = knn(torch.cat([x, other]), 5)
    np.testing.assert_allclose(dist.numpy(), dist_self[:80].numpy(), rtol=1e-12)
    # A query with no copy in the reference loses nothing.
    dist, _ = knn(x, 5, reference=other, exclude_self=True)
    np.testing.assert_allclose(dist.numpy(), knn_distances_ref(x.numpy(), 5, other.numpy(), False), rtol=1e-12)


def test_include_self_gives_a_zero_first_neighbour():
    x = points(40, 4)
    dist, idx = knn(x, 3, exclude_self=False)
    assert torch.all(dist[:, 0] == 0) and torch.equal(idx[:, 0], torch.arange(40))


def test_neighbour_distances_equal_knn_and_have_the_right_gradient():
    x = points(30, 5)
    reference = points(50, 5, seed=3)
    dist, idx = knn(x, 6, reference=reference)
    assert torch.equal(neighbour_distances(x, reference, idx), dist)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: neighbour_distances(z, reference, idx), (xg,))
    # At distance exactly 0 the subgradient is 0, never NaN.
    xz = reference[:4].clone().requires_grad_()
    _, idx0 = knn(xz, 2, reference=reference)
    neighbour_distances(xz, reference, idx0).sum().backward()
    assert torch.isfinite(xz.grad).all()


def test_tile_plan_bounds_the_distance_tile():
    assert default_tile_bytes(torch.device("cpu")) == CPU_TILE_BYTES
    assert default_tile_bytes(torch.device("cuda")) == CUDA_TILE_BYTES <= 256 * 2**20
    for budget in (CPU_TILE_BYTES, CUDA_TILE_BYTES):
        for nq, nr, itemsize in [
            (30_000, 30_000, 4),
            (30_000, 30_000, 8),
            (100, 10**7, 4),
            (10**6, 10**6, 4),
            (5, 3, 4),
        ]:
            rows, cols = tile_plan(nq, nr, itemsize, budget)
            assert 1 <= rows <= nq and 1 <= cols <= nr
            assert rows * cols * itemsize <= budget
    # 30k x 128 float32 on CPU: full-width rows (no cross-tile merge), 24 MiB per tile
    assert tile_plan(30_000, 30_000, 4, CPU_TILE_BYTES) == (209, 30_000)


def test_no_tile_exceeds_the_budget_during_a_run(monkeypatch):
    """Spy on the GEMM that produces each distance tile."""
    shapes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(_knn.torch, "addmm", spy)
    budget = 4 * 300 * 64
    x = points(1000, 8, dtype=torch.float32)
    dist, _ = knn(x, 5, max_tile_bytes=budget)
    assert shapes and max(r * c for r, c in shapes) * 4 <= budget
    assert sum(r * c for r, c in shapes) == 1000 * 1000  # every pair scored exactly once
    monkeypatch.undo()
    np.testing.assert_allclose(dist.numpy(), np.sort(exact_neighbours(x), axis=1)[:, :5], rtol=1e-9)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    torch.manual_seed(0)
    x = torch.randn(30_000, 128)
    from reprmetrics.functional.intrinsic_dimension import local_intrinsic_dimension
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    def high_water_mark():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    before = rss()
    try:  # reset the high-water mark, so import-time peaks do not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    lid = local_intrinsic_dimension(x, k=20)
    peak = high_water_mark()
    print(json.dumps({"extra": peak - before, "finite": bool(torch.isfinite(lid).all()), "n": lid.numel()}))
    """
)


@pytest.mark.slow  # peak RSS of a fresh interpreter on 30,000 points
def test_lid_of_30000_points_uses_under_1gb_of_extra_memory():
    """Peak RSS of a fresh process above its size before the call (x itself is 15 MB)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["n"] == 30_000
    # The bound. A 30k × 30k float32 distance matrix alone would be 3.4 GiB; measured here
    # 110–180 MiB (allocator fragmentation under load makes it vary, hence no tighter bound).
    assert result["extra"] < 2**30, f"extra peak memory {result['extra'] / 2**20:.0f} MiB"
