"""RepresentationMonitor and CollapseEarlyStopping in real lightning.Trainer runs on CPU."""

import glob
import warnings

import lightning.pytorch as pl
import pytest
import torch
from ddp import run_distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_models import ToyEncoder, loaders
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor

from reprmetrics import RankMe
from reprmetrics.functional import rankme

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def trainer(tmp_path, callbacks, max_epochs=3, logger=None, **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def event_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


def test_tensorboard_gets_scalars_spectrum_figure_and_histograms(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(["projector", "views"], num_views=2, every_n_train_steps=4, train_buffer_size=128)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer(tmp_path, [monitor], max_epochs=2, logger=logger).fit(ToyEncoder(), *loaders())
    tags = event_tags(logger.log_dir)
    for stage in ("train", "val"):
        for tap in ("projector", "views"):
            for metric in ("rankme", "alpha_req", "normalized_std", "uniformity", "lid", "lidar", "alignment"):
                assert f"repr/{stage}/{tap}/{metric}" in tags["scalars"], (stage, tap, metric)
    assert "repr/val/projector/spectrum" in tags["images"]
    assert {"repr/val/projector/singular_values", "repr/val/projector/lid_per_sample"} <= set(tags["histograms"])


def test_hook_taps_and_output_taps_see_the_same_embeddings(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["projector", "z"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}
    )
    model = ToyEncoder()
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(model, *loaders())
    logged = t.callback_metrics
    # num_views=1: the hook sees both forward calls of a step (2 × 64 rows), the output tap one view.
    _, val_loader = loaders()
    with torch.no_grad():
        x = torch.cat([b[0] for b in val_loader])
        both = torch.cat([torch.cat([model(b[0]), model(b[0].flip(1) * 0.1 + b[0])]) for b in val_loader])
        assert logged["repr/val/z/rankme"].item() == pytest.approx(rankme(model(x)).item(), rel=1e-4)
        assert logged["repr/val/projector/rankme"].item() == pytest.approx(rankme(both).item(), rel=1e-4)


def test_progress_bar_and_other_loggers(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["z"], every_n_train_steps=4, train_buffer_size=128, default_metrics=False, metrics={"rankme": RankMe()}
    )
    csv = CSVLogger(str(tmp_path))
    t = trainer(tmp_path, [monitor], max_epochs=1, logger=csv)
    t.fit(ToyEncoder(), *loaders())
    assert "repr/val/z/rankme" in t.progress_bar_metrics
    header = open(f"{csv.log_dir}/metrics.csv").readline().strip().split(",")
    assert {"repr/train/z/rankme", "repr/val/z/rankme"} <= set(header)
    t = trainer(tmp_path, [RepresentationMonitor(["z"], every_n_train_steps=4)], max_epochs=1, logger=False)
    t.fit(ToyEncoder(), *loaders())
    assert "repr/val/z/rankme" in t.callback_metrics


def final_weights(tmp_path, callbacks):
    pl.seed_everything(123)
    model = ToyEncoder()
    trainer(tmp_path, callbacks, max_epochs=2).fit(model, *loaders())
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_monitoring_does_not_change_training(tmp_path):
    without = final_weights(tmp_path / "a", [])
    with_monitor = final_weights(
        tmp_path / "b", [RepresentationMonitor(["projector", "backbone", "views"], num_views=2, every_n_train_steps=2)]
    )
    assert without.keys() == with_monitor.keys()
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)


def collapse_run(tmp_path, collapse_from_epoch, patience=2):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["projector"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}
    )
    stop = CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.25, patience=patience)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="repr/val/projector/rankme", mode="max")
    t = trainer(tmp_path, [monitor, stop, checkpoint], max_epochs=10)
    t.fit(ToyEncoder(collapse_from_epoch=collapse_from_epoch), *loaders())
    return t, monitor, stop, checkpoint


def test_collapse_is_stopped_within_patience_and_healthy_run_is_not(tmp_path):
    patience = 2
    t, monitor, stop, checkpoint = collapse_run(tmp_path / "collapse", collapse_from_epoch=3, patience=patience)
    values = [v for _, v in monitor.tracker.history["val/projector/rankme"]]
    first_collapsed = next(i for i, v in enumerate(values) if v < 0.25 * 16)
    assert len(values) - 1 == first_collapsed + patience - 1  # the check that stopped it
    assert t.current_epoch < 9 and stop.stopping_reason_message.startswith(
        ("Dimensional collapse", "Complete collapse")
    )
    assert "repr/val/projector/rankme" in stop.stopping_reason_message
    # The best checkpoint is from before the collapse.
    assert checkpoint.best_model_score.item() == pytest.approx(max(values), rel=1e-5)
    assert max(values) > 0.5 * 16

    t, monitor, stop, _ = collapse_run(tmp_path / "healthy", collapse_from_epoch=None, patience=patience)
    assert t.current_epoch == 10 and stop.stopping_reason_message is None
    assert min(v for _, v in monitor.tracker.history["val/projector/rankme"]) > 0.5 * 16


def test_fine_tune_drop_from_a_given_baseline(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["projector"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}
    )
    stop = CollapseEarlyStopping("repr/val/projector/rankme", max_relative_drop=0.3, baseline=12.0, patience=1)
    t = trainer(tmp_path, [monitor, stop], max_epochs=10)
    t.fit(ToyEncoder(collapse_from_epoch=0), *loaders())
    assert t.current_epoch < 10
    assert "below the baseline 12" in stop.stopping_reason_message


