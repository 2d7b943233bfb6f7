"""The collapse guard is never silently off or silently wrong (issue 10): each case in a real Trainer."""

import glob
import math
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from ddp import run_distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import ConcatViewsEncoder, ConvEncoder, DivergingEncoder, ToyEncoder, loaders
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor
from torch.utils.data import DataLoader, TensorDataset

from reprmetrics import RankMe
from reprmetrics.functional import lidar, rankme
from reprmetrics.monitor import MonitorConfigurationError, RepresentationTracker, Tap, flatten_output

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def fit(tmp_path, model, callbacks, max_epochs=2, logger=False, train=None, val=None, **kwargs):
    t = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )
    default_train, default_val = loaders()
    t.fit(model, train or default_train, val or default_val)
    return t


def rankme_only(taps, **kwargs):
    return RepresentationMonitor(
        taps,
        every_n_train_steps=kwargs.pop("every_n_train_steps", 0),
        default_metrics=False,
        metrics={"rankme": RankMe()},
        **kwargs,
    )


# ---- 1. a misspelt tap ---------------------------------------------------------------------------
def test_misspelt_tap_raises_with_closest_names(tmp_path):
    pl.seed_everything(0)
    with pytest.raises(MisconfigurationException, match=r"'projecter'.*closest submodules: 'projector'") as raised:
        fit(tmp_path, ToyEncoder(), [RepresentationMonitor(["backbone", "projecter"])], num_sanity_val_steps=0)
    assert "output keys seen: 'loss', 'views', 'z'" in str(raised.value)
    # Caught at the first training step, not after an epoch.
    model = ToyEncoder()
    with pytest.raises(MisconfigurationException, match="'zz'.*closest output keys: 'z'"):
        fit(tmp_path, model, [RepresentationMonitor(["zz"])])
    assert model.global_step <= 1


def test_output_key_of_validation_only_is_found(tmp_path):
    class ValOnly(ToyEncoder):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]  # a bare loss: no dict

        def validation_step(self, batch, batch_idx):
            return {"emb": self(batch[0])}

    pl.seed_everything(0)
    t = fit(tmp_path, ValOnly(), [rankme_only(["emb"])], max_epochs=1, num_sanity_val_steps=0)
    assert "repr/val/emb/rankme" in t.callback_metrics


def test_plain_loop_misspelt_tap_raises_at_first_step():
    from lightning_models import ToyEncoder as Net

    net = Net()
    tracker = RepresentationTracker(["projecter"], every_n_train_steps=5)
    tracker.attach(net)
    tracker.start_train_step()
    net(torch.randn(8, 24))
    with pytest.raises(MonitorConfigurationError, match="'projecter'.*'projector'"):
        tracker.end_train_step()
    with pytest.raises(MonitorConfigurationError, match="no submodule 'projecter'.*'projector'"):
        RepresentationTracker([Tap("projecter", source="module")]).attach(net)


# ---- 2. CollapseEarlyStopping on a key the monitor never produces -----------------------------------
@pytest.mark.parametrize("key", ["repr/val/projecter/rankme", "repr/valid/projector/rankme"])
def test_wrong_tap_or_stage_in_stopper_key_raises_at_setup(tmp_path, key):
    with pytest.raises(MisconfigurationException, match="projecter|not a monitor key"):
        fit(tmp_path, ToyEncoder(), [rankme_only(["projector"]), CollapseEarlyStopping(key, min_value=1.0)])


def test_wrong_metric_name_in_stopper_key_raises_listing_keys(tmp_path):
    stop = CollapseEarlyStopping("repr/val/projector/RankMe", min_value=1.0)
    with pytest.raises(RuntimeError, match=r"repr/val/projector/RankMe.*`repr/val/projector/rankme`") as raised:
        fit(tmp_path, ToyEncoder(), [rankme_only(["projector"]), stop])
    assert isinstance(raised.value, MisconfigurationException)
    # strict=False: a warning that says the stopper never acts, and training goes on.
    stop = CollapseEarlyStopping("repr/val/projector/RankMe", min_value=1.0, strict=False)
    with pytest.warns(RuntimeWarning, match="never acts"):
        t = fit(tmp_path, ToyEncoder(), [rankme_only(["projector"]), stop])
    assert t.current_epoch == 2 and stop.stopping_reason_message is None


def test_train_key_without_train_stage_raises(tmp_path):
    with pytest.raises(MisconfigurationException, match="every_n_train_steps=0"):
        fit(
            tmp_path,
            ToyEncoder(),
            [rankme_only(["projector"]), CollapseEarlyStopping("repr/train/projector/rankme", min_value=1.0)],
        )


