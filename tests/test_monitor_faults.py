"""The tracker never ends the run it watches: teacher copies, compiled models, threads, unsafe checkpoints,
taps silent on one rank, an empty validation shard, true half precision."""

import copy
import os
import pickle
import threading
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _helpers.ddp import run_distributed
from lightning_models import ToyEncoder, loaders
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from reprmetrics import RankMe
from reprmetrics.functional import linear_cka, rankme
from reprmetrics.monitor import MonitorConfigurationError, RepresentationTracker

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.encoder(x)


def rankme_tracker(**kwargs):
    return RepresentationTracker(
        ["encoder"], default_metrics=False, metrics={"rankme": RankMe()}, min_samples=8, **kwargs
    )


# ---- hooks belong to the attached instance ----------------------------------------------------------
def test_a_deep_copied_teacher_captures_nothing():
    student = Net()
    tracker = rankme_tracker(every_n_train_steps=0)
    tracker.attach(student)
    teacher = copy.deepcopy(student)  # the usual EMA teacher, made after attach: it carries the hook
    x = [torch.randn(32, 8) for _ in range(3)]
    tracker.start_eval()
    with torch.no_grad():
        for batch in x:
            student(batch)
            teacher(batch + 5.0)  # would change the value if captured
            tracker.end_eval_step()
    values = tracker.end_eval()
    assert values["encoder/num_samples"].item() == 96
    with torch.no_grad():
        expected = rankme(torch.cat([student.encoder(b) for b in x]))
    assert values["encoder/rankme"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_attached_model_under_torch_compile_still_captures():
    net = Net()
    tracker = rankme_tracker(every_n_train_steps=0)
    tracker.attach(net)
    compiled = torch.compile(net, backend="eager")  # dynamo traces the model; the hook runs eagerly
    tracker.start_eval()
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(32, 8))
            tracker.end_eval_step()
    assert tracker.end_eval()["encoder/num_samples"].item() == 96


def test_captures_from_another_thread_are_rejected_with_a_clear_error():
    net = Net()
    tracker = rankme_tracker(every_n_train_steps=0)
    tracker.attach(net)
    tracker.start_eval()
    worker = threading.Thread(target=lambda: net(torch.randn(8, 8)))  # what nn.DataParallel's replicas do
    with torch.no_grad():
        worker.start()
        worker.join()
    with pytest.raises(MonitorConfigurationError, match="another thread.*DataParallel.*DistributedDataParallel"):
        tracker.end_eval_step()


# ---- reference checkpoints are never unpickled ----------------------------------------------------
class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_a_reference_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    net = Net()
    safe = tmp_path / "weights.pt"
    torch.save(net.state_dict(), safe)
    tracker = rankme_tracker(every_n_train_steps=0, reference=str(safe))
    tracker.attach(net)  # a plain state dict loads
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as f:
        pickle.dump({"state_dict": net.state_dict(), "extra": _Payload()}, f)
    tracker = rankme_tracker(every_n_train_steps=0, reference=str(unsafe))
    with pytest.raises(
        MonitorConfigurationError, match=r"weights_only=True.*never runs pickled code.*torch.save\(model.state_dict\(\)"
    ):
        tracker.attach(net)
    assert not _Payload.ran
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MonitorConfigurationError, match="cannot load the reference checkpoint"):
        rankme_tracker(every_n_train_steps=0, reference=str(garbage)).attach(net)


# ---- DDP: a tap silent on one rank, in the plain tracker ---------------------------------------------
def _silent_tap(rank, world_size, data, val, with_reference):
    torch.manual_seed(0)
    net = Net()
    tracker = RepresentationTracker(
        ["encoder"],
        every_n_train_steps=2,
        train_buffer_size=64,
        min_samples=8,
        reference="initial" if with_reference else None,
    )
    tracker.attach(net)
    for batch in data:
        tracker.start_train_step()
        if rank == 0:  # the tapped module runs on rank 0 only
            with torch.no_grad():
                net(batch)
        tracker.end_train_step()
    tracker.start_eval()
    for batch in val:
        if rank == 0:
            with torch.no_grad():
                net(batch)
        tracker.end_eval_step()
    values = {k: float(v) for k, v in tracker.end_eval().items()}
    return {"history": tracker.history, "val": values}