def test_train_stage_key_is_checked_each_time_it_is_computed(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["z"], every_n_train_steps=2, train_buffer_size=64, default_metrics=False, metrics={"rankme": RankMe()}
    )
    stop = CollapseEarlyStopping("repr/train/z/rankme", min_value=1e9, patience=3)  # every check "collapses"
    t = trainer(tmp_path, [stop, monitor], max_epochs=5)  # stop listed first: must still see values
    t.fit(ToyEncoder(), *loaders())
    # Checks after steps 2, 4 and 6; the third collapsing check stops training right there.
    assert len(stop.values_seen) == 3 and t.global_step == 6


def test_misconfiguration_is_raised_early():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="at least one of"):
        CollapseEarlyStopping("repr/val/x/rankme")
    with pytest.raises(MisconfigurationException, match="max_relative_drop"):
        CollapseEarlyStopping("repr/val/x/rankme", max_relative_drop=1.5)
    with pytest.raises(MisconfigurationException, match="num_views"):
        RepresentationMonitor(["x"], num_views=0)


def test_resume_from_checkpoint_keeps_history(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(["z"], every_n_train_steps=4, default_metrics=False, metrics={"rankme": RankMe()})
    stop = CollapseEarlyStopping("repr/val/z/rankme", min_value=0.5)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, [monitor, stop, checkpoint], max_epochs=2).fit(ToyEncoder(), *loaders())
    before = {k: list(v) for k, v in monitor.tracker.history.items()}
    steps_before = monitor.tracker.train_steps

    resumed_monitor = RepresentationMonitor(
        ["z"], every_n_train_steps=4, default_metrics=False, metrics={"rankme": RankMe()}
    )
    resumed_stop = CollapseEarlyStopping("repr/val/z/rankme", min_value=0.5)
    t = trainer(tmp_path, [resumed_monitor, resumed_stop], max_epochs=3)
    t.fit(ToyEncoder(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = resumed_monitor.tracker.history
    assert all(after[k][: len(v)] == v for k, v in before.items())
    assert len(after["val/z/rankme"]) == len(before["val/z/rankme"]) + 1
    assert resumed_monitor.tracker.train_steps == steps_before + 8
    assert resumed_stop.values_seen[:2] == stop.values_seen and len(resumed_stop.values_seen) == 3


def test_stopper_state_saved_by_earlier_versions_still_loads():
    # Earlier versions saved the rule's state under "guard" (a monitor key) and "criteria" (any other key).
    for monitor, saved in (("repr/val/z/rankme", "guard"), ("val_rank", "criteria")):
        stop = CollapseEarlyStopping(monitor, min_value=0.5, patience=3)
        old = {"wait_count": 2, "stopped_epoch": 0, "best_score": torch.tensor(7.0), "patience": 3}
        stop.load_state_dict({**old, saved: {"baseline": 7.0, "values_seen": [7.0, 0.2], "wait_count": 2, "best": 7.0}})
        assert stop.values_seen == [7.0, 0.2] and stop.baseline == 7.0 and stop.criteria.wait_count == 2
        fresh = CollapseEarlyStopping(monitor, min_value=0.5, patience=3)
        fresh.load_state_dict(stop.state_dict())  # and today's format round-trips
        assert fresh.values_seen == [7.0, 0.2] and fresh.criteria.wait_count == 2


def _ddp_fit_and_validate(rank, world_size, collapse_from_epoch):
    import warnings

    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    monitor = RepresentationMonitor(["projector", "views"], num_views=2, every_n_train_steps=0, max_samples=4096)
    stop = CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.25, patience=2)
    t = pl.Trainer(
        max_epochs=8,
        callbacks=[monitor, stop],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        num_nodes=1,
    )
    model = ToyEncoder(collapse_from_epoch=collapse_from_epoch)
    t.fit(model, *loaders(n_val=256, batch_size=32))
    validated = t.validate(model, loaders(n_val=256, batch_size=32)[1], verbose=False)[0]
    return {
        "history": monitor.tracker.history,
        "validated": {k: float(v) for k, v in validated.items()},
        "epoch": t.current_epoch,
        "reason": stop.stopping_reason_message,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.slow  # a Lightning DDP fit on both ranks of the pool
def test_ddp_ranks_log_identical_values_equal_to_one_process_and_stop_together(tmp_path):
    rank0, rank1 = run_distributed(_ddp_fit_and_validate, 3)
    assert rank0["history"] == rank1["history"]
    assert (
        rank0["epoch"] == rank1["epoch"] < 8 and rank0["reason"] == rank1["reason"] is not None
    )  # stopped early, together

    # One process validating the same weights on the same 256 samples gives the same values.
    pl.seed_everything(0)
    model = ToyEncoder()
    model.load_state_dict(rank0["weights"])
    monitor = RepresentationMonitor(["projector", "views"], num_views=2, every_n_train_steps=0, max_samples=4096)
    single = trainer(tmp_path, [monitor], max_epochs=1).validate(
        model, loaders(n_val=256, batch_size=32)[1], verbose=False
    )[0]
    assert set(single) == set(rank0["validated"]) and len(single) >= 14
    for key, value in single.items():
        assert rank0["validated"][key] == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
