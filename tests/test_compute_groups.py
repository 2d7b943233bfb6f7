"""Standalone Metric classes in a torchmetrics ``MetricCollection(compute_groups=True)``: metrics that
read the same statistic share one copy of its state, and sharing moves no value."""

import numpy as np
import torch
from torchmetrics import MetricCollection

from reprmetrics import AlphaReQ, CodingRate, IsoScore, LocalIntrinsicDimension, NESum, RankMe, Uniformity

ROW_MOMENT_READERS = {"rankme": RankMe, "alpha_req": AlphaReQ, "nesum": NESum, "isoscore": IsoScore}
OTHERS = {"coding_rate": CodingRate, "uniformity": Uniformity, "lid": LocalIntrinsicDimension}


def _collection():
    return MetricCollection(
        {name: cls() for name, cls in {**ROW_MOMENT_READERS, **OTHERS}.items()}, compute_groups=True
    )


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(600, 24, generator=g) * torch.arange(1, 25).pow(-0.7) + 50.0


def test_metrics_of_the_same_statistic_form_one_group_and_share_its_state():
    collection, x = _collection(), _data()
    for batch in x.split(150):
        collection.update(batch)
    # torchmetrics updates only the first member of a group and hands its state to the others.
    groups = [sorted(members) for members in collection.compute_groups.values()]
    assert sorted(ROW_MOMENT_READERS) in groups
    assert ["lid", "uniformity"] in groups  # both read the bounded sample


def test_sharing_moves_no_value():
    collection, x = _collection(), _data()
    for batch in x.split(150):
        collection.update(batch)
    shared = collection.compute()
    for name, cls in {**ROW_MOMENT_READERS, **OTHERS}.items():
        alone = cls()
        for batch in x.split(150):
            alone.update(batch)
        assert torch.equal(shared[name], alone.compute()), name
    # And against an independent float64 reference: RankMe from the singular values of the rows.
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7  # RankMe's ε (Garrido et al. 2023)
    want = np.exp(-(p * np.log(p)).sum())
    assert abs(float(shared["rankme"]) - want) <= 1e-6 * want
