"""Drift from the pretrained representation: cka_to_reference in the monitor, and stopping on it."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import ToyEncoder, loaders
from references_similarity import linear_cka_ref
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor

from reprmetrics import RankMe
from reprmetrics.monitor import MonitorConfigurationError, RepresentationTracker

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def fit(tmp_path, model, callbacks, max_epochs=2):
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


def held_out():
    return torch.cat([b[0] for b in loaders()[1]])


@pytest.mark.parametrize("reference_kind", ["initial", "module", "checkpoint"])
def test_cka_to_reference_equals_linear_cka_against_the_reference_weights(tmp_path, reference_kind):
    pl.seed_everything(0)
    model = ToyEncoder()
    pretrained = copy.deepcopy(model)
    reference = {"initial": "initial", "module": pretrained, "checkpoint": str(tmp_path / "pretrained.pt")}[
        reference_kind
    ]
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    monitor = RepresentationMonitor(
        ["backbone"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}, reference=reference
    )
    t = fit(tmp_path, model, [monitor], max_epochs=2)
    x = held_out()
    with torch.no_grad():  # the validation step calls the backbone on two views: both are samples (num_views=1)
        live = torch.cat([torch.cat([model.backbone(b), model.backbone(b.flip(1) * 0.1 + b)]) for b in x.split(64)])
        ref = torch.cat(
            [torch.cat([pretrained.backbone(b), pretrained.backbone(b.flip(1) * 0.1 + b)]) for b in x.split(64)]
        )
    expected = linear_cka_ref(live.double().numpy(), ref.double().numpy())
    value = t.callback_metrics["repr/val/backbone/cka_to_reference"].item()
    assert value == pytest.approx(expected, rel=1e-5) and 0 < value < 1
    # The reference is frozen: its weights did not train.
    copies = monitor.tracker.capture.reference_modules["backbone"]
    assert all(
        torch.equal(a, b) for a, b in zip(copies.state_dict().values(), pretrained.backbone.state_dict().values())
    )
    assert not any(p.requires_grad for p in copies.parameters())


def test_drift_stops_a_fine_tune_that_forgets(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["backbone"], every_n_train_steps=0, default_metrics=False, metrics={"rankme": RankMe()}, reference="initial"
    )
    stop = CollapseEarlyStopping("repr/val/backbone/cka_to_reference", min_value=0.9, patience=1)
    t = fit(tmp_path, ToyEncoder(collapse_from_epoch=0), [monitor, stop], max_epochs=6)
    assert t.current_epoch < 6
    assert stop.stopping_reason_message.startswith("Representation drift: CKA to the reference backbone fell to")
    with pytest.raises(Exception, match="min_fraction_of_dim fits rank-like"):
        CollapseEarlyStopping("repr/val/backbone/cka_to_reference", min_fraction_of_dim=0.5)


def test_output_taps_take_the_reference_from_a_second_key():
    tracker = RepresentationTracker(
        ["z"], default_metrics=False, metrics={"rankme": RankMe()}, reference="initial", min_samples=8
    )
    z = torch.randn(200, 6, dtype=torch.float64)
    ref = z @ torch.randn(6, 4, dtype=torch.float64) + 0.1 * torch.randn(200, 4, dtype=torch.float64)
    tracker.start_eval()
    for a, b in zip(z.split(50), ref.split(50)):
        tracker.end_eval_step({"z": a, "z_reference": b})
    values = tracker.end_eval()
    assert values["z/cka_to_reference"].item() == pytest.approx(
        linear_cka_ref(z.numpy(), ref.numpy()), rel=1e-6
    )  # the Metric returns float32
    tracker.start_eval()
    with pytest.raises(MonitorConfigurationError, match="'z_reference'"):
        tracker.end_eval_step({"z": z})
