"""reprmetrics.evaluate: the monitor's metric set on saved embeddings, streamed, against independent references."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from references import rankme_ref
from references_centred import alpha_req_centred_ref, lidar_ref, normalized_std_ref
from references_intrinsic_dimension import lid_ref, mle_ref, twonn_ref
from references_isotropy import coding_rate_ref, isoscore_steps_ref, nesum_ref, wasserstein_uniformity_ref
from references_multiview import alignment_ref, uniformity_ref
from references_similarity import linear_cka_ref
from torch import nn

from reprmetrics import LocalIntrinsicDimension, TwoNN, Uniformity, evaluate
from reprmetrics.functional import (
    alignment,
    alpha_req,
    coding_rate,
    isoscore,
    lidar,
    linear_cka,
    local_intrinsic_dimension,
    mle_dimension,
    nesum,
    normalized_std,
    rankme,
    sigreg,
    twonn_dimension,
    uniformity,
    wasserstein_uniformity,
)
from reprmetrics.monitor import RepresentationTracker, default_metrics

evaluate_module = sys.modules["reprmetrics.evaluate"]  # the package attribute is the function
NonFiniteRowsError = evaluate_module.NonFiniteRowsError
METRIC_NAMES = evaluate_module.METRIC_NAMES


def power_law_embeddings(n: int, d: int, seed: int = 0, offset: float = 0.5) -> torch.Tensor:
    """float64 embeddings with covariance eigenvalues ∝ 1/k (a healthy spectrum) and a common offset."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ basis + offset


def views_of(z: torch.Tensor, q: int = 2, noise: float = 0.1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return z.unsqueeze(1) + noise * torch.randn(z.shape[0], q, z.shape[1], generator=g, dtype=z.dtype)


def geometric_mean(values: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(values))))


