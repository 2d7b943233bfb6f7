"""At most one host sync per captured batch in the capture paths (zero here): counted on CPU.

A host sync is any read of a tensor's value on the host: ``bool()``, ``int()``, ``float()``,
``.item()``, ``.tolist()``, ``.nonzero()``. On a GPU each one stalls the training stream. The capture
path — forward hooks, ``end_train_step`` on steps that do not compute, ``end_eval_step`` — must not
read any (``MetricSet`` weights non-finite rows out instead of indexing them out; counts stay
tensors). Computations (every ``every_n_train_steps``, ``end_eval``) may sync: they are rare.
"""

import contextlib

import pytest
import torch
from torch import nn

from reprmetrics import evaluate
from reprmetrics.monitor import RepresentationTracker

_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero")


@contextlib.contextmanager
def count_host_syncs():
    """Count host reads of tensor values (Tensor methods wrapped) while the block runs."""
    counts = {"n": 0, "where": []}
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counts["n"] += 1
            counts["where"].append(name)
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.projector = nn.Linear(32, 16)

    def forward(self, x):
        return self.projector(self.backbone(x))


def test_the_counter_counts():
    with count_host_syncs() as syncs:
        bool(torch.ones(1))
        torch.ones(2).sum().item()
    assert syncs["n"] == 2


@pytest.mark.parametrize("num_views", [1, 2])
def test_no_host_sync_while_capturing_training_and_evaluation_batches(num_views):
    torch.manual_seed(0)
    net = Net()
    tracker = RepresentationTracker(
        ["backbone", "projector"],
        num_views=num_views,
        every_n_train_steps=50,
        train_buffer_size=256,
        reference="initial",
    )
    tracker.attach(net)
    x = torch.randn(64, 16)
    x[3] = float("nan")  # a non-finite row is weighted out, not indexed out
    per_batch = []
    for _step in range(48):  # no scheduled computation among these steps
        tracker.start_train_step()
        with count_host_syncs() as syncs:
            for _ in range(num_views):
                net(x)
            assert tracker.end_train_step() is None
        per_batch.append(syncs["n"])
    tracker.end_train_epoch()
    tracker.start_eval()
    with torch.no_grad():
        for _ in range(4):
            with count_host_syncs() as syncs:
                for _ in range(num_views):
                    net(x)
                tracker.end_eval_step()
            per_batch.append(syncs["n"])
    values = tracker.end_eval()  # computing may sync
    assert max(per_batch) == 0, per_batch
    assert values["projector/nonfinite_fraction"].item() > 0  # the NaN row was counted


def test_evaluate_streams_without_a_host_sync_per_batch():
    z = torch.randn(40_000, 16)
    batches = list(z.split(1000))
    with count_host_syncs() as syncs:
        evaluate(iter(batches), metrics=["rankme", "normalized_std", "coding_rate", "nesum"], batch_size=1000)
    # A constant number for the compute phase, not one per batch (40 batches).
    assert syncs["n"] < 40, syncs["n"]
