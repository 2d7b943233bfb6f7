"""The model-selection study: its rank correlations, pick logic and CSV schema against hand-computed
values (and scipy), then the whole pipeline in its fast mode, in-process."""

import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import study_analysis as analysis  # noqa: E402  (pure Python: no optional dependency)


# ---- rank correlations ------------------------------------------------------------------------------
def test_average_ranks_share_the_mean_rank_of_a_tie():
    assert analysis.average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert analysis.average_ranks([3, 1, 3, 3]) == [3, 1, 3, 3]  # ranks 2, 3, 4 -> 3
    assert analysis.average_ranks([]) == []


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
    assert len(correlations) == len(analysis.METRICS) * len(analysis.TAPS) * 4
    assert find(correlations, "rankme", "all-healthy")["spearman"] == pytest.approx(0.4)


def test_the_healthy_group_leaves_out_the_settings_built_to_collapse():
    rows = [{"name": "a", "method": "m", "collapse_setting": "none"}, {"name": "b", "method": "m", "collapse_setting": "full"}]
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


# ---- the whole pipeline, fast mode ------------------------------------------------------------------
@pytest.mark.slow
def test_fast_mode_writes_every_output_and_resumes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import model_selection_study as study

    out_dir = str(tmp_path / "study")
    result = study.main(["--fast", "--out-dir", out_dir])
    out = capsys.readouterr().out
    names = [c.name for c in study.FAST_SWEEP]
    assert result["trained"] == names
    assert {c.method for c in study.FAST_SWEEP} == {"simclr", "simsiam"}

    for name in ("results.csv", "correlations.csv", "correlations.md", "picks.csv", "picks.md", "metric_vs_accuracy.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    with open(os.path.join(out_dir, "metric_vs_accuracy.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    # results.csv: the schema, one row per configuration, finite metrics, accuracies in [0, 1].
    rows = analysis.read_csv(os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "results.csv")) as handle:
        assert handle.readline().strip().split(",") == analysis.result_columns()
    assert [r["name"] for r in rows] == names
    for r in rows:
        for tap in analysis.TAPS:
            for metric in analysis.METRICS:
                assert math.isfinite(float(r[f"{tap}/{metric}"])), (r["name"], tap, metric)
        assert 0 <= float(r["probe_accuracy"]) <= 1 and 0 <= float(r["knn_accuracy"]) <= 1

    # The saved tables are the analysis of the saved rows.
    numeric = [{**r, **{c: float(r[c]) for c in analysis.result_columns() if "/" in c or "accuracy" in c}} for r in rows]
    picks = analysis.read_csv(os.path.join(out_dir, "picks.csv"))
    assert [p["pick"] for p in picks] == [p["pick"] for p in analysis.pick_rows(numeric)]
    correlations = analysis.read_csv(os.path.join(out_dir, "correlations.csv"))
    assert {c["group"] for c in correlations} == {"simclr", "simsiam", "all", "all-healthy"}
    assert {c["accuracy"] for c in correlations} == {"probe_accuracy", "knn_accuracy"}
    assert "rankme (max) | projector" in out and "Accuracy-best configuration" in out

    # Resumable: a rerun trains nothing; a removed record is retrained to the same numbers (fixed seeds).
    assert study.main(["--fast", "--out-dir", out_dir])["trained"] == []
    os.remove(study.record_path(out_dir, study.FAST_SWEEP[0]))
    again = study.main(["--fast", "--out-dir", out_dir])
    assert again["trained"] == [names[0]]
    first, retrained = result["rows"][0], again["rows"][0]
    for column in analysis.result_columns():
        if column != "train_seconds":
            assert retrained[column] == first[column], column


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
    assert "--fast" in out and "--seed" in out and "--out-dir" in out
    assert study.__doc__.strip().splitlines()[0] in out


def test_the_sweep_covers_what_the_study_claims():
    pytest.importorskip("sklearn")
    import model_selection_study as study

    assert len(study.SWEEP) >= 16 and len({c.name for c in study.SWEEP}) == len(study.SWEEP)
    assert {c.method for c in study.SWEEP} == {"simclr", "simsiam"}
    assert {c.collapse_setting for c in study.SWEEP} == {"none", "partial", "full"}
    for field in ("temperature", "lr", "projector_dim", "augmentation_strength", "batch_size"):
        assert len({getattr(c, field) for c in study.SWEEP if c.method == "simclr"}) > 1, field
