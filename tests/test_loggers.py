"""Values and figures in every logger, read back from the real backends (offline: W&B in offline mode, MLflow's
file store, TensorBoard and CSV files), in real lightning.Trainer and transformers.Trainer runs."""

import csv
import glob
import json
import os
import time
import warnings

import pytest

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("spectrum", "singular_values", "lid_per_sample")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow on a local file store, both under tmp_path; nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "reprmetrics-tests")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    mlflow.set_tracking_uri(
        os.environ["MLFLOW_TRACKING_URI"]
    )  # process-wide once set: a test before may have set its own
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()
    if mlflow.active_run() is not None:
        mlflow.end_run()


def wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its .wandb file (LevelDB-log framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    # W&B's service process may still be writing after finish() returns on a loaded machine: read once the
    # file has stopped growing.
    size, deadline = -1, time.monotonic() + 10
    while size != os.path.getsize(path) and time.monotonic() < deadline:
        size = os.path.getsize(path)
        time.sleep(0.3)
    data = open(path, "rb").read()
    rows, pending, position, block = [], b"", 7, 32768  # a 7-byte file header, then 32 KiB blocks of records
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if position + 7 + length > len(data):
            break  # a record still being written: the rows before it are complete
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # an image's or histogram's fields come as nested keys
                    *parents, leaf = list(item.nested_key) or [item.key]
                    node = row
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[leaf] = json.loads(item.value_json)
                rows.append(row)
    return rows


def series(rows, key, step_key):
    return [(row[step_key], row[key]) for row in rows if key in row]


def same_series(got, expected):
    """``[(step, value)]`` alike: the same steps, the same values (to float32 rounding)."""
    return [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx(
        [v for _, v in expected], rel=1e-6
    )


def mlflow_run():
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


# ---- Lightning ------------------------------------------------------------------------------------------------
def test_lightning_figures_reach_wandb_mlflow_and_files_beside_csv_logs(offline):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
    from lightning_models import ToyEncoder, loaders
    from reprmetrics.callbacks import RepresentationMonitor

    pl.seed_everything(0)
    loggers = [
        WandbLogger(save_dir=str(offline), offline=True),
        MLFlowLogger(experiment_name="lightning", tracking_uri=os.environ["MLFLOW_TRACKING_URI"]),
        CSVLogger(str(offline / "csv")),
    ]
    trainer = pl.Trainer(
        max_epochs=2,
        logger=loggers,
        callbacks=[RepresentationMonitor(["projector"], every_n_train_steps=0)],
        default_root_dir=str(offline),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(ToyEncoder(), *loaders())
    wandb_logger, mlflow_logger, csv_logger = loggers
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("repr/val/projector/rankme")]
    assert len(steps) == 2  # one validation epoch each

    # W&B: the figure as an image and the histograms as histograms, on the scalars' step axis.
    run_dir = os.path.dirname(wandb_logger.experiment.dir)
    wandb_logger.experiment.finish()
    rows = wandb_history(run_dir)
    assert [s for s, _ in series(rows, "repr/val/projector/rankme", "trainer/global_step")] == steps
    images = series(rows, "repr/val/projector/spectrum", "trainer/global_step")
    assert [s for s, _ in images] == steps and all(
        v["_type"] == "image-file" and v["format"] == "png" for _, v in images
    )
    for name in ("singular_values", "lid_per_sample"):
        histograms = series(rows, f"repr/val/projector/{name}", "trainer/global_step")
        assert [s for s, _ in histograms] == steps and all(
            v["_type"] == "histogram" and sum(v["values"]) > 0 for _, v in histograms
        )

    # MLflow: PNG artifacts per step (histograms drawn as bar charts), beside the scalars.
    client = mlflow_logger.experiment
    assert [m.step for m in client.get_metric_history(mlflow_logger.run_id, "repr/val/projector/rankme")] == steps
    for name in FIGURES:
        paths = {a.path for a in client.list_artifacts(mlflow_logger.run_id, f"repr/val/projector/{name}")}
        assert paths == {f"repr/val/projector/{name}/step_{s}.png" for s in steps}
    local = client.download_artifacts(
        mlflow_logger.run_id, f"repr/val/projector/spectrum/step_{steps[0]}.png", str(offline / "download")
    )
    assert open(local, "rb").read(8) == PNG

    # CSV: PNG files beside the logs.
    for name in FIGURES:
        for step in steps:
            with open(
                os.path.join(csv_logger.log_dir, "figures", "repr", "val", "projector", name, f"step_{step}.png"), "rb"
            ) as f:
                assert f.read(8) == PNG


def test_lightning_without_a_logger_logs_quietly(tmp_path):
    import lightning.pytorch as pl
    from lightning_models import ToyEncoder, loaders
    from reprmetrics.callbacks import RepresentationMonitor

    pl.seed_everything(0)
    monitor = RepresentationMonitor(["projector", "z"], every_n_train_steps=4, train_buffer_size=128)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[monitor],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyEncoder(), *loaders())
    assert not [str(w.message) for w in caught if "no logger configured" in str(w.message)]
    assert "repr/val/projector/rankme" in trainer.callback_metrics  # still there for EarlyStopping and checkpoints
    validated = trainer.validate(trainer.lightning_module, loaders()[1], verbose=False)[
        0
    ]  # and in what validate() returns
    assert "repr/val/projector/rankme" in validated and "repr/val/z/num_samples" in validated
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)  # no logger: nothing drawn