@pytest.mark.parametrize("with_reference", [False, True])
def test_a_tap_silent_on_one_rank_gives_both_ranks_the_values_of_the_other(with_reference):
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 8, generator=g) for _ in range(6)]
    val = [torch.randn(40, 8, generator=g) for _ in range(3)]
    rank0, rank1 = run_distributed(_silent_tap, data, val, with_reference)
    assert rank0["history"] == rank1["history"] and rank0["val"] == rank1["val"]
    assert rank0["history"]["train/encoder/rankme"]  # training-stage values were computed, together
    # One process on rank 0's data gives the same numbers.
    single = _silent_tap(0, 1, data, val, with_reference)
    assert single["val"].keys() == rank0["val"].keys()
    for key, value in single["val"].items():
        assert rank0["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if with_reference:
        assert rank0["val"]["encoder/cka_to_reference"] == pytest.approx(1.0, abs=1e-6)  # weights never changed


# ---- Lightning DDP: an empty validation shard on one rank, a tap silent on one rank ---------------------
class _Shard(IterableDataset):
    """Rank 0's validation batches; rank 1's shard is empty (an IterableDataset: Lightning runs the loop anyway)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            yield from self.rows.split(32)


class _RankZeroAux(ToyEncoder):
    """ToyEncoder with an ``aux`` head that only rank 0 runs, on both views (a tap silent on rank 1)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.aux = nn.Linear(16, 8)

    def _aux(self, views):
        if self.global_rank == 0:
            return sum(self.aux(v).sum() for v in views)
        return sum(p.sum() for p in self.aux.parameters())  # DDP: every parameter takes part

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["loss"] = out["loss"] + 0.0 * self._aux(out["views"])
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step((batch,), batch_idx)
        self._aux(out["views"])
        return out


def _ddp_empty_shard(rank, world_size, val_rows):
    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    monitor = RepresentationMonitor(
        ["projector", "aux"], num_views=2, every_n_train_steps=4, train_buffer_size=64, max_samples=4096
    )
    stop = CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.4, patience=2)
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
        num_sanity_val_steps=0,
    )
    model = _RankZeroAux(collapse_from_epoch=3)
    t.fit(model, loaders()[0], DataLoader(_Shard(val_rows), batch_size=None))
    return {
        "history": monitor.tracker.history,
        "epoch": t.current_epoch,
        "reason": stop.stopping_reason_message,
        "steps": t.global_step,
    }


def test_lightning_ddp_with_an_empty_validation_shard_and_a_tap_silent_on_one_rank():
    val_rows = torch.randn(128, 24, generator=torch.Generator().manual_seed(3))
    rank0, rank1 = run_distributed(_ddp_empty_shard, val_rows)
    assert repr(rank0["history"]) == repr(rank1["history"])  # every logged value, NaN-aware
    assert rank0["epoch"] == rank1["epoch"] < 8 and rank0["steps"] == rank1["steps"]
    assert rank0["reason"] == rank1["reason"] is not None  # stopped together
    val_samples = [v for _, v in rank0["history"]["val/projector/num_samples"]]
    assert val_samples and all(v == 128 for v in val_samples)  # rank 0's 128 rows, first view (rank 1 had none)
    assert rank0["history"]["val/aux/rankme"] and rank0["history"]["train/aux/rankme"]


# ---- true half precision ------------------------------------------------------------------------------
def test_lightning_true_half_precision_keeps_float64_accumulators(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationMonitor(["projector"], every_n_train_steps=0)
    model = ToyEncoder()
    model.metric = RankMe()  # a metric held by the module is cast with it
    t = pl.Trainer(
        max_epochs=1,
        callbacks=[monitor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        precision="16-true",
    )
    t.fit(model, *loaders())
    assert model.metric.moments.dtype == torch.float64
    values = monitor.tracker.history
    assert values["val/projector/rankme"] and all(
        torch.isfinite(torch.tensor(v)) for _, v in values["val/projector/rankme"]
    )
    # The value equals one computed from the float16 embeddings upcast to float64.
    with torch.no_grad():
        xs = [b[0].half() for b in loaders()[1]]
        z = torch.cat(
            [
                torch.cat([model.projector(model.backbone(x)), model.projector(model.backbone(x.flip(1) * 0.1 + x))])
                for x in xs
            ]
        )
    assert values["val/projector/rankme"][-1][1] == pytest.approx(rankme(z.double()).item(), rel=1e-4)
    assert float(linear_cka(z.double(), z.double())) == pytest.approx(1.0)
