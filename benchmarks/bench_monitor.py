"""Overhead of RepresentationMonitor at its default settings on a small SSL model (SimCLR-style MLP)."""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.harness import Case


def _model_cls():
    import lightning.pytorch as pl

    class SmallSimCLR(pl.LightningModule):
        """MLP encoder on 8×8 images (64 inputs), two noisy views, NT-Xent loss."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
            self.projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

        def forward(self, x):
            return self.projector(self.backbone(x))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            z1 = F.normalize(self(x + 0.3 * torch.randn_like(x)), dim=1)
            z2 = F.normalize(self(x + 0.3 * torch.randn_like(x)), dim=1)
            logits = torch.cat([z1, z2]) @ torch.cat([z1, z2]).T / 0.2
            logits.fill_diagonal_(float("-inf"))
            n = len(x)
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
            return F.cross_entropy(logits, targets)

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self(x)
            self(x + 0.1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return SmallSimCLR


def _fit(data: dict, with_monitor: bool) -> float:
    """Seconds per training step of a short fit (validation disabled: training-step cost only)."""
    import lightning.pytorch as pl
    from reprmetrics.callbacks import RepresentationMonitor

    torch.manual_seed(0)
    callbacks = [RepresentationMonitor(["backbone", "projector"], num_views=2)] if with_monitor else []
    trainer = pl.Trainer(
        max_steps=data["steps"],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"]), batch_size=256, shuffle=True, drop_last=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        trainer.fit(_model_cls()(), loader)
        return (time.perf_counter() - t0) / data["steps"]


def _make_input(steps: int) -> dict:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(256 * 20, 64, generator=g), "steps": steps}


_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero")


_CAPTURE_BATCHES = 20


def _capture(data: dict, with_tracker: bool) -> None:
    """20 evaluation batches (2 views of 256 rows through the model), captured by a tracker or not."""
    from reprmetrics.monitor import RepresentationTracker

    model = data["model"]
    tracker = None
    if with_tracker:
        tracker = RepresentationTracker(["backbone", "projector"], num_views=2)
        tracker.attach(model)
        tracker.start_eval()
    with torch.no_grad():
        for x in data["batches"]:
            model(x)
            model(x + 0.1)
            if tracker is not None:
                tracker.end_eval_step()
    if tracker is not None:
        tracker.detach()


def _make_capture_input() -> dict:
    from reprmetrics.monitor import RepresentationTracker

    torch.manual_seed(0)
    model = _model_cls()().eval()
    batches = torch.randn(256 * _CAPTURE_BATCHES, 64, generator=torch.Generator().manual_seed(0)).split(256)
    tracker = RepresentationTracker(["backbone", "projector"], num_views=2)
    tracker.attach(model)
    tracker.start_eval()
    syncs = _syncs_per_captured_batch(tracker, model, batches[:4])
    tracker.detach()
    return {"model": model, "batches": batches, "syncs_per_batch": syncs}


def _syncs_per_captured_batch(tracker, model, batches) -> float:
    """Host reads of tensor values (Tensor methods wrapped) per captured batch."""
    counted = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(original):
        def read(self, *args, **kwargs):
            counted["n"] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                model(x + 0.1)
                tracker.end_eval_step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counted["n"] / len(batches)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []  # the overhead goal is stated for CPU (benchmarks.gpu_proof measures a GPU step)
    capture_input: dict = {}

    def make_capture_input() -> dict:
        capture_input.update(_make_capture_input())
        return capture_input

    steps = 100 if quick else 1000  # the default cadence computes every 200 steps
    return [
        Case(
            name="monitor overhead (train step, defaults)",
            ours=lambda d: _fit(d, with_monitor=True),
            baseline=lambda d: _fit(d, with_monitor=False),
            baseline_name="same training without the monitor",
            make_input=lambda: _make_input(steps),
            input_desc=f"SimCLR MLP on 64-D inputs, batch 256, {steps} steps, taps backbone+projector, 2 views",
            check=lambda ours, base: f"overhead {100 * (ours / base - 1):+.1f}% per step (medians)",
            check_medians=True,
            repeats=8,
            notes="seconds per training step, validation off; the ratio is the per-step overhead",
        ),
        Case(
            name="monitor capture per batch (evaluation)",
            ours=lambda d: _capture(d, with_tracker=True),
            baseline=lambda d: _capture(d, with_tracker=False),
            baseline_name="the same forward passes without a tracker",
            make_input=make_capture_input,
            input_desc=(
                f"SimCLR MLP, 2 views of 256 rows per batch, {_CAPTURE_BATCHES} batches, taps backbone+projector,"
                " default metric set"
            ),
            check=lambda ours, base: (
                f"capture adds {1e3 * (ours - base) / _CAPTURE_BATCHES:.2f} ms per batch"
                f" ({100 * (ours / base - 1):+.0f}% of the forward passes); host syncs per captured batch:"
                f" {capture_input.get('syncs_per_batch', float('nan')):.0f} (goal ≤ 1)"
            ),
            check_medians=True,
            repeats=5,
            notes="one finite mask, one conversion, one update per shared statistic per batch",
        ),
    ]