# ---- Hugging Face Trainer ---------------------------------------------------------------------------------------
@pytest.fixture
def hf():
    pytest.importorskip("transformers")
    from test_huggingface import Encoder, Points, training_args

    return Encoder, Points, training_args


def test_hugging_face_values_figures_and_stop_reason_reach_wandb_and_mlflow(offline, hf):
    from reprmetrics.callbacks.huggingface import RepresentationCallback
    from transformers import Trainer

    Encoder, Points, training_args = hf
    callback = RepresentationCallback(
        ["encoder"],
        every_n_train_steps=4,
        train_buffer_size=128,
        stop_on="repr/eval/encoder/rankme",
        min_value=1e3,
        patience=2,
    )
    args = training_args(offline, max_steps=20, eval_strategy="steps", eval_steps=5, report_to=["wandb", "mlflow"])
    trainer = Trainer(
        model=Encoder(),
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    trainer.train()
    history = trainer.state.log_history
    evals = [(e["step"], e["eval_repr/encoder/rankme"]) for e in history if "eval_repr/encoder/rankme" in e]
    trains = [(e["step"], e["repr/encoder/rankme"]) for e in history if "repr/encoder/rankme" in e]
    assert [s for s, _ in evals] == [5, 10] and [s for s, _ in trains] == [4, 8]  # stopped at the 2nd evaluation
    reason = callback.stopping_reason
    assert reason.startswith("Dimensional collapse: eval_repr/encoder/rankme") and trainer.state.global_step == 10

    # W&B: what its integration would have logged (eval/..., train/... on train/global_step), and the figures.
    run_dir = os.path.dirname(wandb.run.dir)
    wandb.finish()
    rows = wandb_history(run_dir)
    assert same_series(series(rows, "eval/repr/encoder/rankme", "train/global_step"), evals)
    assert same_series(series(rows, "train/repr/encoder/rankme", "train/global_step"), trains)
    assert series(rows, "eval/repr/stop_reason", "train/global_step") == [(10, reason)]
    assert [(s, v["_type"]) for s, v in series(rows, "eval/repr/encoder/spectrum", "train/global_step")] == [
        (5, "image-file"),
        (10, "image-file"),
    ]
    assert [(s, v["_type"]) for s, v in series(rows, "eval/repr/encoder/lid_per_sample", "train/global_step")] == [
        (5, "histogram"),
        (10, "histogram"),
    ]

    # MLflow: the names as logged, at the Trainer's steps; figures as PNG artifacts; the reason as a tag.
    client, run = mlflow_run()
    assert same_series(
        [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_repr/encoder/rankme")], evals
    )
    assert same_series(
        [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "repr/encoder/rankme")], trains
    )
    for name in FIGURES:
        paths = {a.path for a in client.list_artifacts(run.info.run_id, f"eval_repr/encoder/{name}")}
        assert paths == {f"eval_repr/encoder/{name}/step_{s}.png" for s in (5, 10)}
    assert run.data.tags["eval_repr/stop_reason"] == reason[:5000]


def test_hugging_face_without_image_integrations_writes_png_files(tmp_path, hf, recwarn):
    from reprmetrics.callbacks.huggingface import RepresentationCallback
    from transformers import Trainer

    Encoder, Points, training_args = hf
    callback = RepresentationCallback(
        ["encoder", "embeddings"], every_n_train_steps=4, train_buffer_size=256, figures_every_n_evals=2
    )
    args = training_args(tmp_path, max_steps=24, eval_strategy="steps", eval_steps=6)  # report_to="none"
    trainer = Trainer(
        model=Encoder(),
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    trainer.train()
    figures = tmp_path / "out" / "figures" / "eval_repr"
    for tap in ("encoder", "embeddings"):
        for name in FIGURES:
            assert set(os.listdir(figures / tap / name)) == {
                "step_6.png",
                "step_18.png",
            }  # evaluations 1 and 3 of 4: figures_every_n_evals=2
            assert (figures / tap / name / "step_6.png").read_bytes()[:8] == PNG

    # The first training-stage value waits for a full buffer (4 steps of 64), and reads all of it; a normal
    # run warns about no sample count.
    first = next(e for e in trainer.state.log_history if "repr/encoder/num_samples" in e)
    assert first["step"] == 4 and first["repr/encoder/num_samples"] == 256 and "repr/encoder/rankme" in first
    assert all(
        e["repr/encoder/num_samples"] == 256 for e in trainer.state.log_history if "repr/encoder/num_samples" in e
    )
    assert not [str(w.message) for w in recwarn if "min_samples" in str(w.message)]
