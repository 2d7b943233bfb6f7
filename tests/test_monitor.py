"""The framework-agnostic core of the monitor: taps, view grouping, schedule, metric sets."""

import warnings

import pytest
import torch
from torch import nn

from reprmetrics import AlphaReQ, RankMe
from reprmetrics.functional import rankme
from reprmetrics.monitor import MonitorConfigurationError, RepresentationTracker, Tap, flatten_output, group_views


def test_group_views_layouts():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    expected = torch.stack([a, b], 1)
    assert torch.equal(group_views([a, b], 2, "t"), expected)  # q forward calls: unambiguous
    assert torch.equal(group_views([a, b], 2, "t", "calls"), expected)
    assert torch.equal(group_views([torch.cat([a, b])], 2, "t", "concat"), expected)  # view-major concatenation
    assert torch.equal(group_views([expected], 2, "t"), expected)  # (B, q, D)
    assert torch.equal(group_views([expected], 2, "t", "stacked"), expected)
    assert group_views([a, b], 1, "t").shape == (10, 1, 3)  # no views: every row a sample
    with pytest.raises(MonitorConfigurationError, match="ambiguous.*view_layout='concat'"):
        group_views([torch.cat([a, b])], 2, "t")  # one (2B, D) batch: concatenated views, or no views at all?
    with pytest.raises(MonitorConfigurationError, match="expected 3 forward calls"):
        group_views([a, b], 3, "t")
    with pytest.raises(MonitorConfigurationError, match="differ in shape"):
        group_views([a, torch.randn(4, 3)], 2, "t")
    with pytest.raises(MonitorConfigurationError, match="'calls' expects 2"):
        group_views([torch.cat([a, b])], 2, "t", "calls")
    with pytest.raises(MonitorConfigurationError, match="'concat' expects one"):
        group_views([a, b], 2, "t", "concat")
    with pytest.raises(MonitorConfigurationError, match="'stacked' expects one"):
        group_views([a], 2, "t", "stacked")
    with pytest.raises(ValueError, match="cannot be split into 2 views"):
        group_views([torch.randn(63, 3)], 2, "t", "concat")


def test_flatten_output():
    assert flatten_output((torch.randn(4, 2, 3, 3), "aux")).shape == (4, 18)
    assert flatten_output(torch.randn(4)).shape == (4, 1)
    with pytest.raises(ValueError, match="reduce"):
        flatten_output({"a": 1})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_plain_loop_schedule_and_values():
    torch.manual_seed(0)
    net = Net()
    tracker = RepresentationTracker(
        ["encoder", Tap("encoder.0", reduce=lambda y: y[:, :8])],
        every_n_train_steps=5,
        train_buffer_size=20,
        default_metrics=False,
        metrics={"rankme": RankMe()},
        min_samples=2,
    )
    tracker.attach(net)
    data = [torch.randn(10, 8) for _ in range(10)]
    captured_steps, results = [], {}
    for step, x in enumerate(data):
        if tracker.start_train_step():
            captured_steps.append(step)
        net(x)
        values = tracker.end_train_step()
        if values:
            results[step] = values
    # Steps 0 and 1 capture to fill the 20-sample buffer (batch size unknown before); then the 2 steps
    # before each compute refill it, so even the first value (the baseline of relative criteria) reads
    # a full buffer of the most recent samples.
    assert captured_steps == [0, 1, 3, 4, 8, 9]
    assert sorted(results) == [4, 9]
    with torch.no_grad():  # weights never change here
        for step, (start, stop) in {4: (3, 5), 9: (8, 10)}.items():
            expected = rankme(torch.cat([net.encoder(x) for x in data[start:stop]]))
            assert results[step]["encoder/rankme"].item() == pytest.approx(expected.item(), rel=1e-5)
            assert results[step]["encoder/num_samples"].item() == 20
    assert set(results[9]) == {
        f"{tap}/{name}" for tap in ("encoder", "encoder.0") for name in ("rankme", "num_samples", "nonfinite_fraction")
    }
    assert results[9]["encoder/num_samples"].item() == 20 and results[9]["encoder/nonfinite_fraction"].item() == 0
    assert tracker.num_features == {"encoder": 16, "encoder.0": 8}
    assert [s for s, _ in tracker.history["train/encoder/rankme"]] == [4, 9]
    tracker.detach()
    assert not net.encoder._forward_hooks


