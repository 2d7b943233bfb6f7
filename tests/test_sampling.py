import torch
from ddp import run_distributed

from reprmetrics._sampling import BoundedSampleMetric


class Points(BoundedSampleMetric):
    def compute(self):
        return self._sample()


def test_keeps_everything_below_the_bound_in_order():
    m = Points(max_samples=100)
    x = torch.randn(60, 3)
    for b in x.split(7):
        m.update(b)
    assert torch.equal(m.compute(), x)


def test_bounded_uniform_subset():
    m = Points(max_samples=50)
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)
    for b in x.split(10):
        m.update(b)
        assert sum(len(s) for s in m.samples) <= 4 * 50 + 10  # memory stays bounded (compaction above 4·max_samples)
    kept = m.compute().squeeze(1)
    assert len(kept) == 50 and len(kept.unique()) == 50
    # A uniform subset of 0..999: its mean is near 500 (sd of the mean ≈ 40).
    assert abs(kept.mean().item() - 499.5) < 200


def test_selection_is_uniform_over_many_seeds():
    counts = torch.zeros(40)
    for seed in range(400):
        m = Points(max_samples=10, seed=seed)
        for b in torch.arange(40.0).unsqueeze(1).split(4):
            m.update(b)
        counts[m.compute().squeeze(1).long()] += 1
    # Each point is kept with probability 1/4: 100 of 400 expected, sd ≈ 8.7.
    assert counts.min() > 60 and counts.max() < 140


def _ddp_points(rank, world_size, x):
    m = Points(max_samples=30)
    mine = x[:70] if rank == 0 else x[70:]
    for b in mine.split(9):
        m.update(b)
    return m.compute()


def test_ddp_ranks_select_the_same_points():
    x = torch.arange(200, dtype=torch.float32).unsqueeze(1)
    a, b = run_distributed(_ddp_points, x)
    assert torch.equal(a, b) and len(a) == 30
    assert set(a.squeeze(1).tolist()) <= set(x.squeeze(1).tolist())


def test_a_resumed_stream_draws_new_keys_and_keeps_the_uninterrupted_sample():
    """With persistent states the key generator is in ``state_dict``: a stream interrupted and resumed from
    its state keeps the same subset as the uninterrupted one (without it, keys would repeat from the seed)."""
    x = torch.arange(600, dtype=torch.float32).unsqueeze(1)
    whole = Points(max_samples=50)
    for b in x.split(20):
        whole.update(b)
    first = Points(max_samples=50)
    first.persistent(True)
    for b in x[:300].split(20):
        first.update(b)
    resumed = Points(max_samples=50)
    resumed.persistent(True)
    resumed.load_state_dict(first.state_dict())
    for b in x[300:].split(20):
        resumed.update(b)
    assert torch.equal(resumed.compute().sort(dim=0).values, whole.compute().sort(dim=0).values)
