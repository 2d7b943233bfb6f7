"""Where values, text and figures go besides a framework's own logging: one writer ("sink") per backend.

Per tap and evaluation the figures are the covariance spectrum with the α-ReQ fit, and histograms of
the singular values and of the per-sample LID. Each backend takes them its own way:

- TensorBoard (:class:`TensorBoardSink`): ``add_figure`` and ``add_histogram``;
- Weights & Biases (:class:`WandbSink`): ``wandb.Image`` and ``wandb.Histogram``, on the run's step axis;
- MLflow (:class:`MLflowSink`): PNG artifacts ``{key}/step_{step}.png``, histograms drawn as bar charts
  (MLflow has no histogram type);
- anything else (:class:`FilesSink`): PNG files ``{directory}/figures/{key}/step_{step}.png``.

The sinks take plain writers, clients and folders: the framework adapters (``reprmetrics.callbacks``)
map their loggers onto them, and a plain loop can use them directly. matplotlib, wandb and mlflow
are imported only when used.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from reprmetrics.plotting import spectrum_figure
from reprmetrics.results import TrackerResult

__all__ = ["FilesSink", "MLflowSink", "TensorBoardSink", "WandbSink", "drawable", "histogram_figure", "write_figures"]

HISTOGRAMS = {"singular_values": "singular value", "lid_per_sample": "local intrinsic dimension (per sample)"}


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
