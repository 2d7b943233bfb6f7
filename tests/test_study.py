"""The model-selection study: its rank correlations, pick logic and CSV schema against hand-computed
values (and scipy), then the whole pipeline in its fast mode, in-process."""

import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import study_analysis as analysis  # noqa: E402  (no torch: numpy and scipy)


# ---- rank correlations ------------------------------------------------------------------------------
def test_spearman_with_a_tie_by_hand():
    # y ranks [1, 2, 3.5, 5, 3.5]; deviations from 3: x (-2,-1,0,1,2), y (-2,-1,.5,2,.5)
    # covariance 4+1+0+2+1 = 8; variances 10 and 9.5: rho = 8 / sqrt(95)
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert analysis.spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)


def test_kendall_tau_b_with_a_tie_by_hand():
    # Of the 10 pairs 8 are concordant, 1 discordant (8 > 7), 1 tied in y (7, 7):
    # tau_b = (8 - 1) / sqrt((10 - 0) * (10 - 1))
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert analysis.kendall_tau_b(x, y) == pytest.approx(7 / math.sqrt(90), abs=1e-12)


def test_correlations_of_perfect_and_reversed_orders():
    assert analysis.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert analysis.kendall_tau_b([1, 2, 3], [0.1, 5, 7]) == pytest.approx(1.0)
    assert analysis.kendall_tau_b([1, 2, 3], [7, 5, 0.1]) == pytest.approx(-1.0)


def test_degenerate_correlations_are_nan_and_non_finite_pairs_are_dropped():
    assert math.isnan(analysis.spearman([1, 1, 1], [1, 2, 3]))  # a constant has no ranking
    assert math.isnan(analysis.kendall_tau_b([1, 2, 3], [4, 4, 4]))
    assert math.isnan(analysis.spearman([1], [2]))
    # The NaN pair goes: what is left is perfectly ordered.
    assert analysis.spearman([1, math.nan, 3, 4], [1, 0, 3, 4]) == pytest.approx(1.0)
    assert analysis.kendall_tau_b([1, 2, math.inf, 4], [1, 2, 0, 4]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        analysis.spearman([1, 2], [1])


@pytest.mark.parametrize("seed", range(6))
def test_correlations_match_scipy_with_many_ties(seed):
    np = pytest.importorskip("numpy")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 30))
    x, y = rng.integers(0, 5, n).tolist(), rng.integers(0, 4, n).tolist()  # small ranges: many ties
    if len(set(x)) < 2 or len(set(y)) < 2:
        x[0], y[0] = 99, 99
    assert analysis.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert analysis.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)


# ---- orientation and picks --------------------------------------------------------------------------
def test_pick_directions_follow_the_metric_classes():
    from reprmetrics import (
        Alignment,
        AlphaReQ,
        CodingRate,
        IsoScore,
        LiDAR,
        NESum,
        NormalizedStd,
        RankMe,
        SIGReg,
        Uniformity,
        WassersteinUniformity,
    )
    from reprmetrics.intrinsic_dimension import LocalIntrinsicDimension, TwoNN

    classes = {
        "rankme": RankMe,
        "lidar": LiDAR,
        "alpha_req": AlphaReQ,
        "lid": LocalIntrinsicDimension,
        "twonn": TwoNN,
        "uniformity": Uniformity,
        "alignment": Alignment,
        "normalized_std": NormalizedStd,
        "nesum": NESum,
        "coding_rate": CodingRate,
        "wasserstein_uniformity": WassersteinUniformity,
        "sigreg": SIGReg,
        "isoscore": IsoScore,
    }
    assert set(classes) == set(analysis.METRICS)
    expected = {True: "max", False: "min", None: "closest_to_1"}
    for metric, cls in classes.items():
        assert analysis.DIRECTIONS[metric] == expected[cls.higher_is_better], metric


def test_oriented_score_makes_higher_mean_better():
    assert analysis.oriented_score("rankme", 12.0) == 12.0
    assert analysis.oriented_score("uniformity", -3.5) == 3.5
    assert analysis.oriented_score("alpha_req", 0.8) == pytest.approx(-0.2)
    assert analysis.oriented_score("alpha_req", 1.3) == pytest.approx(-0.3)  # 0.8 is nearer 1 than 1.3


