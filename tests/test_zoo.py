"""The collapse zoo: the guard rule's semantics by hand, its vectorised twin against it, the labels and
scores, then the whole pipeline in its fast mode, in-process."""

import gzip
import json
import math
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import zoo_analysis as analysis  # noqa: E402  (numpy only: no optional dependency)

D = 64  # spread floor 0.25/√64 = 0.03125, rank floor 0.1·64 = 6.4
BASE = {
    "rank_floor": 0.1,
    "spread_floor": 0.25,
    "rank_drop": None,
    "spread_drop": None,
    "trend_mode": "any",
    "warmup": 0,
    "patience": 1,
}


def checks(ranks, spreads=None):
    spreads = spreads if spreads is not None else [0.1] * len(ranks)
    return [{"rankme": r, "normalized_std": s} for r, s in zip(ranks, spreads)]


def guard(ranks, spreads=None, **settings):
    return analysis.replay_guard(checks(ranks, spreads), D, {**BASE, **settings})


# ---- the rule, by hand ----------------------------------------------------------------------------------
def test_floors_apply_from_the_first_check_and_name_the_kind():
    assert guard([5, 30]) == (0, "dimensional")  # 5 < 6.4: few directions, spread kept
    assert guard([5], [0.03]) == (0, "complete")  # both floors (0.03 < 0.03125): toward a point
    # The spread floor alone, rank still 30 of 64: not "complete" (the mislabel), collapse in progress.
    assert guard([30, 30], [0.03, 0.1]) == (0, "in progress")
    assert guard([30, 30, 30]) == (None, "")


def test_patience_counts_consecutive_unhealthy_checks_and_a_healthy_one_resets():
    assert guard([5, 5, 30, 5, 5, 5], patience=3) == (5, "dimensional")
    assert guard([5, 5, 30, 5, 5, 30], patience=3) == (None, "")
    # One counter per condition: a floor check then a trend check is one of each, not two in a row...
    ranks, spreads = (
        [40, 40, 15],
        [0.1, 0.03, 0.1],
    )  # check 1: spread floor only; check 2: rank 62 % below its best only
    assert guard(ranks, spreads, rank_drop=0.5, patience=2) == (None, "")
    # ... unless both are counted together (the other reading, kept for comparison).
    assert analysis.replay_guard(
        checks(ranks, spreads), D, {**BASE, "rank_drop": 0.5, "patience": 2}, counters="shared"
    ) == (2, "in progress")
    # A check with both conditions feeds both counters.
    assert guard([40, 40, 5, 15], rank_drop=0.5, patience=2) == (3, "in progress")


def test_trend_compares_with_the_best_since_warmup():
    # Best 40; 19 is 52.5 % below it, 21 is 47.5 % below.
    assert guard([40, 30, 21, 19], rank_drop=0.5) == (3, "in progress")
    # With warmup 1 the 40 of check 0 never counts: the best is 30, and 19 is only 37 % below it.
    assert guard([40, 30, 21, 19], rank_drop=0.5, warmup=1) == (None, "")
    # Checks inside the warmup never stop on the trend, even far below a later best...
    assert guard([10, 40, 40], rank_drop=0.5, warmup=1) == (None, "")
    # ... but the floors still apply there.
    assert guard([5, 40, 40], rank_drop=0.5, warmup=2) == (0, "dimensional")


def test_trend_mode_any_or_all():
    ranks, spreads = [40, 15, 15], [0.1, 0.1, 0.05]  # rank drops at check 1, spread at check 2
    assert guard(ranks, spreads, rank_drop=0.5, spread_drop=0.3, trend_mode="any") == (1, "in progress")
    assert guard(ranks, spreads, rank_drop=0.5, spread_drop=0.3, trend_mode="all") == (2, "in progress")
    # With one drop switched off, "all" needs only the other.
    assert guard(ranks, spreads, rank_drop=None, spread_drop=0.3, trend_mode="all") == (2, "in progress")
    assert guard(ranks, spreads) == (None, "")  # both off: floors only


def test_non_finite_values_stop_at_once():
    assert guard([30, math.nan, 30], patience=3) == (1, "divergence")
    assert guard([30, 30], [0.1, math.inf], patience=3) == (1, "divergence")