def test_capture_is_detached_and_hooks_do_not_touch_gradients():
    net = Net()
    tracker = RepresentationTracker(
        ["encoder"], every_n_train_steps=1, default_metrics=False, metrics={"rankme": RankMe()}, min_samples=2
    )
    tracker.attach(net)
    x = torch.randn(12, 8)
    tracker.start_train_step()
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    tracker.end_train_step()
    net.zero_grad()
    tracker.detach()
    net(x).sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))


def test_output_taps_and_evaluation_streaming():
    tracker = RepresentationTracker(
        ["z"], num_views=2, default_metrics=False, metrics={"rankme": RankMe()}, min_samples=40
    )
    z = torch.randn(40, 6)
    tracker.start_eval()
    for chunk in z.split(10):
        tracker.end_eval_step({"z": [chunk, chunk + 0.01]})
    values = tracker.end_eval()
    assert values["z/rankme"].item() == pytest.approx(rankme(z).item(), rel=1e-5)  # point metrics read view 1


def test_failing_metric_warns_once_and_is_skipped_unless_strict():
    tracker = RepresentationTracker(
        ["z"], default_metrics=False, metrics={"rankme": RankMe(), "alpha": AlphaReQ()}, min_samples=8
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            tracker.start_eval()
            tracker.end_eval_step({"z": torch.randn(8, 6)})  # α-ReQ needs ranks 11..: not computable
            values = tracker.end_eval()
            assert set(values) == {"z/rankme", "z/num_samples", "z/nonfinite_fraction"}
    assert sum("skipping val/z/alpha" in str(w.message) for w in caught) == 1
    strict = RepresentationTracker(
        ["z"], default_metrics=False, metrics={"alpha": AlphaReQ()}, strict=True, min_samples=8
    )
    strict.start_eval()
    strict.end_eval_step({"z": torch.randn(8, 6)})
    with pytest.raises(ValueError, match="AlphaReQ"):
        strict.end_eval()


def test_bad_configuration():
    for kwargs, match in (
        ({"taps": []}, "at least one tap"),
        ({"taps": ["a", "a"]}, "unique"),
        ({"taps": ["a"], "num_views": 0}, "num_views"),
        ({"taps": ["a"], "default_metrics": False}, "no metrics"),
        ({"taps": ["a"], "metrics": {"x": object()}}, "torchmetrics.Metric"),
    ):
        with pytest.raises(ValueError, match=match):
            RepresentationTracker(**kwargs)
    with pytest.raises(ValueError, match="no submodule"):
        RepresentationTracker([Tap("missing", source="module")]).attach(Net())


def test_state_dict_round_trip():
    tracker = RepresentationTracker(
        ["z"],
        every_n_train_steps=2,
        train_buffer_size=32,
        default_metrics=False,
        metrics={"rankme": RankMe()},
        min_samples=16,
    )
    for _ in range(4):
        tracker.start_train_step()
        tracker.end_train_step({"z": torch.randn(16, 5)})
    state = tracker.state_dict()
    fresh = RepresentationTracker(
        ["z"],
        every_n_train_steps=2,
        train_buffer_size=32,
        default_metrics=False,
        metrics={"rankme": RankMe()},
        min_samples=16,
    )
    fresh.load_state_dict(state)
    assert fresh.train_steps == 4 and fresh.history == tracker.history and len(fresh.history["train/z/rankme"]) == 2


@pytest.mark.parametrize("stop_after", [3, 5, 6])  # before, inside and at the end of a capture window
def test_a_resumed_run_gives_the_values_of_the_uninterrupted_run(stop_after):
    net = Net()
    data = [torch.randn(10, 8, generator=torch.Generator().manual_seed(i)) for i in range(16)]

    def tracker():
        t = RepresentationTracker(["encoder"], every_n_train_steps=4, train_buffer_size=30, min_samples=8)
        t.attach(net)
        return t

    def run(t, steps):
        for x in steps:
            t.start_train_step()
            net(x)
            t.end_train_step()

    whole = tracker()
    run(whole, data)
    first = tracker()
    run(first, data[:stop_after])
    state = first.state_dict()
    first.detach()
    resumed = tracker()
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))  # as a checkpoint would
    run(resumed, data[stop_after:])
    assert resumed.history.keys() == whole.history.keys() and whole.history["train/encoder/rankme"]
    for key, values in whole.history.items():
        assert [s for s, _ in resumed.history[key]] == [s for s, _ in values], key
        assert [v for _, v in resumed.history[key]] == pytest.approx([v for _, v in values], rel=1e-6, nan_ok=True), key


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_alpha_req_fit_quality_and_rankme_diagnostics_are_reported():
    import numpy as np

    torch.manual_seed(0)
    z = torch.randn(300, 40, dtype=torch.float64) * torch.arange(1, 41, dtype=torch.float64).pow(-0.6)
    tracker = RepresentationTracker(
        ["z"], default_metrics=False, metrics={"rankme": RankMe(), "alpha_req": AlphaReQ()}, rankme_diagnostics=True
    )
    tracker.start_eval()
    for chunk in z.split(100):
        tracker.end_eval_step({"z": chunk})
    values = tracker.end_eval()
    sigma = np.linalg.svd(z.numpy(), compute_uv=False)
    assert values["z/rankme_top_singular_value"].item() == pytest.approx(sigma[0], rel=1e-5)
    assert values["z/rankme_condition_number"].item() == pytest.approx(sigma[0] / sigma[-1], rel=1e-4)
    # The 1/k-weighted R² of the log-log fit over ranks 11..40, from numpy.
    lam = np.linalg.eigvalsh(np.cov(z.numpy(), rowvar=False, bias=False))[::-1][10:40]
    k = np.arange(11, 41, dtype=np.float64)
    w, x, y = 1 / k, np.log(k), np.log(lam)
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    residual = y - (slope * x + intercept)
    r2 = 1 - np.sum(w * residual**2) / np.sum(w * (y - np.average(y, weights=w)) ** 2)
    assert values["z/alpha_req"].item() == pytest.approx(-slope, rel=1e-5)
    assert values["z/alpha_req_r2"].item() == pytest.approx(r2, rel=1e-5)
    assert {"alpha_req_r2", "rankme_condition_number"} <= set(tracker.metric_names("val")["z"])