def row(name, method, rankme, uniformity, alpha, probe):
    return {
        "name": name,
        "method": method,
        "projector/rankme": rankme,
        "projector/uniformity": uniformity,
        "projector/alpha_req": alpha,
        "probe_accuracy": probe,
    }


ROWS = [
    row("a", "simclr", 30.0, -3.0, 1.1, 0.85),
    row("b", "simclr", 20.0, -3.5, 0.7, 0.90),
    row("c", "simsiam", 25.0, -2.0, 1.05, 0.80),
    row("d", "simsiam", 5.0, -1.0, 3.0, 0.70),
]


def find(table, metric, group, tap="projector"):
    (found,) = [r for r in table if r["metric"] == metric and r["tap"] == tap and r["group"] == group]
    return found


def test_picks_by_hand():
    picks = analysis.pick_rows(ROWS)
    expected = {
        # (metric, group): (pick, gap to the group's best probe accuracy)
        ("rankme", "simclr"): ("a", 0.05),  # max rank 30 -> a (0.85); b (0.90) was best
        ("rankme", "simsiam"): ("c", 0.0),
        ("rankme", "all"): ("a", 0.05),
        ("uniformity", "simclr"): ("b", 0.0),  # lowest -3.5
        ("uniformity", "all"): ("b", 0.0),
        ("alpha_req", "simclr"): ("a", 0.05),  # |1.1 - 1| < |0.7 - 1|
        ("alpha_req", "all"): ("c", 0.10),  # 1.05 is nearest 1 overall; c has 0.80
    }
    for (metric, group), (name, gap) in expected.items():
        p = find(picks, metric, group)
        assert p["pick"] == name, (metric, group)
        assert p["gap"] == pytest.approx(gap), (metric, group)
        assert p["best"] == {"simclr": "b", "simsiam": "c", "all": "b"}[group]
    # A metric that is missing everywhere (here the backbone tap) picks nothing.
    assert find(picks, "rankme", "all", tap="backbone")["pick"] == ""


def test_pick_ties_go_to_the_first_row_and_non_finite_values_are_skipped():
    rows = [{"name": "x", "v": math.nan}, {"name": "y", "v": 2.0}, {"name": "z", "v": 2.0}]
    assert analysis.pick(rows, lambda r: r["v"])["name"] == "y"
    assert analysis.pick(rows[:1], lambda r: r["v"]) is None


def test_correlation_rows_by_hand():
    correlations = analysis.correlation_rows(ROWS)
    # Overall: rankme ranks (4, 2, 3, 1), probe ranks (3, 4, 2, 1): covariance 2, variances 5 -> 0.4;
    # pairs: (a,b) and (b,c) discordant, the other 4 concordant -> tau = 2/6.
    overall = find(correlations, "rankme", "all")
    assert overall["spearman"] == pytest.approx(0.4)
    assert overall["kendall"] == pytest.approx(1 / 3)
    assert overall["n"] == 4 and overall["direction"] == "max"
    assert find(correlations, "rankme", "simclr")["spearman"] == pytest.approx(-1.0)
    assert find(correlations, "rankme", "simsiam")["spearman"] == pytest.approx(1.0)
    # Uniformity is read as lower-is-better: (-3, -3.5, -2, -1) oriented is (3, 3.5, 2, 1),
    # which orders the rows exactly as the probe does.
    assert find(correlations, "uniformity", "all")["spearman"] == pytest.approx(1.0)
    # Every (metric, tap) appears once per group: 2 methods, "all" and "all-healthy" (= all here).
    assert len(correlations) == len(analysis.SCORED_METRICS) * len(analysis.TAPS) * 4
    assert find(correlations, "rankme", "all-healthy")["spearman"] == pytest.approx(0.4)


