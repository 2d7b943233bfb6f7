"""Every Metric class through the shared harness (``_helpers/harness.py``): one row per class, each row its
float64 reference; the harness checks per-batch and accumulated values against it, streaming against the
functional form, bad input, copies, half precision and DDP."""

import numpy as np
import pytest
import torch
from _helpers.harness import MetricCase, MetricTester, ddp_feed
from _helpers.metrics import METRIC_SPECS
from ddp import run_distributed
from references import alpha_req_ref, rankme_ref
from references_centred import normalized_std_ref
from references_intrinsic_dimension import lid_ref, mle_ref, twonn_ref
from references_isotropy import coding_rate_ref, isoscore_steps_ref, nesum_ref, sigreg_ref, wasserstein_uniformity_ref
from references_multiview import alignment_ref, lidar_ref, uniformity_ref
from references_similarity import linear_cka_ref, minibatch_cka_ref

import reprmetrics as rm
from reprmetrics import functional as F

WIDTH = 16
DIRECTIONS = torch.randn(WIDTH, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _lid_geometric_mean(x, k=5):
    return float(np.exp(np.mean(np.log(lid_ref(x, k)))))


CASES = [
    MetricCase("RankMe", rm.RankMe, rankme_ref, F.rankme),
    MetricCase(
        "AlphaReQ",
        lambda: rm.AlphaReQ(fit_range=(2, 10)),
        lambda z: alpha_req_ref(z, (2, 10)),
        lambda z: F.alpha_req(z, (2, 10)),
        rtol=1e-5,
        half_rtol=1e-2,
    ),
    MetricCase("NESum", rm.NESum, nesum_ref, F.nesum),
    MetricCase("CodingRate", rm.CodingRate, coding_rate_ref, F.coding_rate),
    MetricCase("NormalizedStd", rm.NormalizedStd, normalized_std_ref, F.normalized_std),
    MetricCase("IsoScore", rm.IsoScore, isoscore_steps_ref, F.isoscore),
    MetricCase("WassersteinUniformity", rm.WassersteinUniformity, wasserstein_uniformity_ref, F.wasserstein_uniformity),
    MetricCase(
        "SIGReg",
        lambda: rm.SIGReg(directions=DIRECTIONS),
        lambda z: sigreg_ref(z, DIRECTIONS.numpy()),
        lambda z: F.sigreg(z, directions=DIRECTIONS),
    ),
    MetricCase("Uniformity", rm.Uniformity, uniformity_ref, F.uniformity),
    MetricCase(
        "LocalIntrinsicDimension",
        lambda: rm.LocalIntrinsicDimension(k=5),
        _lid_geometric_mean,
        lambda z: F.local_intrinsic_dimension(z, k=5).log().mean().exp(),
    ),
    MetricCase("TwoNN", rm.TwoNN, twonn_ref, F.twonn_dimension),
    MetricCase("MLEDimension", lambda: rm.MLEDimension(k=5), lambda z: mle_ref(z, 5), lambda z: F.mle_dimension(z, 5)),
    MetricCase("LiDAR", rm.LiDAR, lidar_ref, F.lidar),
    MetricCase("Alignment", rm.Alignment, alignment_ref, F.alignment),
    MetricCase("LinearCKA", rm.LinearCKA, linear_cka_ref, F.linear_cka),
    MetricCase(
        "MinibatchCKA",
        rm.MinibatchCKA,
        stream_reference=lambda batches: minibatch_cka_ref([x for x, _ in batches], [y for _, y in batches]),
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}
NAMES = [case.name for case in CASES]


def test_every_metric_class_has_a_row():
    assert sorted(NAMES) == sorted(spec.name for spec in METRIC_SPECS)
    assert all(case.spec.width == WIDTH for case in CASES)


@pytest.mark.parametrize("name", NAMES)
def test_each_batch_and_the_total_match_the_reference(name):
    MetricTester(CASES_BY_NAME[name]).check_batches_and_total()


@pytest.mark.parametrize("name", [case.name for case in CASES if case.functional is not None])
def test_streaming_in_uneven_batches_equals_the_functional(name):  # MinibatchCKA's value depends on the batches
    MetricTester(CASES_BY_NAME[name]).check_streaming_equals_functional()


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_naming_the_metric_and_leaves_the_state(name):
    MetricTester(CASES_BY_NAME[name]).check_bad_input()


@pytest.mark.parametrize("name", NAMES)
def test_clone_pickle_and_state_dict_give_the_same_value(name):
    MetricTester(CASES_BY_NAME[name]).check_copies()


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_keeps_accumulators_and_the_value(name):
    MetricTester(CASES_BY_NAME[name]).check_half_precision()


def _ddp_task(rank, world_size, name, shards):
    return ddp_feed(CASES_BY_NAME[name], shards[rank])


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_with_different_row_counts_give_the_whole(name):
    MetricTester(CASES_BY_NAME[name]).check_ddp(run_distributed, _ddp_task)