def test_metrics_by_name_opt_in_and_unknown_names():
    from reprmetrics.functional import sigreg, twonn_dimension
    from reprmetrics.monitor import available_metrics, default_metrics

    assert {"nesum", "coding_rate", "wasserstein_uniformity", "isoscore"} <= set(default_metrics(64, 1))
    assert not {"sigreg", "twonn", "lidar"} & set(default_metrics(64, 1))
    assert "alpha_req" not in default_metrics(8, 2) and "lidar" in default_metrics(8, 2)
    assert {name for name, spec in available_metrics().items() if not spec.default} == {
        "sigreg",
        "twonn",
        "mle_dimension",
    }
    torch.manual_seed(0)
    z = torch.randn(400, 16, dtype=torch.float64)
    tracker = RepresentationTracker(["z"], default_metrics=False, metrics=["sigreg", "twonn"])
    tracker.start_eval()
    tracker.end_eval_step({"z": z})
    values = tracker.end_eval()
    assert values["z/sigreg"].item() == pytest.approx(sigreg(z).item(), rel=1e-5)
    assert values["z/twonn"].item() == pytest.approx(twonn_dimension(z).item(), rel=1e-5)
    with pytest.raises(MonitorConfigurationError, match="unknown metric 'sigrge'; did you mean 'sigreg'"):
        RepresentationTracker(["z"], metrics=["sigrge"])