# ---- 3. a capture that produced nothing -------------------------------------------------------------
def test_capture_that_produced_nothing_warns_each_epoch(tmp_path):
    class NoValKey(ToyEncoder):
        def validation_step(self, batch, batch_idx):
            return {"other": self(batch[0])}

    pl.seed_everything(0)
    with pytest.warns(RuntimeWarning) as record:
        fit(tmp_path, NoValKey(), [rankme_only(["z"], every_n_train_steps=4)], max_epochs=2)
    messages = [str(w.message) for w in record if "captured nothing" in str(w.message)]
    assert len(messages) == 2 and all(
        "'z'" in m and "validation" in m and "validation_step outputs" in m for m in messages
    )
    # Every warning points at the user's code (this file), not at torch or Lightning internals.
    assert {w.filename for w in record if "RepresentationMonitor" in str(w.message)} == {__file__}


def test_module_never_called_in_training_warns_per_epoch(tmp_path):
    class Unused(ToyEncoder):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(4, 4)

    pl.seed_everything(0)
    with pytest.warns(RuntimeWarning) as record:
        fit(tmp_path, Unused(), [rankme_only(["unused"], every_n_train_steps=4)], max_epochs=2)
    messages = [str(w.message) for w in record if "captured nothing" in str(w.message)]
    assert any("training steps of epoch 0" in m for m in messages) and any(
        "training steps of epoch 1" in m for m in messages
    )
    assert sum("validation pass" in m for m in messages) == 2 and all("never called" in m for m in messages)


# ---- 4. divergence ----------------------------------------------------------------------------------
def test_nonfinite_embeddings_stop_at_once_and_checkpoint_survives(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(["projector"], every_n_train_steps=0)
    stop = CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.1, patience=3)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="repr/val/projector/rankme", mode="max")
    with pytest.warns(RuntimeWarning, match="divergence"):
        t = pl.Trainer(
            max_epochs=6,
            callbacks=[monitor, stop, checkpoint],
            logger=False,
            default_root_dir=str(tmp_path),
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        t.fit(DivergingEncoder(nan_from_epoch=1, nan_share=0.375), *loaders())
    history = monitor.tracker.history
    assert history["val/projector/nonfinite_fraction"][0][1] == 0.0
    assert history["val/projector/nonfinite_fraction"][1][1] == pytest.approx(0.375, abs=0.01)
    assert all(
        math.isnan(history[f"val/projector/{m}"][1][1]) for m in ("rankme", "lid", "uniformity", "normalized_std")
    )
    # Two projector calls per validation batch (num_views=1: 512 samples); 24 of every 64 rows are NaN.
    assert history["val/projector/num_samples"][1][1] == 512 - 8 * 24
    assert t.current_epoch == 2  # stopped right after the first diverged epoch, not after `patience`
    assert stop.stopping_reason_message.startswith(
        "Divergence: tap projector produced non-finite embeddings (38% of 512 samples"
    )
    assert checkpoint.best_model_score is not None and math.isfinite(checkpoint.best_model_score.item())


def test_plain_loop_reports_divergence_as_values():
    tracker = RepresentationTracker(["z"], default_metrics=False, metrics={"rankme": RankMe()})
    z = torch.randn(100, 8)
    z[:25] = float("inf")
    tracker.start_eval()
    with pytest.warns(RuntimeWarning, match="divergence"):
        tracker.end_eval_step({"z": z})
        values = tracker.end_eval()
    assert (
        math.isnan(values["z/rankme"])
        and values["z/nonfinite_fraction"].item() == 0.25
        and values["z/num_samples"].item() == 75
    )


# ---- 5. view layout -----------------------------------------------------------------------------------
def test_one_call_per_step_with_views_is_ambiguous_unless_declared(tmp_path):
    pl.seed_everything(0)
    with pytest.raises(MisconfigurationException, match="ambiguous.*view_layout='concat'"):
        fit(tmp_path, ConcatViewsEncoder(), [RepresentationMonitor(["projector"], num_views=2)])
    pl.seed_everything(0)
    model = ConcatViewsEncoder()
    monitor = RepresentationMonitor(["projector"], num_views=2, view_layout="concat", every_n_train_steps=0)
    t = fit(tmp_path, model, [monitor], max_epochs=1)
    with torch.no_grad():
        x = torch.cat([b[0] for b in loaders()[1]])
        views = torch.stack(model._views(x), dim=1)
    assert t.callback_metrics["repr/val/projector/lidar"].item() == pytest.approx(lidar(views).item(), rel=1e-4)
    # A declared layout that the captures contradict raises.
    with pytest.raises(MisconfigurationException, match="'stacked' expects one"):
        fit(tmp_path, ConcatViewsEncoder(), [RepresentationMonitor(["projector"], num_views=2, view_layout="stacked")])


def test_no_views_in_one_batch_of_rows_is_not_read_as_two_views(tmp_path):
    """Before: the halves of a plain batch were silently read as views (LiDAR 15, alignment 1.04)."""

    class OneCall(ToyEncoder):
        def _views(self, x):
            return [self(x), self(x)]

        def validation_step(self, batch, batch_idx):
            return {"emb": self(batch[0])}

    with pytest.raises(MisconfigurationException, match="num_views=1 if its rows are distinct samples"):
        fit(tmp_path, OneCall(), [RepresentationMonitor(["emb"], num_views=2, every_n_train_steps=0)], max_epochs=1)


# ---- 6. ungroupable batches, sample counts, the minimum -------------------------------------------------------
def test_ungroupable_batches_are_counted_and_few_samples_are_not_reported(tmp_path):
    class OneCallInValidation(ToyEncoder):
        def validation_step(self, batch, batch_idx):
            self(batch[0])  # one projector call on 63 rows: not two concatenated views

    pl.seed_everything(0)
    val = DataLoader(TensorDataset(torch.randn(323, 24)), batch_size=63)  # five 63-row batches and one of 8
    monitor = RepresentationMonitor(["projector"], num_views=2, view_layout="concat", every_n_train_steps=0)
    stop = CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.5, patience=1)
    with pytest.warns(RuntimeWarning) as record:
        t = fit(tmp_path, OneCallInValidation(), [monitor, stop], max_epochs=2, val=val)
    messages = [str(w.message) for w in record]
    assert any(
        "only 4 of 159 samples were usable; 155 were in batches that could not be grouped into 2 views" in m
        for m in messages
    )
    assert any("4 usable samples, fewer than min_samples=64" in m for m in messages)
    history = monitor.tracker.history
    assert [v for _, v in history["val/projector/num_samples"]] == [4.0, 4.0]
    assert "val/projector/rankme" not in history and "repr/val/projector/rankme" not in t.callback_metrics
    assert t.callback_metrics["repr/val/projector/num_samples"].item() == 4
    assert stop.values_seen == [] and t.current_epoch == 2  # no false collapse from 4 samples