@pytest.mark.parametrize("counters", ["separate", "shared"])
def test_the_vectorised_twin_matches_the_rule_on_random_runs(counters):
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        n = int(rng.integers(1, 25))
        ranks = np.maximum(1.0, 40 * np.cumprod(rng.uniform(0.8, 1.1, n)))
        spreads = 0.12 * np.cumprod(rng.uniform(0.8, 1.1, n))
        if i % 7 == 0:
            ranks[rng.integers(0, n)] = math.nan
        records.append(
            {
                "history": {"projector/rankme": ranks.tolist(), "projector/normalized_std": spreads.tolist()},
                "widths": {"projector": D},
            }
        )
    settings = analysis.grid_settings(analysis.FAST_GRID)
    for s, stops in analysis.batch_stops(records, settings, counters):
        for record, stop in zip(records, stops):
            expected, _ = analysis.replay_guard(analysis.guard_inputs(record), D, s, counters)
            assert (expected if expected is not None else -1) == stop, (s, record)


def test_old_rules_together_are_the_study_replay():
    import study_analysis

    for ranks, spreads in (
        ([30, 20, 12, 11, 10, 9], [0.1] * 6),
        ([30] * 5, [0.1, 0.03, 0.02, 0.01, 0.01]),
        ([30, 12, 30, 12, 12, 30], [0.1] * 6),
    ):
        ours = analysis.replay_old(checks(ranks, spreads), D, ("rank", "spread"))
        assert ours == study_analysis.replay_ssl_guard(ranks, spreads, D)
    assert analysis.replay_old(checks([30, 20, 12, 11, 10, 9]), D, ("spread",)) == (None, "")


# ---- labels and scores ----------------------------------------------------------------------------------
def test_onset_is_the_first_epoch_below_the_reference_by_the_margin():
    assert analysis.onset_epoch([0.80, 0.77, 0.76], [0.80, 0.80, 0.80]) == 2  # 0.77 is exactly 0.03 below: not yet
    assert analysis.onset_epoch([0.9, 0.9], [0.8, 0.8]) is None


def record(name, family, design, seed, curve, cell="digits-mlp"):
    return {
        "cell": cell,
        "dataset": cell.split("-")[0],
        "encoder": cell.split("-")[1],
        "family": family,
        "name": name,
        "mode": "x",
        "expected": "x",
        "design": design,
        "seed": seed,
        "epoch_probe": curve,
        "probe_accuracy": curve[-1],
        "widths": {"projector": D},
        "history": {},
    }


def test_the_healthy_reference_is_the_median_of_the_familys_healthy_runs_in_the_cell():
    runs = [
        record("vicreg", "vicreg", "healthy", 0, [0.70, 0.80, 0.83]),
        record("vicreg", "vicreg", "healthy", 1, [0.72, 0.82, 0.84]),
        record("vicreg", "vicreg", "healthy", 2, [0.60, 0.76, 0.85]),
        record("simclr", "simclr", "healthy", 0, [0.10, 0.10, 0.10]),  # another family: never a reference for vicreg
        record("vicreg", "vicreg", "healthy", 0, [0.10, 0.10, 0.10], cell="digits-cnn"),  # another cell: neither
        record("vicreg-invariance-only", "vicreg", "collapsing", 0, [0.71, 0.78, 0.70]),
        record("vicreg-no-covariance", "vicreg", "collapsing", 0, [0.71, 0.80, 0.83]),
    ]
    np.testing.assert_allclose(analysis.healthy_reference(runs, runs[5]), [0.70, 0.80, 0.84])
    np.testing.assert_allclose(
        analysis.healthy_reference(runs, runs[2]), [0.70, 0.80, 0.84]
    )  # the study's way: the run is part of it
    np.testing.assert_allclose(
        analysis.healthy_reference(runs, runs[2], leave_one_out=True), [0.71, 0.81, 0.835]
    )  # its siblings only
    assert analysis.healthy_reference(runs, runs[3], leave_one_out=True) is None  # simclr's only healthy run is itself
    labels = {(l["cell"], l["name"], l["seed"]): l for l in analysis.label_rows(runs)}
    collapsed, held = labels["digits-mlp", "vicreg-invariance-only", 0], labels["digits-mlp", "vicreg-no-covariance", 0]
    assert (collapsed["onset_epoch"], collapsed["label"], collapsed["agrees"]) == (
        2,
        "collapsing",
        True,
    )  # 0.70 < 0.84 - 0.03
    assert (held["onset_epoch"], held["label"], held["agrees"]) == (None, "collapsing, probe held", False)
    # Seed 2 starts 0.10 below the median: a healthy design whose probe fell, reported as such.
    assert (
        labels["digits-mlp", "vicreg", 2]["onset_epoch"] == 0
        and labels["digits-mlp", "vicreg", 2]["label"] == "healthy, probe fell"
    )
    assert labels["digits-mlp", "vicreg", 0]["label"] == "healthy"