def test_the_metric_choice_is_checked_at_construction():
    tracker = RepresentationTracker("z", metrics="sigreg")  # one name as a string
    assert tracker.named_metrics == ["sigreg"] and tracker.extra_metrics == {}
    tracker = RepresentationTracker("z", default_metrics=False, metrics={"rank": RankMe()})
    assert tracker.named_metrics == [] and list(tracker.extra_metrics) == ["rank"]
    for metrics in (None, [], {}):
        with pytest.raises(
            MonitorConfigurationError,
            match=r"^RepresentationTracker: no metrics to compute \(default_metrics=False and no `metrics`\)$",
        ):
            RepresentationTracker("z", default_metrics=False, metrics=metrics)
    with pytest.raises(
        MonitorConfigurationError, match="^Adapter: metric 'rank' must be a torchmetrics.Metric, got function$"
    ):
        RepresentationTracker("z", metrics={"rank": lambda z: z}, owner="Adapter")
    with pytest.raises(MonitorConfigurationError, match="`view_layout` must be one of"):  # checked first
        RepresentationTracker("z", view_layout="bogus", metrics=["nope"])


def test_two_calls_per_step_without_views_hint_at_num_views():
    net = Net()
    tracker = RepresentationTracker(
        ["encoder"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}, min_samples=8
    )
    tracker.attach(net)
    tracker.start_eval()
    x = torch.randn(16, 8)
    with pytest.warns(
        RuntimeWarning, match=r"'encoder' was called 2 times in one step with num_views=1.*pass num_views=2"
    ):
        net(x)
        net(x + 0.1)  # two augmentations of the same samples
        tracker.end_eval_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tap
        net(x)
        net(x + 0.1)
        tracker.end_eval_step()
    assert tracker.end_eval()["encoder/num_samples"].item() == 64


def test_a_training_buffer_smaller_than_min_samples_is_refused_at_construction():
    # Every training-stage value would be withheld; the misconfiguration is known before training starts.
    with pytest.raises(
        MonitorConfigurationError, match=r"train_buffer_size=32 is below min_samples=64.*every_n_train_steps=0"
    ):
        RepresentationTracker(["z"], every_n_train_steps=10, train_buffer_size=32, min_samples=64)
    RepresentationTracker(["z"], every_n_train_steps=0, train_buffer_size=32, min_samples=64)  # no training stage: fine
    RepresentationTracker(["z"], every_n_train_steps=10, train_buffer_size=64, min_samples=64)


def test_a_tap_with_no_close_name_is_told_the_submodules_that_exist():
    net = nn.Sequential(nn.Linear(8, 8))
    tracker = RepresentationTracker(["1"], every_n_train_steps=0)
    tracker.attach(net)
    tracker.start_eval()
    net(torch.randn(4, 8))
    tracker.end_eval_step()
    with pytest.raises(
        MonitorConfigurationError, match=r"tap '1' is neither .* \(submodules: '0'; closest output keys"
    ):
        tracker.end_eval()


def test_first_token_takes_each_sequences_first_vector_from_a_tensor_or_a_tuple():
    from reprmetrics.monitor import first_token

    hidden = torch.randn(4, 7, 5)
    assert torch.equal(first_token(hidden), hidden[:, 0])
    assert torch.equal(first_token((hidden, "attentions")), hidden[:, 0])  # transformers 4 layers return tuples
    with pytest.raises(MonitorConfigurationError, match=r"first_token: expected \(B, T, D\).*\(4, 5\)"):
        first_token(hidden[:, 0])
