"""Where figures (and, for the Hugging Face Trainer, values) go besides the framework's own logging.

Per tap and evaluation: the covariance spectrum with the α-ReQ fit (a figure), and histograms of the
singular values and of the per-sample LID. Each backend takes them its own way:

- TensorBoard: ``add_figure`` and ``add_histogram``;
- Weights & Biases: ``wandb.Image`` and ``wandb.Histogram``, on the run's step axis;
- MLflow: PNG artifacts ``{key}/step_{step}.png``, histograms drawn as bar charts (MLflow has no
  histogram type);
- anything else (a CSVLogger, a Trainer without such an integration): PNG files
  ``{directory}/figures/{key}/step_{step}.png``, histograms drawn as bar charts.

Nothing here imports Lightning or transformers at module level: both adapters use it.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from reprmetrics._warnings import warn
from reprmetrics.plotting import spectrum_figure
from reprmetrics.results import TrackerResult

__all__ = ["TrainerBackends", "drawable", "log_figures", "write_figures"]

HISTOGRAMS = {"singular_values": "singular value", "lid_per_sample": "local intrinsic dimension (per sample)"}
_warned_loggers: set[str] = set()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _close(figure: Any) -> None:
    if figure is not None:
        _pyplot().close(figure)


def histogram_figure(values: Any, title: str, xlabel: str) -> Any:
    """A bar chart of ``values`` for backends without a histogram type (None without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    ax.hist(values.double().numpy(), bins=30)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    figure.tight_layout()
    return figure


# ---- sinks: one backend each ------------------------------------------------------------------------
class TensorBoardSink:
    def __init__(self, writer: Any, rename: Callable[[str], str] = str) -> None:
        self.writer, self.rename = writer, rename

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(self.rename(key), value, step)

    def text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(self.rename(key), text, step)

    def figure(self, key: str, figure: Any, step: int) -> None:
        self.writer.add_figure(self.rename(key), figure, step, close=False)

    def histogram(self, key: str, values: Any, step: int) -> None:
        self.writer.add_histogram(self.rename(key), values, step)


class WandbSink:
    """``log(values, step)`` puts values on the run's step axis (the logger's or the Trainer's)."""

    def __init__(self, log: Callable[[dict[str, Any], int], None], rename: Callable[[str], str] = str) -> None:
        self.log, self.rename = log, rename

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.log({self.rename(k): v for k, v in values.items()}, step)

    def text(self, key: str, text: str, step: int) -> None:
        self.log({self.rename(key): text}, step)

    def figure(self, key: str, figure: Any, step: int) -> None:
        import wandb

        self.log({self.rename(key): wandb.Image(figure)}, step)

    def histogram(self, key: str, values: Any, step: int) -> None:
        import wandb

        self.log({self.rename(key): wandb.Histogram(values.numpy())}, step)


class MLflowSink:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def text(self, key: str, text: str, step: int) -> None:
        self.client.set_tag(self.run_id, _mlflow_key(key), text[:5000])  # MLflow keeps no text history: a tag

    def figure(self, key: str, figure: Any, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{key}/step_{step}.png")

    def histogram(self, key: str, values: Any, step: int) -> None:
        figure = histogram_figure(values, key, HISTOGRAMS[key.rsplit("/", 1)[-1]])
        if figure is not None:
            self.figure(key, figure, step)
            _close(figure)


class FilesSink:
    """PNG files under ``{directory}/figures``; values stay in the logs the framework already writes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def text(self, key: str, text: str, step: int) -> None:
        pass

    def figure(self, key: str, figure: Any, step: int) -> None:
        path = os.path.join(self.directory, "figures", *key.split("/"), f"step_{step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        figure.savefig(path)

    def histogram(self, key: str, values: Any, step: int) -> None:
        figure = histogram_figure(values, key, HISTOGRAMS[key.rsplit("/", 1)[-1]])
        if figure is not None:
            self.figure(key, figure, step)
            _close(figure)


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)  # what transformers' MLflowCallback does to keys


# ---- what to draw ------------------------------------------------------------------------------------
def drawable(result: TrackerResult | None, min_samples: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(tap, artifacts)`` of an evaluation result worth drawing: finite, and from enough samples
    (the same decision on every rank: the counts are synced)."""
    if result is None or result.stage != "val":
        return
    for tap, artifacts in result.artifacts.items():
        report = result.reports.get(tap)
        if report is not None and not report.nonfinite and report.used >= min_samples:
            yield tap, artifacts


def write_figures(sinks: Iterable[Any], base: str, tap: str, artifacts: Mapping[str, Any], step: int) -> None:
    """Write one tap's figure and histograms under ``base`` to each sink."""
    spectrum = artifacts.get("spectrum")
    figure = (
        None if spectrum is None else spectrum_figure(spectrum, title=f"{tap}: covariance spectrum", missing_ok=True)
    )
    histograms = {name: artifacts[name].detach().float().cpu() for name in HISTOGRAMS if name in artifacts}
    try:
        for sink in sinks:
            if figure is not None:
                sink.figure(f"{base}/spectrum", figure, step)
            for name, values in histograms.items():
                sink.histogram(f"{base}/{name}", values, step)
    finally:
        _close(figure)


def log_figures(
    loggers: Iterable[Any],
    base: str,
    tap: str,
    artifacts: Mapping[str, Any],
    step: int,
    owner: str = "RepresentationMonitor",
) -> None:
    """Write one tap's figures (``artifacts`` of a tracker result) under ``base`` to each Lightning logger."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    sinks: list[Any] = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger.experiment))
        elif isinstance(logger, WandbLogger):
            sinks.append(WandbSink(logger.log_metrics))  # on the logger's "trainer/global_step" axis
        elif isinstance(logger, MLFlowLogger):
            sinks.append(MLflowSink(logger.experiment, logger.run_id))
        elif directory := getattr(logger, "log_dir", None) or logger.save_dir:
            sinks.append(FilesSink(directory))
        elif type(logger).__name__ not in _warned_loggers:
            _warned_loggers.add(type(logger).__name__)
            warn(
                f"{owner}: {type(logger).__name__} takes no images and has no log_dir or save_dir; figures are not"
                " written for it"
            )
    write_figures(sinks, base, tap, artifacts, step)


# ---- the Hugging Face Trainer's integrations ------------------------------------------------------------
def _integration_key(key: str) -> str:
    """The name transformers' TensorBoard and W&B integrations give a logged key (``rewrite_logs``)."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}"


class TrainerBackends:
    """The ``report_to`` integrations of a Hugging Face Trainer, written to directly.

    The Trainer runs its integrations before any user callback, so a value a callback adds to the
    logs never reaches them; this writes to their backends instead, under the names each integration
    gives logged keys:

    - ``tensorboard``: a SummaryWriter of its own, in the TensorBoard callback's folder (transformers
      4's ``args.logging_dir``, else ``$TENSORBOARD_LOGGING_DIR``, else the newest
      ``{output_dir}/runs/{time}_{host}`` folder made since training began, as transformers 5 names it;
      ``{output_dir}/runs/reprmetrics`` when there is none), keys ``eval/...`` and ``train/...``;
    - ``wandb``: the active ``wandb.run``, keys ``eval/...`` and ``train/...`` on ``train/global_step``;
    - ``mlflow``: the active MLflow run, keys as logged;
    - figures, when none of them is active: PNG files under ``{output_dir}/figures``.

    Only the main process writes. Other integrations see the values only in ``state.log_history``.
    """

    def __init__(self) -> None:
        self._writer: Any = None
        self._since = time.time()

    def start(self) -> None:
        """At Trainer construction and when training begins: the TensorBoard folder is looked up anew."""
        self.close()
        self._since = time.time()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def sinks(self, args: Any, state: Any) -> list[Any]:
        if not state.is_world_process_zero:
            return []
        report_to = set(args.report_to or ())
        sinks: list[Any] = []
        if "tensorboard" in report_to:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self._tensorboard_dir(args))
            sinks.append(TensorBoardSink(self._writer, _integration_key))
        wandb = sys.modules.get("wandb")
        if "wandb" in report_to and wandb is not None and wandb.run is not None:
            run = wandb.run
            sinks.append(
                WandbSink(lambda values, step: run.log({**values, "train/global_step": step}), _integration_key)
            )
        mlflow = sys.modules.get("mlflow")
        if "mlflow" in report_to and mlflow is not None and (active := mlflow.active_run()) is not None:
            sinks.append(MLflowSink(mlflow.tracking.MlflowClient(), active.info.run_id))
        return sinks

    def _tensorboard_dir(self, args: Any) -> str:
        directory = getattr(args, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
        if directory:
            return os.path.expanduser(directory)
        runs = os.path.join(args.output_dir, "runs")
        host = socket.gethostname()
        recent = [
            entry.path
            for entry in (os.scandir(runs) if os.path.isdir(runs) else ())
            if entry.is_dir() and entry.name.endswith(f"_{host}") and entry.stat().st_mtime >= self._since - 2
        ]
        return max(recent, key=os.path.getmtime, default=os.path.join(runs, "reprmetrics"))

    def scalars(self, args: Any, state: Any, values: Mapping[str, float]) -> None:
        for sink in self.sinks(args, state):
            sink.scalars(values, state.global_step)
        self._flush()

    def text(self, args: Any, state: Any, key: str, text: str) -> None:
        for sink in self.sinks(args, state):
            sink.text(key, text, state.global_step)
        self._flush()

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def figures(self, args: Any, state: Any, base: str, tap: str, artifacts: Mapping[str, Any]) -> None:
        if not state.is_world_process_zero:
            return
        sinks = self.sinks(args, state) or [FilesSink(args.output_dir)]
        write_figures(sinks, base, tap, artifacts, state.global_step)
        self._flush()