def test_score_counts_by_design_and_reports_disagreements():
    rows = [
        {"run": "a", "design": "collapsing", "onset_epoch": 3, "stop_epoch": 4, "onset_to_stop": 1},
        {"run": "b", "design": "collapsing", "onset_epoch": 3, "stop_epoch": 8, "onset_to_stop": 5},
        {"run": "c", "design": "collapsing", "onset_epoch": 2, "stop_epoch": None, "onset_to_stop": None},
        {
            "run": "f",
            "design": "collapsing",
            "onset_epoch": None,
            "stop_epoch": 2,
            "onset_to_stop": None,
        },  # caught; its probe never fell
        {"run": "g", "design": "collapsing", "onset_epoch": None, "stop_epoch": None, "onset_to_stop": None},
        {"run": "d", "design": "healthy", "onset_epoch": None, "stop_epoch": 6, "onset_to_stop": None},
        {"run": "e", "design": "healthy", "onset_epoch": 4, "stop_epoch": None, "onset_to_stop": None},
    ]
    s = analysis.score(rows)
    assert (s["collapsing"], s["caught"], s["missed"], s["missed_probe_fell"]) == (5, 3, ["c", "g"], ["c"])
    assert (s["lags"], s["lag_median"], s["lag_worst"], s["with_onset"]) == ([1, 5], 3.0, 5, 3)
    assert (s["healthy"], s["false_stops"], s["unconfirmed"], s["unconfirmed_stopped"], s["healthy_fell"]) == (
        2,
        ["d"],
        2,
        1,
        1,
    )
    assert not analysis.goal_met(s)
    assert analysis.goal_met(analysis.score([rows[0], rows[6]]))


def test_max_drop_after_warmup():
    assert analysis.max_drop_after_warmup([10, 20, 15, 5, 30], 0) == pytest.approx(0.75)  # 5 against 20
    assert analysis.max_drop_after_warmup([10, 20, 15, 5, 30], 3) == pytest.approx(
        0.0
    )  # best since check 3 is 5, then 30
    assert math.isnan(analysis.max_drop_after_warmup([10, 20], 5))


def test_the_chosen_setting_is_the_centre_of_the_optimal_set():
    grid = {
        **{k: (BASE[k],) for k in analysis.GUARD_KEYWORDS},
        "rank_drop": (0.3, 0.4, 0.5, 0.6, 0.7),
        "patience": (1, 2, 3),
    }
    optimal = [{**BASE, "rank_drop": d, "patience": p} for d in (0.4, 0.5, 0.6, 0.7) for p in (2, 3)]
    chosen = analysis.choose_setting(optimal, grid)
    # Median positions: rank_drop between 0.5 and 0.6 (2.5), patience 2.5; distance ties go to the grid's first.
    assert chosen["rank_drop"] == 0.5 and chosen["patience"] == 2
    with pytest.raises(ValueError):
        analysis.choose_setting([], grid)