# ---- 7. feature maps ------------------------------------------------------------------------------------------
def test_feature_map_tap_without_reduce_raises_with_the_fix(tmp_path):
    with pytest.raises(
        MisconfigurationException,
        match=r"4-D tensor of shape \(64, 8, 4, 6\).*reduce=lambda y: y.mean\(\(2, 3\)\).*reduce=lambda y: y\[:, 0\]",
    ):
        fit(tmp_path, ConvEncoder(), [RepresentationMonitor(["features"], every_n_train_steps=1)], max_epochs=1)
    pl.seed_everything(0)
    pooled = Tap("features", reduce=lambda y: y.mean((2, 3)))
    flat = Tap("maps", reduce=flatten_output)  # an output key with an explicit reduce
    model = ConvEncoder()
    t = fit(tmp_path, model, [rankme_only([pooled, flat])], max_epochs=1)
    x = torch.cat([b[0] for b in loaders()[1]])
    with torch.no_grad():
        maps = model.features(x.view(-1, 1, 4, 6))
    assert t.callback_metrics["repr/val/features/rankme"].item() == pytest.approx(
        rankme(maps.mean((2, 3))).item(), rel=1e-4
    )
    assert t.callback_metrics["repr/val/maps/rankme"].item() == pytest.approx(rankme(maps.flatten(1)).item(), rel=1e-4)
    # A 3-D output key without views or reduce raises too.
    with pytest.raises(MisconfigurationException, match="output key 'maps'"):
        fit(tmp_path, ConvEncoder(), [RepresentationMonitor(["maps"], every_n_train_steps=0)], max_epochs=1)


# ---- 8. criteria that do not fit the metric ---------------------------------------------------------------------
def test_criteria_that_do_not_fit_the_metric_are_rejected():
    with pytest.raises(MisconfigurationException, match=r"normalized_std.*1/√D.*min_value"):
        CollapseEarlyStopping("repr/val/projector/normalized_std", min_fraction_of_dim=0.2)
    with pytest.raises(MisconfigurationException, match="lower-is-healthier"):
        CollapseEarlyStopping("repr/val/projector/uniformity", min_value=-1.0)
    with pytest.raises(MisconfigurationException, match="near 1"):
        CollapseEarlyStopping("repr/val/projector/alpha_req", max_relative_drop=0.5)
    CollapseEarlyStopping("repr/val/projector/normalized_std", min_value=0.05)  # the criterion that fits
    CollapseEarlyStopping("repr/val/projector/my_metric", min_fraction_of_dim=0.2)  # a user's own metric: allowed