def test_the_healthy_group_leaves_out_the_settings_built_to_collapse():
    rows = [
        {"name": "a", "method": "m", "collapse_setting": "none"},
        {"name": "b", "method": "m", "collapse_setting": "full"},
    ]
    groups = analysis.groups_of(rows)
    assert list(groups) == ["m", "all", "all-healthy"]
    assert [r["name"] for r in groups["all-healthy"]] == ["a"] and len(groups["all"]) == 2


# ---- CSV schema -------------------------------------------------------------------------------------
def test_result_columns_are_the_config_then_every_metric_of_every_tap_then_accuracies():
    columns = analysis.result_columns()
    assert len(columns) == len(set(columns))
    assert columns[: len(analysis.CONFIG_COLUMNS)] == list(analysis.CONFIG_COLUMNS)
    assert columns[0] == "name"
    for tap in ("backbone", "projector"):
        for metric in ("rankme", "lidar", "alpha_req", "lid", "twonn", "uniformity", "alignment"):
            assert f"{tap}/{metric}" in columns
    assert {"probe_accuracy", "probe_std", "knn_accuracy", "method", "collapse_setting"} <= set(columns)


def test_csv_round_trips_floats_exactly_and_writes_nan_as_empty(tmp_path):
    path = str(tmp_path / "t.csv")
    analysis.write_csv(path, [{"a": 0.1 + 0.2, "b": math.nan, "c": None, "d": "x"}], ["a", "b", "c", "d"])
    (back,) = analysis.read_csv(path)
    assert float(back["a"]) == 0.1 + 0.2
    assert back["b"] == "" and back["c"] == "" and back["d"] == "x"


# ---- seeds, bootstrap intervals, noise floor --------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_batched_correlations_match_scipy_row_by_row(seed):
    np = pytest.importorskip("numpy")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 4, (20, 9)).astype(float), rng.integers(0, 3, (20, 9)).astype(float)  # many ties
    x[:, 0], y[:, 0] = 9, 9  # no constant row
    rho, tau = analysis.batched_spearman(x, y), analysis.batched_kendall_tau_b(x, y)
    for i in range(len(x)):
        assert rho[i] == pytest.approx(stats.spearmanr(x[i], y[i])[0], abs=1e-12)
        assert tau[i] == pytest.approx(stats.kendalltau(x[i], y[i])[0], abs=1e-12)
    assert math.isnan(analysis.batched_spearman([[1, 1, 1]], [[1, 2, 3]])[0])
    assert math.isnan(analysis.batched_kendall_tau_b([[1, 2, 3]], [[4, 4, 4]])[0])


def seeded(name, cell, seed, rankme, probe, method="simclr", setting="none"):
    return {
        "name": name,
        "cell": cell,
        "method": method,
        "seed": seed,
        "collapse_setting": setting,
        "projector/rankme": rankme,
        "probe_accuracy": probe,
    }