def test_grid_search_ranks_by_false_stops_then_misses_then_lag():
    collapsing = {
        "history": {"projector/rankme": [40, 40, 30, 20, 10], "projector/normalized_std": [0.1] * 5},
        "widths": {"projector": D},
    }
    healthy = {
        "history": {"projector/rankme": [40, 25, 25, 25, 25], "projector/normalized_std": [0.1] * 5},
        "widths": {"projector": D},
    }
    labels = [{"design": "collapsing", "onset_epoch": 2}, {"design": "healthy", "onset_epoch": None}]
    grid = {**{k: (BASE[k],) for k in analysis.GUARD_KEYWORDS}, "rank_drop": (0.3, 0.45, 0.6)}
    table = analysis.grid_search([collapsing, healthy], labels, analysis.grid_settings(grid), margin=0.0)
    by_drop = {t["rank_drop"]: t for t in table}
    assert by_drop[0.3]["false_stops"] == 1  # the healthy run fell 37.5 %
    assert (by_drop[0.45]["false_stops"], by_drop[0.45]["missed"], by_drop[0.45]["lag_median"]) == (
        0,
        0,
        1.0,
    )  # 20 is 50 % below 40: check 3
    assert (by_drop[0.6]["missed"], by_drop[0.6]["lag_median"]) == (0, 2.0)  # 10 is 75 % below: check 4
    assert [t["rank_drop"] for t in table] == [0.45, 0.6, 0.3]
    assert analysis.optimal_set(table) == [table[0]]
    # With a 20 % margin, 0.45 becomes 0.36 < 37.5 %: too close to the healthy run, so 0.6 (0.48 tightened) wins.
    table = analysis.grid_search([collapsing, healthy], labels, analysis.grid_settings(grid))
    assert [(t["rank_drop"], t["false_stops_tightened"], t["false_stops"]) for t in table] == [
        (0.6, 0, 0),
        (0.45, 1, 0),
        (0.3, 1, 1),
    ]
    assert analysis.optimal_set(table, analysis.plain_objective) == [t for t in table if t["rank_drop"] == 0.45]


def test_tightened_settings_move_every_threshold_toward_stopping():
    strict = analysis.tightened({**BASE, "rank_drop": 0.5, "spread_drop": None}, 0.2)
    assert strict["rank_floor"] == pytest.approx(0.12) and strict["spread_floor"] == pytest.approx(0.3)
    assert (
        strict["rank_drop"] == pytest.approx(0.4)
        and strict["spread_drop"] is None
        and strict["patience"] == BASE["patience"]
    )


@pytest.mark.skipif(
    not analysis.library_guard_available(), reason="reprmetrics.stopping.ssl_guard is not on this branch yet"
)
def test_the_library_guard_agrees_with_the_replay():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 20))
        values = checks(
            np.maximum(1.0, 40 * np.cumprod(rng.uniform(0.8, 1.1, n))).tolist(),
            (0.12 * np.cumprod(rng.uniform(0.8, 1.1, n))).tolist(),
        )
        for settings in analysis.grid_settings(analysis.FAST_GRID)[::7]:
            assert analysis.replay_with_library(values, D, settings) == analysis.replay_guard(values, D, settings), (
                settings
            )


# ---- the zoo ----------------------------------------------------------------------------------------------
def test_the_zoo_covers_five_families_in_their_failure_modes():
    pytest.importorskip("sklearn")
    import collapse_zoo as zoo

    assert {c.family for c in zoo.CELL_ZOO} == {"simclr", "simsiam", "byol", "vicreg", "barlow_twins"}
    for family in zoo.FAMILIES:
        designs = [c.design for c in zoo.CELL_ZOO if c.family == family]
        assert designs.count("healthy") == 1 and designs.count("collapsing") >= 1, family
    assert {c.cell for c in zoo.ZOO} == {"digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn"}
    assert len(zoo.SEEDS) >= 3 and zoo.EPOCHS["digits"] >= 25
    modes = {c.name: dict(c.options) for c in zoo.CELL_ZOO}
    assert modes["vicreg-invariance-only"] == {"variance": 0.0, "covariance": 0.0}  # the slow collapse
    assert modes["simsiam-no-stopgrad"]["stop_gradient"] is False and modes["byol-momentum0"]["momentum"] == 0.0
    assert any(c.lr > 10 * 2e-3 for c in zoo.CELL_ZOO)  # a too-high learning rate


