"""StopRules: the framework-agnostic rule set both stoppers use (parsing, checks against the monitor, decisions)."""

from __future__ import annotations

import pytest
import torch

from reprmetrics.monitor import MonitorConfigurationError
from reprmetrics.results import TrackerResult
from reprmetrics.stopping import KeyGuard, KeyStyle, SSLGuard, StopRules, ssl_guard

LIGHTNING = KeyStyle(
    "Monitor", {"train": "train", "val": "val"}, {s: f"{{prefix}}/{s}/{{tap}}/{{metric}}" for s in ("train", "val")}
)
TRAINER = KeyStyle(
    "Callback",
    {"train": "train", "eval": "val"},
    {"train": "{prefix}/{tap}/{metric}", "val": "eval_{prefix}/{tap}/{metric}"},
    {"eval_{prefix}/": "{prefix}/eval/"},
)


def result(stage: str, values: dict[str, float], width: int = 32) -> TrackerResult:
    taps = {key.split("/")[0] for key in values}
    names = {tap: ["rankme", "normalized_std", "num_samples"] for tap in taps}
    return TrackerResult(
        stage, 0, {k: torch.tensor(v) for k, v in values.items()}, widths=dict.fromkeys(taps, width), names=names
    )


def test_keys_of_each_style_parse_to_the_trackers_stage_and_log_under_the_frameworks_name():
    rules = StopRules.parse(
        ["repr/eval/enc/rankme", "eval_repr/enc/normalized_std", "repr/train/enc/rankme"], TRAINER, min_value=1.0
    )
    guards = [guard for _, guard in rules]
    assert [(g.stage, g.tap, g.metric) for g in guards] == [
        ("val", "enc", "rankme"),
        ("val", "enc", "normalized_std"),
        ("train", "enc", "rankme"),
    ]
    assert [g.criteria.monitor for g in guards] == [
        "eval_repr/enc/rankme",
        "eval_repr/enc/normalized_std",
        "repr/enc/rankme",
    ]
    lightning = StopRules.parse("repr/val/a/b/rankme", LIGHTNING, min_value=1.0)  # tap names may hold '/'
    assert [(g.stage, g.tap, g.metric) for _, g in lightning] == [("val", "a/b", "rankme")]


@pytest.mark.parametrize(
    "stop_on, match",
    [
        ("repr/valid/enc/rankme", r"not a monitor key.*repr/train/\{tap\}/\{metric\} or repr/eval/\{tap\}/\{metric\}"),
        (3, "must be strings or ssl_guard"),
        ({"repr/eval/enc/rankme": {"min_valu": 1.0}}, r"unknown criteria \['min_valu'\]"),
        ("repr/eval/enc/uniformity", "lower-is-healthier"),
    ],
)
def test_bad_stop_on_raises_with_what_exists(stop_on, match):
    with pytest.raises(MonitorConfigurationError, match=match):
        StopRules.parse(stop_on, TRAINER, min_value=1.0)


def test_thresholds_without_a_key_raise_instead_of_doing_nothing():
    with pytest.raises(MonitorConfigurationError, match="no `stop_on` key"):
        StopRules.parse(ssl_guard("enc"), TRAINER, min_value=1.0)
    assert isinstance(next(iter(StopRules.parse(ssl_guard("enc"), TRAINER)))[1], SSLGuard)


def test_check_source_names_the_closest_tap_and_the_missing_monitor():
    rules = StopRules.parse("repr/val/projecter/rankme", LIGHTNING, min_value=1.0, owner="Stopper")
    with pytest.raises(
        MonitorConfigurationError, match=r"names tap 'projecter'.*did you mean repr/val/projector/rankme"
    ):
        rules.check_monitor(["backbone", "projector"], 10)
    with pytest.raises(MonitorConfigurationError, match=r"no Monitor with prefix 'repr'.*Monitor\(\['projecter'\]\)"):
        rules.check_source(None, "Stopper(...)")
    train = StopRules.parse("repr/train/enc/rankme", LIGHTNING, min_value=1.0)
    with pytest.raises(MonitorConfigurationError, match="every_n_train_steps=0"):
        train.check_monitor(["enc"], 0)
    seen = []  # a lenient stopper's on_unknown warns instead of raising
    StopRules(list(rules), LIGHTNING, on_unknown=seen.append).check_monitor(["projector"], 10)
    assert len(seen) == 1 and "projecter" in seen[0]


def test_a_metric_the_monitor_does_not_compute_is_named_with_the_closest_at_the_first_result():
    rules = StopRules.parse("repr/val/enc/RankMe", LIGHTNING, min_value=1.0)
    with pytest.raises(MonitorConfigurationError, match=r"`repr/val/enc/RankMe`.*closest: `repr/val/enc/rankme`"):
        rules.check(result("val", {"enc/rankme": 20.0}))


def test_decisions_follow_the_criteria_and_state_round_trips():
    rules = StopRules.parse({"repr/val/enc/rankme": {"min_value": 10.0}}, LIGHTNING, patience=2)
    assert rules.check(result("train", {"enc/rankme": 1.0})) is None  # other stage: no check
    first = rules.check(result("val", {"enc/rankme": 5.0}))
    assert first is not None and not first.stop and rules.wait_count == 1
    saved = rules.state_dict()
    resumed = StopRules.parse({"repr/val/enc/rankme": {"min_value": 10.0}}, LIGHTNING, patience=2)
    resumed.load_state_dict(saved)
    decision = resumed.check(result("val", {"enc/rankme": 4.0}))
    assert decision.stop and decision.kind == "dimensional" and "below the floor 10" in decision.reason
    assert resumed.identity == "repr:repr/val/enc/rankme"


def test_the_first_stopping_rule_decides():
    rules = StopRules.parse([ssl_guard("enc", warmup=0), "repr/val/enc/rankme"], LIGHTNING, min_value=100.0, patience=1)
    assert isinstance(rules.rules[1][1], KeyGuard)
    decision = rules.check(result("val", {"enc/rankme": 30.0, "enc/normalized_std": 0.17}))
    assert decision.stop and decision.monitor == "repr/val/enc/rankme"  # the preset sees a healthy tap