def references(z: torch.Tensor, views: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric from its definition, float64 numpy (independent of the package's code)."""
    x = z.double().numpy()
    refs = {
        "rankme": rankme_ref(x),
        "normalized_std": normalized_std_ref(x),
        "uniformity": uniformity_ref(x),
        "lid": geometric_mean(lid_ref(x, 20)),
        "twonn": twonn_ref(x),
        "mle_dimension": mle_ref(x, 20),
        "nesum": nesum_ref(x),
        "coding_rate": coding_rate_ref(x),
        "wasserstein_uniformity": wasserstein_uniformity_ref(x),
        "isoscore": isoscore_steps_ref(x),
        "sigreg": float(sigreg(z)),  # random directions: the functional twin, not a numpy reference
    }
    if z.shape[1] >= 13:
        refs["alpha_req"] = alpha_req_centred_ref(x, fit_range=(11, min(100, z.shape[1])))[0]  # full rank here
    if views is not None:
        v = views.double().numpy()
        refs["lidar"] = lidar_ref(v)
        refs["alignment"] = alignment_ref(v[:, 0], v[:, 1])
    return refs


def assert_close(values: dict[str, float], expected: dict[str, float], rtol: float) -> None:
    assert set(values) <= set(expected), set(values) - set(expected)
    for name, value in values.items():
        assert math.isclose(value, expected[name], rel_tol=rtol, abs_tol=1e-9), (name, value, expected[name])


# ---- the default set -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(600, 64), (400, 12), (1500, 128)])
def test_default_set_matches_definitions(n, d):
    z = power_law_embeddings(n, d)
    values = evaluate(z)
    assert list(values) == list(default_metrics(d, 1))  # same names, same order as the monitor
    assert ("alpha_req" in values) == (d >= 13)
    assert all(isinstance(v, float) for v in values.values())
    assert_close(values, references(z), rtol=1e-6)


def test_default_set_with_views_matches_definitions():
    z = power_law_embeddings(500, 32)
    v = views_of(z)
    values = evaluate(z, views=v)
    assert list(values) == list(default_metrics(32, 2))
    assert {"lidar", "alignment"} <= set(values)
    assert_close(values, references(z, v), rtol=1e-6)


def test_only_views_uses_the_first_view_for_point_metrics():
    """As the monitor does: point metrics read view 1, LiDAR all views, alignment views 1 and 2."""
    v = views_of(power_law_embeddings(400, 24), q=3)
    values = evaluate(None, views=v)
    expected = references(v[:, 0], v)
    assert_close(values, expected, rtol=1e-6)


@pytest.mark.parametrize("form", ["tensor", "numpy", "batches", "numpy_batches", "generator", "float32", "float16"])
def test_input_forms_equal_the_functional_definitions(form):
    z = power_law_embeddings(900, 40, seed=3)
    source = {
        "tensor": z,
        "numpy": z.numpy(),
        "batches": list(z.split(128)),  # uneven last batch
        "numpy_batches": [b.numpy() for b in z.split(301)],
        "generator": (b for b in z.split(77)),
        "float32": z.float(),
        "float16": z.half(),
    }[form]
    values = evaluate(source, batch_size=200)
    x = z.half() if form == "float16" else (z.float() if form == "float32" else z)
    functional = {
        "rankme": rankme(x),
        "alpha_req": alpha_req(x),
        "normalized_std": normalized_std(x),
        "uniformity": uniformity(x),
        "lid": local_intrinsic_dimension(x).double().log().mean().exp(),
        "nesum": nesum(x),
        "coding_rate": coding_rate(x),
        "wasserstein_uniformity": wasserstein_uniformity(x),
        "isoscore": isoscore(x),
    }
    rtol = 1e-6 if form not in ("float16",) else 1e-5
    assert_close(values, {k: float(v) for k, v in functional.items()}, rtol=rtol)


def test_batch_size_does_not_change_the_values():
    z = power_law_embeddings(3000, 32)
    a = evaluate(z, batch_size=3000, max_samples=1000)
    b = evaluate(z, batch_size=97, max_samples=1000)  # the bounded sample does not depend on batching
    assert_close(a, b, rtol=1e-9)


def test_matches_what_the_monitor_logs():
    """The same embeddings, streamed by a RepresentationTracker's validation pass and by evaluate."""
    z = power_law_embeddings(1200, 32).float()
    v = views_of(z)
    model = nn.Sequential(nn.Identity())
    tracker = RepresentationTracker(["0"], num_views=2, max_samples=500)
    tracker.attach(model)
    tracker.start_eval()
    for batch in v.split(100):
        model(batch[:, 0])
        model(batch[:, 1])
        tracker.end_eval_step()
    logged = {k.split("/", 1)[1]: float(t) for k, t in tracker.end_eval().items()}
    values = evaluate(None, views=v, max_samples=500, batch_size=256)
    # The tracker also logs its sample counts and α-ReQ's fit quality next to the metrics.
    assert set(values) == set(logged) - {"num_samples", "nonfinite_fraction", "alpha_req_r2"}
    assert_close(values, logged, rtol=1e-6)


# ---- explicit names ---------------------------------------------------------------------------------------
def test_every_metric_name_is_accepted_and_matches_its_definition():
    z = power_law_embeddings(500, 32)
    v = views_of(z)
    reference = z @ torch.randn(32, 20, dtype=torch.float64)
    values = evaluate(z, views=v, metrics=list(METRIC_NAMES), reference=reference)
    assert list(values) == [n for n in METRIC_NAMES if n != "cka"] + ["cka"]
    expected = references(z, v) | {"cka": linear_cka_ref(z.numpy(), reference.numpy())}
    assert_close(values, expected, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in METRIC_NAMES if n not in ("lidar", "alignment", "cka")])
def test_each_point_metric_alone(name):
    z = power_law_embeddings(300, 16, seed=5)
    values = evaluate(z, metrics=[name])
    assert list(values) == [name]
    functional = {
        "rankme": rankme,
        "alpha_req": alpha_req,
        "normalized_std": normalized_std,
        "uniformity": uniformity,
        "lid": lambda x: local_intrinsic_dimension(x).log().mean().exp(),
        "twonn": twonn_dimension,
        "mle_dimension": mle_dimension,
        "nesum": nesum,
        "coding_rate": coding_rate,
        "wasserstein_uniformity": wasserstein_uniformity,
        "isoscore": isoscore,
        "sigreg": sigreg,
    }[name]
    assert math.isclose(values[name], float(functional(z)), rel_tol=1e-6)  # Metric values are float32


def test_more_points_than_max_samples_equals_the_metric_classes():
    """Sufficient statistics see every row; point metrics their documented bounded sample."""
    z = power_law_embeddings(5000, 16)
    values = evaluate(z, metrics=["rankme", "uniformity", "lid", "twonn"], max_samples=700, batch_size=512)
    assert math.isclose(values["rankme"], rankme_ref(z.numpy()), rel_tol=1e-6)
    for name, metric in (
        ("uniformity", Uniformity(max_samples=700)),
        ("lid", LocalIntrinsicDimension(max_samples=700)),
        ("twonn", TwoNN(max_samples=700)),
    ):
        for batch in z.split(1000):
            metric.update(batch)
        assert math.isclose(values[name], float(metric.compute()), rel_tol=1e-9), name


@pytest.mark.parametrize(
    "metrics, match",
    [
        (["rankmee"], "unknown metric 'rankmee'; did you mean 'rankme'"),
        (["uniformty"], "did you mean 'uniformity'"),
        (["nonsense"], r"unknown metric 'nonsense' \(known: rankme, alpha_req"),
        (["rankme", "rankme"], "twice"),
        (["lidar"], "lidar need"),
        (["cka"], "'cka' needs a `reference`"),
        ([], "no metrics to compute"),
        (42, "must be 'default' or a list"),
    ],
)
def test_bad_metric_names(metrics, match):
    with pytest.raises(ValueError, match=match):
        evaluate(torch.randn(50, 8), metrics=metrics)


def test_a_metric_that_cannot_be_computed_is_named():
    with pytest.raises(ValueError, match="evaluate: lid: .*needs at least 21 samples"):
        evaluate(torch.randn(15, 8))


def test_alpha_req_requested_below_its_fit_range_is_an_error():
    with pytest.raises(ValueError, match="evaluate: alpha_req:"):
        evaluate(torch.randn(200, 8), metrics=["alpha_req"])


# ---- reference (CKA) ------------------------------------------------------------------------------------
def test_reference_cka_streamed_in_unaligned_batches():
    z = power_law_embeddings(1000, 24)
    ref = torch.tanh(z @ torch.randn(24, 40, dtype=torch.float64))
    values = evaluate((b for b in z.split(130)), reference=(b for b in ref.split(77)), metrics=[])
    assert list(values) == ["cka"]
    assert math.isclose(values["cka"], linear_cka_ref(z.numpy(), ref.numpy()), rel_tol=1e-6)
    assert math.isclose(values["cka"], float(linear_cka(z, ref)), rel_tol=1e-6)
    # The default set plus cka when a reference is given.
    assert "cka" in evaluate(z, reference=ref) and "rankme" in evaluate(z, reference=ref)


@pytest.mark.parametrize("rows", [999, 1001, 10])
def test_reference_with_other_rows_is_an_error(rows):
    z = torch.randn(1000, 8)
    with pytest.raises(ValueError, match=r"`reference` has [\d,]+ rows but `embeddings` has"):
        evaluate(z, reference=torch.randn(rows, 8), metrics=[], batch_size=256)


# ---- non-finite rows ------------------------------------------------------------------------------------
def test_nonfinite_rows_are_counted_then_raised_or_dropped():
    z = power_law_embeddings(800, 16)
    bad = z.clone()
    bad[[3, 400, 401]] = float("nan")
    bad[700, 2] = float("inf")
    with pytest.raises(NonFiniteRowsError, match="4 of 800 rows of `embeddings`") as info:
        evaluate(bad, batch_size=100)
    assert (info.value.bad_rows, info.value.total_rows) == (4, 800)
    keep = torch.isfinite(bad).all(1)
    dropped = evaluate(bad, drop_nonfinite=True, batch_size=100)
    assert_close(dropped, evaluate(z[keep], batch_size=100), rtol=1e-9)
    run = evaluate_module._run(bad, drop_nonfinite=True)
    assert run.num_samples == 796 and run.dropped == {"embeddings": 4}


def test_nonfinite_views_and_reference():
    z = torch.randn(300, 8, dtype=torch.float64)
    v = views_of(z)
    v[5, 1, 0] = float("nan")
    with pytest.raises(NonFiniteRowsError, match="1 of 300 samples of `views`"):
        evaluate(z, views=v)
    values = evaluate(z, views=v, drop_nonfinite=True)
    keep = torch.ones(300, dtype=torch.bool)
    keep[5] = False
    assert math.isclose(values["lidar"], lidar_ref(v[keep].numpy()), rel_tol=1e-6)
    ref = z.clone()
    ref[[0, 9]] = float("inf")
    with pytest.raises(NonFiniteRowsError, match="2 of 300 rows of `reference`"):
        evaluate(z, reference=ref, metrics=[])
    values = evaluate(z, reference=ref, metrics=[], drop_nonfinite=True)
    assert math.isclose(values["cka"], 1.0, rel_tol=1e-6)


def test_all_rows_nonfinite_with_drop():
    with pytest.raises(ValueError, match="every row contains NaN"):
        evaluate(torch.full((10, 4), float("nan")), drop_nonfinite=True)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "embeddings, match",
    [
        (torch.randn(10), r"must have shape \(N, D\)"),
        (torch.randn(4, 5, 6), r"must have shape \(N, D\)"),
        ("embeddings.npy", "must be a tensor, a numpy array or an iterable"),
        (3.0, "must be a tensor"),
        ([torch.randn(4, 3), "x"], "batches must be torch tensors or numpy arrays"),
        (np.array([["a", "b"]]), "must hold real numbers"),
        (torch.zeros(0, 4), "has no rows"),
        ([], "has no rows"),
    ],
)
def test_bad_embeddings(embeddings, match):
    with pytest.raises(ValueError, match=match):
        evaluate(embeddings)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pass `embeddings`"):
        evaluate(None)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 2"):
        evaluate(torch.randn(10, 3), batch_size=0)
    with pytest.raises(ValueError, match="`max_samples` must be"):
        evaluate(torch.randn(10, 3), max_samples=1.5)
    with pytest.raises(ValueError, match="views"):
        evaluate(torch.randn(50, 3), views=torch.randn(50, 3))
    with pytest.raises(ValueError, match="`views` have 4 features but `embeddings` have 3"):
        evaluate(torch.randn(50, 3), views=torch.randn(50, 2, 4))


def test_views_as_a_list_of_views():
    z = power_law_embeddings(300, 16)
    v = views_of(z)
    a = evaluate(z, views=[v[:, 0], v[:, 1]], metrics=["lidar", "alignment"])
    assert math.isclose(a["lidar"], float(lidar(v)), rel_tol=1e-6)
    assert math.isclose(a["alignment"], float(alignment(v[:, 0], v[:, 1])), rel_tol=1e-6)


def test_collapsed_embeddings_give_finite_values():
    z = torch.ones(500, 32) + 1e-4 * torch.randn(500, 32)
    values = evaluate(z)
    assert all(math.isfinite(v) for v in values.values())
    assert values["rankme"] < 1.5 and values["normalized_std"] < 1e-3


def test_progress_bar_writes_to_stderr(capsys):
    evaluate(torch.randn(100, 8), metrics=["rankme"], progress=True)
    assert "rows" in capsys.readouterr().err
