"""The SSL guard preset: its rule check by check, and the same rule in Lightning and in the Hugging Face Trainer."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import ToyEncoder, loaders
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor
from torch import nn

from reprmetrics.monitor import MonitorConfigurationError
from reprmetrics.stopping import SSL_GUARD_DEFAULTS, ssl_guard

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")

D = 64


def replay(guard, ranks, spreads, dim=D):
    """Feed one check per (rank, spread) pair; the 0-based check index that stopped, and its decision."""
    for i, (rank, spread) in enumerate(zip(ranks, spreads)):
        decision = guard.check_values(
            {f"{guard.tap}/rankme": rank, f"{guard.tap}/normalized_std": spread, "other/rankme": 1.0}, {guard.tap: dim}
        )
        if decision.stop:
            return i, decision
    return None, None


HEALTHY_SPREAD = 1 / math.sqrt(D)


def test_rank_floor_alone_is_dimensional_and_waits_for_patience():
    guard = ssl_guard("projector", rank_drop=None, spread_drop=None, rank_floor=0.2, patience=3)
    ranks = [40, 30, 12, 12.7, 40, 12, 11, 10, 9]  # 0.2·64 = 12.8: checks 2, 3 low, 4 healthy resets, 5–7 low
    stopped, decision = replay(guard, ranks, [HEALTHY_SPREAD] * len(ranks))
    assert stopped == 7 and decision.kind == "dimensional"
    assert decision.reason.startswith("Dimensional collapse") and "RankMe 10 < 0.2·D = 12.8" in decision.reason
    assert "normalized std 0.125" in decision.reason  # rank and spread side by side


def test_both_floors_are_complete_and_spread_alone_is_in_progress():
    tiny = 0.1 * HEALTHY_SPREAD
    stopped, decision = replay(ssl_guard("p", patience=2), [1.2, 1.1, 1.1], [tiny] * 3)
    assert stopped == 1 and decision.kind == "complete" and decision.reason.startswith("Complete collapse")
    # The user's VICReg case: spread under the complete-collapse line while RankMe still reads 26 of 64.
    stopped, decision = replay(
        ssl_guard("p", patience=2, rank_drop=None, spread_drop=None, spread_floor=0.25), [26, 26, 26], [0.029] * 3
    )
    assert stopped == 1 and decision.kind == "in progress" and "Complete" not in decision.reason
    assert "RankMe 26 of D = 64" in decision.reason and "normalized std 0.029 < 0.25/√D" in decision.reason


def test_trend_counts_from_the_best_after_warmup():
    # Early rank loss during warmup (60 -> 30) is not a fall; later, 30 -> 17 is 43 % below the best 30.
    guard = ssl_guard("p", rank_floor=0.1, rank_drop=0.4, spread_drop=None, warmup=2, patience=2)
    ranks = [60, 30, 30, 28, 24, 17, 16]
    stopped, decision = replay(guard, ranks, [HEALTHY_SPREAD] * len(ranks))
    assert stopped == 6 and decision.kind == "in progress"
    assert "RankMe fell 47% below its best 30" in decision.reason and decision.best == 30 and decision.value == 16
    # Without warmup the first value (60) is the best: the same run stops earlier, at the second low check.
    stopped, _ = replay(
        ssl_guard("p", rank_floor=0.1, rank_drop=0.4, spread_drop=None, warmup=0, patience=2),
        ranks,
        [HEALTHY_SPREAD] * 7,
    )
    assert stopped == 2


def test_trend_mode_all_needs_both_metrics_falling():
    ranks = [50, 50, 50, 20, 20, 20]
    spreads = [0.1] * 6  # spread steady
    rule = dict(rank_floor=0.1, spread_floor=0.25, rank_drop=0.4, spread_drop=0.5, warmup=1, patience=2)
    assert replay(ssl_guard("p", trend_mode="any", **rule), ranks, spreads)[0] == 4
    assert replay(ssl_guard("p", trend_mode="all", **rule), ranks, spreads)[0] is None
    assert replay(ssl_guard("p", trend_mode="all", **rule), ranks, [0.1, 0.1, 0.1, 0.04, 0.04, 0.04])[0] == 4


def test_slow_vicreg_like_collapse_is_caught_where_floors_never_fire():
    # Both fall every epoch, as the user's VICReg without variance/covariance terms did (57 -> 26 of 64).
    ranks = [57.3 - 1.5 * e for e in range(22)]
    spreads = [0.105 - 0.0036 * e for e in range(22)]
    assert min(ranks) > 0.2 * D
    floors_only = ssl_guard("p", rank_floor=0.2, spread_floor=0.25, rank_drop=None, spread_drop=None)
    assert replay(floors_only, ranks, spreads)[0] is None or replay(floors_only, ranks, spreads)[0] >= 20
    settings = dict(rank_drop=0.25, spread_drop=0.35, warmup=3, patience=3)
    stopped, decision = replay(ssl_guard("p", **settings), ranks, spreads)
    # Independently: the first check after warmup that is more than the drop below the best since warmup,
    # + patience - 1.
    w = settings["warmup"]
    first_low = next(
        e
        for e in range(w + 1, 22)
        if ranks[e] < (1 - settings["rank_drop"]) * max(ranks[w:e])
        or spreads[e] < (1 - settings["spread_drop"]) * max(spreads[w:e])
    )
    assert stopped == first_low + settings["patience"] - 1 < 16 and decision.kind == "in progress"


def test_healthy_fluctuation_and_withheld_checks_do_not_stop():
    # The defaults on a healthy run as the collapse zoo saw them: RankMe falls early (here 45 %, as
    # healthy VICReg's), then fluctuates; normalised std moves by a few percent (at most 5 % there).
    guard = ssl_guard("p")
    ranks = [58] + [40, 35, 36, 33, 37, 34, 36, 35] * 3
    spreads = [0.110] + [0.100, 0.097, 0.099, 0.096, 0.100, 0.098, 0.099, 0.097] * 3
    assert replay(guard, ranks, spreads)[0] is None
    # ... and one check with the spread 11 % below its best stops them (patience 1): tight by design.
    assert replay(ssl_guard("p"), [40, 40, 40], [0.1, 0.1, 0.089])[0] == 2
    assert replay(ssl_guard("p", patience=2), [40, 40, 40, 40], [0.1, 0.1, 0.089, 0.1])[0] is None
    before = guard.state_dict()
    assert not guard.check_values({"other/rankme": 1.0}, {"p": D}).stop  # this tap withheld: nothing changes
    assert guard.state_dict() == before


def test_nonfinite_stops_at_once_and_state_round_trips():
    guard = ssl_guard("p", patience=5)
    replay(guard, [50, 40], [0.1, 0.1])
    copy = ssl_guard("p", patience=5)
    copy.load_state_dict(guard.state_dict())
    assert copy.state_dict() == guard.state_dict()
    decision = copy.check_values({"p/rankme": float("nan"), "p/normalized_std": 0.1}, {"p": D})
    assert decision.stop and decision.kind == "divergence" and decision.reason.startswith("Divergence")


def test_settings_are_checked_with_close_names():
    with pytest.raises(MonitorConfigurationError, match="'rank_flor'.*did you mean 'rank_floor'"):
        ssl_guard("p", rank_flor=0.1)
    with pytest.raises(MonitorConfigurationError, match="trend_mode"):
        ssl_guard("p", trend_mode="both")
    with pytest.raises(MonitorConfigurationError, match="tap name"):
        ssl_guard("repr/val/p/rankme")
    assert set(SSL_GUARD_DEFAULTS) == {
        "rank_floor",
        "spread_floor",
        "rank_drop",
        "spread_drop",
        "trend_mode",
        "warmup",
        "patience",
    }


# ---- Lightning ---------------------------------------------------------------------------------------
class _Fade(nn.Module):
    def __init__(self, encoder, keep):
        super().__init__()
        self.encoder = [encoder]  # a list: not registered as a submodule (it is the parent)
        self.keep = keep

    def forward(self, z):
        encoder = self.encoder[0]
        if encoder.training:
            return z
        scale = torch.ones(z.shape[1], device=z.device)
        scale[self.keep :] = 0.75 ** max(0, encoder.current_epoch - encoder.fade_from_epoch + 1)
        return z * scale


class FadingEncoder(ToyEncoder):
    """A healthy ToyEncoder whose validation embeddings lose variance beyond their first ``keep``
    dimensions a little more every epoch (× 0.75 per epoch): a slow dimensional collapse, as the
    monitor sees it (training itself is untouched, so the loss cannot undo it)."""

    def __init__(self, fade_from_epoch=2, keep=3, **kwargs):
        super().__init__(**kwargs)
        self.fade_from_epoch = fade_from_epoch
        self.projector = nn.Sequential(self.projector, _Fade(self, keep))


def fit(tmp_path, model, callbacks, max_epochs=16):
    pl.seed_everything(0)
    t = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    t.fit(model, *loaders())
    return t


def test_for_ssl_stops_a_slow_collapse_and_not_a_healthy_run(tmp_path):
    stop = CollapseEarlyStopping.for_ssl("projector")
    monitor = RepresentationMonitor(["projector"], every_n_train_steps=0, num_views=2, metrics=None)
    t = fit(tmp_path / "fading", FadingEncoder(), [monitor, stop])
    ranks = [v for _, v in monitor.tracker.history["val/projector/rankme"]]
    assert t.current_epoch < 14 and stop.stopping_reason_message.startswith(
        ("Collapse in progress", "Dimensional collapse")
    )
    assert "RankMe" in stop.stopping_reason_message and "normalized std" in stop.stopping_reason_message
    spreads = [v for _, v in monitor.tracker.history["val/projector/normalized_std"]]
    w = SSL_GUARD_DEFAULTS["warmup"]
    fell = 1 - min(ranks[-1] / max(ranks[w:]), spreads[-1] / max(spreads[w:]))
    assert fell > min(
        SSL_GUARD_DEFAULTS["rank_drop"], SSL_GUARD_DEFAULTS["spread_drop"]
    )  # what stopped it, independently

    stop = CollapseEarlyStopping.for_ssl("projector")
    monitor = RepresentationMonitor(["projector"], every_n_train_steps=0, num_views=2)
    t = fit(tmp_path / "healthy", ToyEncoder(), [monitor, stop])
    assert t.current_epoch == 16 and stop.stopping_reason_message is None


def test_for_ssl_without_a_monitor_says_to_add_one(tmp_path):
    with pytest.raises(
        MisconfigurationException,
        match=r"no RepresentationMonitor with prefix 'repr'.*RepresentationMonitor\(\['projector'\]\)",
    ):
        fit(tmp_path, ToyEncoder(), [CollapseEarlyStopping.for_ssl("projector")], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="did you mean 'patience'"):
        CollapseEarlyStopping.for_ssl("projector", patiense=2)


def test_for_ssl_needs_the_spread_metric_it_reads(tmp_path):
    from reprmetrics import RankMe

    monitor = RepresentationMonitor(
        ["projector"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}
    )
    with pytest.raises(MisconfigurationException, match="normalized_std"):
        fit(tmp_path, ToyEncoder(), [monitor, CollapseEarlyStopping.for_ssl("projector")], max_epochs=1)


def test_key_criteria_name_complete_only_when_spread_and_rank_are_both_gone():
    from reprmetrics.stopping import CollapseCriteria, collapse_kind

    line = 0.25 / math.sqrt(D)
    assert (
        collapse_kind("normalized_std", 0.02, 0.02, D, rank=26.0) == "in progress"
    )  # the user's VICReg: rank still 26 of 64
    assert collapse_kind("normalized_std", 0.02, 0.02, D, rank=1.1) == "complete"
    assert collapse_kind("rankme", 10.0, 0.1, D) == "dimensional"  # rank below its floor, spread kept
    assert collapse_kind("rankme", 9.1, 0.012, D) == "complete"  # both gone
    assert collapse_kind("rankme", 1.2, 0.1, D) == "complete"
    criteria = CollapseCriteria("repr/val/p/normalized_std", patience=1, min_value=line)
    stop, reason = criteria.check(0.02, D, 0.02, rank=26.0)
    assert (
        stop
        and reason.startswith("Collapse in progress")
        and "RankMe 26 of D = 64" in reason
        and "normalized std 0.02" in reason
    )