def test_seeds_are_averaged_per_configuration_with_their_std():
    rows = [
        seeded("a", "c", 0, 10.0, 0.8),
        seeded("a", "c", 1, 20.0, 0.9),
        seeded("b", "c", 0, 5.0, 0.5),
        seeded("a", "d", 0, 1.0, 0.1),
    ]
    averaged = {(r["cell"], r["name"]): r for r in analysis.average_seeds(rows)}
    assert set(averaged) == {("c", "a"), ("c", "b"), ("d", "a")}  # a configuration is one per cell
    assert averaged["c", "a"]["projector/rankme"] == pytest.approx(15.0) and averaged["c", "a"]["n_seeds"] == 2
    assert averaged["c", "a"]["probe_accuracy"] == pytest.approx(0.85)
    assert averaged["c", "a"]["probe_accuracy_seed_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # ddof 1
    assert math.isnan(averaged["c", "b"]["probe_accuracy_seed_std"])  # one seed: no spread
    (floor,) = [n for n in analysis.noise_floor_rows(rows) if n["cell"] == "c" and n["accuracy"] == "probe_accuracy"]
    assert floor["configurations"] == 1 and floor["median_seed_std"] == pytest.approx(math.sqrt(0.005))


def test_a_perfect_ranking_has_a_degenerate_interval_and_a_noisy_one_covers_its_estimate():
    rows = [seeded(f"c{i}", "x", 0, float(i), 0.1 * i) for i in range(8)]
    (rank,) = [
        c
        for c in analysis.correlation_ci_rows(rows, resamples=200)
        if c["metric"] == "rankme"
        and c["tap"] == "projector"
        and c["group"] == "all"
        and c["accuracy"] == "probe_accuracy"
    ]
    assert rank["spearman"] == pytest.approx(1.0) and rank["n"] == 8
    assert rank["spearman_lo"] == pytest.approx(1.0) and rank["spearman_hi"] == pytest.approx(1.0)
    assert rank["kendall_lo"] == pytest.approx(1.0)
    noisy = [seeded(f"c{i}", "x", 0, float(v), 0.1 * i) for i, v in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])]
    (c,) = [
        c
        for c in analysis.correlation_ci_rows(noisy, resamples=500)
        if c["metric"] == "rankme"
        and c["tap"] == "projector"
        and c["group"] == "all"
        and c["accuracy"] == "probe_accuracy"
    ]
    assert c["spearman_lo"] < c["spearman"] < c["spearman_hi"] and -1 <= c["spearman_lo"] and c["spearman_hi"] <= 1
    # The pick's gap: the highest rank is c5 (0.5) and the best is c9 (0.9); its interval holds 0.4 and stays >= 0.
    (p,) = [
        p
        for p in analysis.pick_ci_rows(noisy, resamples=300)
        if p["metric"] == "rankme" and p["tap"] == "projector" and p["group"] == "all"
    ]
    assert p["pick"] == "c5" and p["gap"] == pytest.approx(0.4)
    assert 0 <= p["gap_lo"] <= 0.4 <= p["gap_hi"] <= 0.9