def test_byol_teacher_follows_the_student_by_ema_and_is_not_a_tap():
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from digits_ssl import BYOL

    model = BYOL(momentum=0.5)
    assert model.teacher["backbone"] is not model.backbone and not any(
        p.requires_grad for p in model.teacher.parameters()
    )
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher["backbone"].parameters()]
    model.on_train_batch_end(None, None, 0)
    for t, b, s in zip(model.teacher["backbone"].parameters(), before, model.backbone.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    model.momentum = 0.0
    model.on_train_batch_end(None, None, 0)
    for t, s in zip(model.teacher["backbone"].parameters(), model.backbone.parameters()):
        torch.testing.assert_close(t, s)
    # The tap names resolve to the student's modules, never the teacher's.
    assert model.get_submodule("backbone") is model.backbone and model.get_submodule("projector") is model.projector


@pytest.mark.slow
def test_fast_mode_records_every_value_dates_onsets_and_replays_the_guard(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import collapse_zoo as zoo

    out_dir = str(tmp_path / "zoo")
    result = zoo.main(["--fast", "--out-dir", out_dir])
    out = capsys.readouterr().out
    assert sorted(result["trained"]) == sorted(f"{c.cell}-{c.name}-s0" for c in zoo.FAST_ZOO)
    assert {c.family for c in zoo.FAST_ZOO} >= {"byol", "vicreg"} and {c.design for c in zoo.FAST_ZOO} == {
        "healthy",
        "collapsing",
    }

    # Records: every logged value of both taps, one per epoch; BYOL's teacher is never captured
    # (the backbone saw the 500 held-out images once per epoch, not twice).
    for config in zoo.FAST_ZOO:
        with gzip.open(zoo.record_path(out_dir, config, 0), "rt") as handle:
            saved = json.load(handle)
        assert saved["widths"] == {"backbone": 128, "projector": 64}
        for tap in ("backbone", "projector"):
            for metric in (
                "rankme",
                "normalized_std",
                "nesum",
                "lid",
                "alpha_req",
                "num_samples",
                "lidar",
                "uniformity",
            ):
                values = saved["history"][f"{tap}/{metric}"]
                assert len(values) == 4 and all(math.isfinite(v) for v in values), (config.name, tap, metric)
            assert saved["history"][f"{tap}/num_samples"] == [500.0] * 4
        assert len(saved["epoch_probe"]) == 4 and 0 < saved["probe_accuracy"] <= 1

    # The slow collapse loses probe accuracy against healthy VICReg within 4 epochs: an onset is dated.
    labels = {l["name"]: l for l in result["labels"]}
    assert (
        labels["vicreg-invariance-only"]["onset_epoch"] is not None
        and labels["vicreg-invariance-only"]["design"] == "collapsing"
    )
    assert labels["vicreg"]["label"] == "healthy"  # one seed: its own reference, so no onset
    # The replay: a stop or None for every run and rule, the tables and the figure written.
    assert set(result["chosen"]) == set(analysis.GUARD_KEYWORDS)
    for name in (
        "detector.md",
        "labels.md",
        "healthy_drops.md",
        "tuning.md",
        "runs.csv",
        "grid.csv.gz",
        "_readme_section.md",
        "curves_digits-mlp.png",
    ):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    runs = analysis.read_csv(os.path.join(out_dir, "runs.csv"))
    assert len(runs) == 3 and {r["name"] for r in runs} == {c.name for c in zoo.FAST_ZOO}
    detector = open(os.path.join(out_dir, "detector.md")).read()
    assert (
        "| family | configuration (failure mode) |" in detector
        and "old rules together" in detector
        and "tuned ssl_guard" in out
    )
    # The tuned guard stops nothing healthy on the runs it was tuned on and catches the dated collapse.
    tuned = result["results"]["tuned ssl_guard"]["tuning (digits)"]
    assert tuned["false_stops"] == [] and tuned["caught"] == tuned["collapsing"] == 1

    # Resumable: a rerun trains nothing and gives the same decisions.
    again = zoo.main(["--fast", "--out-dir", out_dir])
    assert again["trained"] == [] and again["chosen"] == result["chosen"]
    assert [d["stop_epoch"] for d in again["detections"]] == [d["stop_epoch"] for d in result["detections"]]


def test_jobs_must_be_positive_and_fast_is_small():
    pytest.importorskip("sklearn")
    import collapse_zoo as zoo

    with pytest.raises(SystemExit):
        zoo.parse_args(["--jobs", "0"])
    fast = zoo.parse_args(["--fast"])
    assert fast.seeds == [0] and fast.epochs == 4 and len(zoo.FAST_ZOO) <= 4
    assert zoo.parse_args([]).epochs is None  # per dataset: zoo.EPOCHS