# ---- smaller things ------------------------------------------------------------------------------------------------
# Each statement runs as the first import of reprmetrics.callbacks in this interpreter: a failed import
# leaves no module behind, so the next statement imports the package afresh.
_IMPORTS_WITHOUT_LIGHTNING = r"""
import sys, traceback
sys.modules['lightning'] = None
sys.modules['lightning.pytorch'] = None
for statement in sys.argv[1:]:
    try:
        exec(statement)
    except BaseException:
        print(statement + '\n' + traceback.format_exc() + '\0')
    else:
        print(statement + '\nimported\0')
    assert 'reprmetrics.callbacks' not in sys.modules
"""


@pytest.mark.slow  # a fresh interpreter
def test_import_callbacks_without_lightning_says_what_to_install():
    # Without Lightning, importing the package or a Lightning callback says what to install; the
    # Hugging Face adapter under it still imports (tests/test_huggingface.py).
    statements = [
        "import reprmetrics.callbacks",
        *(f"from reprmetrics.callbacks import {name}" for name in ("RepresentationMonitor", "CollapseEarlyStopping")),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS_WITHOUT_LIGHTNING, *statements], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    reports = [r.strip() for r in result.stdout.split("\0") if r.strip()]
    assert [r.splitlines()[0] for r in reports] == statements
    for report in reports:
        assert 'pip install "reprmetrics[lightning]"' in report, report
        assert "ModuleNotFoundError" in report, report


def test_scalars_figures_and_histograms_share_one_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(
        tmp_path,
        ToyEncoder(),
        [RepresentationMonitor(["projector"], every_n_train_steps=0)],
        max_epochs=2,
        logger=logger,
    )
    (path,) = glob.glob(f"{logger.log_dir}/events.out.tfevents.*")
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    scalar_steps = [e.step for e in acc.Scalars("repr/val/projector/rankme")]
    assert (
        scalar_steps == [e.step for e in acc.Images("repr/val/projector/spectrum")] == [7, 15]
    )  # Lightning's epoch-end step
    assert scalar_steps == [e.step for e in acc.Histograms("repr/val/projector/singular_values")]


def test_spectrum_figure_is_in_the_core():
    from reprmetrics import AlphaReQ
    from reprmetrics.plotting import spectrum_figure

    metric = AlphaReQ()
    metric.update(torch.randn(400, 32) * torch.arange(1, 33).float().pow(-0.5))
    figure = spectrum_figure(metric.spectrum_fit(), title="t")
    assert "α-ReQ fit" in figure.axes[0].get_legend().get_texts()[1].get_text()


# ---- DDP: cases 2, 4 and 6 on two processes --------------------------------------------------------------------------
def _ddp_case(rank, world_size, case):
    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    train, val = loaders(n_val=256, batch_size=32)
    if case == "wrong_key":
        model, callbacks = (
            ToyEncoder(),
            [rankme_only(["projector"]), CollapseEarlyStopping("repr/val/projector/RankMe", min_value=1.0)],
        )
    elif case == "divergence":
        model = DivergingEncoder(nan_from_epoch=1)
        callbacks = [
            rankme_only(["projector"]),
            CollapseEarlyStopping("repr/val/projector/rankme", min_value=1.0, patience=3),
        ]
    else:  # few samples: 10 validation rows per rank, two projector calls each: 40 samples in all
        val = DataLoader(TensorDataset(torch.randn(20, 24)), batch_size=10)
        model = ToyEncoder()
        callbacks = [
            rankme_only(["projector"]),
            CollapseEarlyStopping("repr/val/projector/rankme", min_value=1e9, patience=1),
        ]
    t = pl.Trainer(
        max_epochs=4,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        num_nodes=1,
    )
    try:
        t.fit(model, train, val)
    except Exception as error:  # noqa: BLE001 - the error itself is the result
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "epoch": t.current_epoch,
        "reason": callbacks[1].stopping_reason_message,
        "history": callbacks[0].tracker.history,
    }


def test_ddp_wrong_key_divergence_and_few_samples_decided_alike_on_both_ranks():
    rank0, rank1 = run_distributed(_ddp_case, "wrong_key")
    assert "`repr/val/projector/rankme`" in rank0["error"] and rank0["error"] == rank1["error"]
    rank0, rank1 = run_distributed(_ddp_case, "divergence")
    assert rank0["epoch"] == rank1["epoch"] == 2 and rank0["reason"] == rank1["reason"]
    assert rank0["reason"].startswith("Divergence: tap projector") and repr(rank0["history"]) == repr(
        rank1["history"]
    )  # NaN-aware
    rank0, rank1 = run_distributed(_ddp_case, "few_samples")
    assert (
        rank0["epoch"] == rank1["epoch"] == 4 and rank0["reason"] is rank1["reason"] is None
    )  # 40 < 64 samples: never checked
    assert [v for _, v in rank0["history"]["val/projector/num_samples"]] == [40.0] * 4 and rank0["history"] == rank1[
        "history"
    ]