def test_percentile_interval_skips_non_finite_values():
    assert analysis.percentile_interval([math.nan, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = analysis.percentile_interval(list(range(101)))
    assert lo == pytest.approx(2.5) and hi == pytest.approx(97.5)
    assert all(math.isnan(v) for v in analysis.percentile_interval([math.nan]))


# ---- the stopping rules replayed as a detector --------------------------------------------------------
def test_ssl_guard_replay_stops_after_three_low_rank_epochs():
    # D = 64: RankMe below 0.2·64 = 12.8 at epochs 2, 3, 4 -> the third low check (epoch 4) stops.
    healthy_std = [0.1] * 6
    stop, reason = analysis.replay_ssl_guard([30, 20, 12, 11, 10, 9], healthy_std, dim=64)
    assert stop == 4 and "rankme" in reason
    assert (
        analysis.replay_ssl_guard([30, 12, 30, 12, 12, 30], healthy_std, dim=64)[0] is None
    )  # a healthy check resets the count
    # Normalised std below 0.25/8 = 0.03125 for 3 epochs stops even with a high rank.
    assert analysis.replay_ssl_guard([30] * 5, [0.1, 0.03, 0.02, 0.01, 0.01], dim=64)[0] == 3
    assert analysis.replay_ssl_guard([], [], dim=64) == (None, "")


def test_finetune_guard_replay_stops_on_two_epochs_of_drift_or_one_of_complete_collapse():
    assert analysis.replay_finetune_guard([0.95, 0.79, 0.85, 0.7, 0.6], [0.07] * 5, dim=128)[0] == 4
    assert analysis.replay_finetune_guard([0.95, 0.9], [0.07, 0.01], dim=128)[0] == 1  # 0.01 < 0.25/√128
    assert analysis.replay_finetune_guard([0.95, 0.79, 0.81], [0.07] * 3, dim=128)[0] is None


def ssl_run(name, seed, probe, ranks, curve, setting="none"):
    return {
        "name": name,
        "cell": "c",
        "method": "simsiam",
        "seed": seed,
        "collapse_setting": setting,
        "projector_dim": 64,
        "probe_accuracy": probe,
        "epoch_projector_rankme": ranks,
        "epoch_projector_normalized_std": [0.1] * len(ranks),
        "epoch_probe": curve,
    }


def test_detector_labels_onsets_and_rates_by_hand():
    runs = [
        ssl_run("simclr-base", 0, 0.9, [30, 30, 30, 30, 30], [0.80, 0.82, 0.84, 0.85, 0.86]),
        ssl_run("simsiam-base", 0, 0.8, [30, 30, 30, 30, 30], [0.80, 0.82, 0.84, 0.85, 0.86]),
        # Built to collapse: the label curve drops below base - 0.03 at epoch 1; RankMe low from epoch 2: stop at 4.
        ssl_run("simsiam-no-predictor", 0, 0.3, [30, 20, 10, 5, 3], [0.80, 0.70, 0.60, 0.50, 0.40], setting="full"),
        # Built to collapse but never stopped: a miss.
        ssl_run("simsiam-no-stopgrad-no-predictor", 0, 0.84, [30] * 5, [0.8] * 5, setting="full"),
        # Healthy but stopped: a false stop (also "harmful" by outcome: 0.2 < 0.1 + 0.75 * (0.85 - 0.1)).
        ssl_run("simsiam-lr3e-4", 0, 0.2, [10] * 5, [0.80, 0.82, 0.84, 0.85, 0.86]),
    ]
    rows = {r["name"]: r for r in analysis.ssl_detector_rows(runs)}
    collapsed = rows["simsiam-no-predictor"]
    assert (
        collapsed["collapsed"] and collapsed["harmful"] and collapsed["threshold"] == pytest.approx(0.1 + 0.75 * 0.75)
    )
    assert (collapsed["onset_epoch"], collapsed["stop_epoch"], collapsed["onset_to_stop"]) == (1, 4, 3)
    assert (
        rows["simsiam-no-stopgrad-no-predictor"]["stop_epoch"] is None
        and not rows["simsiam-no-stopgrad-no-predictor"]["harmful"]
    )
    assert rows["simsiam-lr3e-4"]["stop_epoch"] == 2 and not rows["simsiam-lr3e-4"]["collapsed"]
    (overall,) = [s for s in analysis.detector_summary(list(rows.values())) if s["cell"] == "all"]
    assert (overall["collapsed_runs"], overall["detected"], overall["healthy_runs"], overall["false_stops"]) == (
        2,
        1,
        3,
        1,
    )
    assert overall["detection_rate"] == pytest.approx(0.5) and overall["false_stop_rate"] == pytest.approx(1 / 3)
    assert overall["onset_to_stop_median"] == 3
    (by_outcome,) = [s for s in analysis.detector_summary(list(rows.values()), label="harmful") if s["cell"] == "all"]
    assert (by_outcome["collapsed_runs"], by_outcome["detected"]) == (2, 2)


def test_threshold_sweep_counts_stops_per_rank_fraction():
    runs = [
        ssl_run(
            "simsiam-no-predictor", 0, 0.3, [30, 10, 10, 10, 10], [0.1] * 5, setting="full"
        ),  # 10 < 0.2·64, > 0.1·64
        ssl_run("simclr-base", 0, 0.9, [30, 5, 5, 5, 5], [0.1] * 5),  # 5 < 0.1·64 = 6.4
    ]
    by_fraction = {t["min_fraction_of_dim"]: t for t in analysis.threshold_sweep_rows(runs, (0.05, 0.1, 0.2))}
    assert (by_fraction[0.2]["detected"], by_fraction[0.2]["false_stops"], by_fraction[0.2]["latest_stop_epoch"]) == (
        1,
        1,
        3,
    )
    assert (by_fraction[0.1]["detected"], by_fraction[0.1]["false_stops"]) == (0, 1)
    assert (
        by_fraction[0.05]["detected"],
        by_fraction[0.05]["false_stops"],
        by_fraction[0.05]["latest_stop_epoch"],
    ) == (0, 0, None)


def test_finetune_detector_labels_harm_against_the_pretrained_probe():
    runs = [
        {
            "name": "finetune-lr1",
            "lr": 1.0,
            "seed": 0,
            "pretrained_probe_accuracy": 0.89,
            "probe_accuracy": 0.80,
            "pretrained_epoch_probe": 0.85,
            "epoch_cka": [0.9, 0.7, 0.6],
            "epoch_normalized_std": [0.07] * 3,
            "epoch_probe": [0.84, 0.80, 0.78],
            "feature_dim": 128,
        },
        {
            "name": "finetune-lr0.05",
            "lr": 0.05,
            "seed": 0,
            "pretrained_probe_accuracy": 0.89,
            "probe_accuracy": 0.88,
            "pretrained_epoch_probe": 0.85,
            "epoch_cka": [0.95, 0.93, 0.92],
            "epoch_normalized_std": [0.07] * 3,
            "epoch_probe": [0.85, 0.85, 0.86],
            "feature_dim": 128,
        },
    ]
    harmful, healthy = analysis.finetune_detector_rows(runs)
    assert (
        harmful["collapsed"] and (harmful["onset_epoch"], harmful["stop_epoch"]) == (1, 2) and harmful["min_cka"] == 0.6
    )
    assert not healthy["collapsed"] and healthy["stop_epoch"] is None


# ---- the whole pipeline, fast mode ------------------------------------------------------------------
OUTPUTS = (
    "results.csv",
    "results_seed_mean.csv",
    "correlations.csv",
    "correlations.md",
    "picks.csv",
    "picks.md",
    "noise_floor.csv",
    "noise_floor.md",
    "detector_runs.csv",
    "detector.md",
    "summary.md",
    "protocol.md",
    "summary.png",
)


@pytest.mark.slow
def test_fast_mode_writes_every_output_and_resumes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("mnist1d")
    import model_selection_study as study

    out_dir = str(tmp_path / "study")
    result = study.main(["--fast", "--out-dir", out_dir])
    out = capsys.readouterr().out
    names = [f"{c.name}-s0" for c in study.FAST_SWEEP] + [f"{c.name}-s0" for c in study.FAST_FINETUNES]
    assert result["trained"] == names
    assert {c.method for c in study.FAST_SWEEP} == {"simclr", "simsiam"}
    assert {c.dataset for c in study.FAST_SWEEP} == {"digits", "mnist1d"} and {c.encoder for c in study.FAST_SWEEP} == {
        "mlp",
        "cnn",
    }

    for name in OUTPUTS:
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    with open(os.path.join(out_dir, "summary.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    # results.csv: the schema, one row per SSL run, finite metrics, accuracies in [0, 1].
    rows = analysis.read_csv(os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "results.csv")) as handle:
        assert handle.readline().strip().split(",") == analysis.result_columns()
    assert [r["name"] for r in rows] == [c.name for c in study.FAST_SWEEP]
    assert {r["cell"] for r in rows} == {"digits-mlp", "mnist1d-cnn"}
    for r in rows:
        for tap in analysis.TAPS:
            for metric in analysis.SCORED_METRICS:
                assert math.isfinite(float(r[f"{tap}/{metric}"])), (r["name"], tap, metric)
        for accuracy in analysis.RANKED_ACCURACIES:
            assert 0 <= float(r[accuracy]) <= 1, accuracy
    # Every run recorded one value per epoch of the guard's inputs and of the label curve.
    for record in result["rows"]:
        assert (
            len(record["epoch_projector_rankme"])
            == len(record["epoch_projector_normalized_std"])
            == len(record["epoch_probe"])
            == 2
        )
    (finetune,) = result["finetunes"]
    assert len(finetune["epoch_cka"]) == study.FAST_FINETUNES[0].epochs and all(
        -1e-6 <= v <= 1 + 1e-6 for v in finetune["epoch_cka"]
    )

    # The saved tables are the analysis of the saved rows.
    correlations = analysis.read_csv(os.path.join(out_dir, "correlations.csv"))
    assert {c["group"] for c in correlations} == {"simclr", "simsiam", "all", "all-healthy"}
    assert set(analysis.RANKED_ACCURACIES) <= {c["accuracy"] for c in correlations}
    detections = analysis.read_csv(os.path.join(out_dir, "detector_runs.csv"))
    assert len(detections) == len(names)
    assert "rankme (projector)" in out and "Seed-noise floor" in out and "collapsing runs" in out

    # Resumable: a rerun trains nothing; a removed record is retrained to the same numbers (fixed seeds).
    assert study.main(["--fast", "--out-dir", out_dir])["trained"] == []
    os.remove(study.record_path(out_dir, study.FAST_SWEEP[0], 0))
    again = study.main(["--fast", "--out-dir", out_dir])
    assert again["trained"] == [names[0]]
    first, retrained = result["rows"][0], again["rows"][0]
    for column in analysis.result_columns():
        if column != "train_seconds":
            assert retrained[column] == first[column], column


def test_jobs_must_be_positive():
    pytest.importorskip("sklearn")
    import model_selection_study as study

    with pytest.raises(SystemExit):
        study.parse_args(["--jobs", "0"])
    assert study.parse_args(["--fast"]).jobs == 1 and study.parse_args(["--jobs", "2"]).seeds == [0, 1, 2]


def test_a_record_of_another_setting_is_not_reused(tmp_path):
    pytest.importorskip("sklearn")
    import model_selection_study as study

    config = study.FAST_SWEEP[0]
    path = study.record_path(str(tmp_path), config)
    study.save_record(path, {"key": config.key(2, 0, 3), "name": config.name})
    assert study.load_record(path, config.key(2, 0, 3))["name"] == config.name
    assert study.load_record(path, config.key(3, 0, 3)) is None  # more epochs: retrain
    # A record scored before a metric was added has another key: it is retrained, not reused without it.
    old_payload = {**study.asdict(config), "epochs": 2, "seed": 0, "probe_draws": 3}
    old_key = study.hashlib.sha256(study.json.dumps(old_payload, sort_keys=True).encode()).hexdigest()[:16]
    assert old_key != config.key(2, 0, 3)
    study.save_record(path, {"key": old_key, "name": config.name})
    assert study.load_record(path, config.key(2, 0, 3)) is None
    assert study.load_record(str(tmp_path / "missing.json"), "k") is None


def test_help_explains_the_study(capsys):
    pytest.importorskip("sklearn")
    import model_selection_study as study

    with pytest.raises(SystemExit) as exit_info:
        study.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--fast" in out and "--seed" in out and "--out-dir" in out and "--jobs" in out
    assert study.__doc__.strip().splitlines()[0] in out


def test_the_sweep_covers_what_the_study_claims():
    pytest.importorskip("sklearn")
    import model_selection_study as study

    keys = {(c.cell, c.name) for c in study.SWEEP}
    assert len(keys) == len(study.SWEEP)
    assert {c.cell for c in study.SWEEP} == {"digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn"}
    assert len(study.SEEDS) >= 3
    for cell in {c.cell for c in study.SWEEP}:
        configs = [c for c in study.SWEEP if c.cell == cell]
        assert {c.method for c in configs} == {"simclr", "simsiam"}
        assert {c.collapse_setting for c in configs} == {"none", "partial", "full"}
        for method in ("simclr", "simsiam"):
            assert len([c for c in configs if c.method == method]) >= 5
        for field in ("temperature", "lr", "augmentation_strength"):
            assert len({getattr(c, field) for c in configs if c.method == "simclr"}) > 1, field
    assert len({c.lr for c in study.FINETUNES}) >= 4


def test_encoders_give_the_feature_width_on_both_datasets():
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import model_selection_study as study

    for dataset, shape in (("digits", (5, 1, 8, 8)), ("mnist1d", (5, 1, 40))):
        x = torch.randn(shape)
        for encoder in ("mlp", "cnn"):
            assert study.build_encoder(dataset, encoder)(x).shape == (5, study.FEATURE_DIM)
        views = study.fixed_views(dataset, x, 3)
        assert len(views) == 3 and all(v.shape == x.shape for v in views)
        assert not torch.equal(views[0], views[1])
        assert torch.equal(study.fixed_views(dataset, x, 3)[2], views[2])  # fixed generator: the same views again
        # Strength 0 is the identity on MNIST-1D (no shift, stretch, scaling or noise).
    signals = torch.randn(4, 1, 40)
    assert torch.allclose(study.augment_mnist1d(signals, 0.0), signals, atol=1e-5)
