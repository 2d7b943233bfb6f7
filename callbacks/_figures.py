"""The frameworks' loggers mapped onto the sinks of :mod:`reprmetrics.sinks`.

:func:`log_figures` takes Lightning's loggers; :class:`TrainerBackends` the Hugging Face Trainer's
``report_to`` integrations. Nothing here imports Lightning or transformers at module level: both
adapters use it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from reprmetrics._warnings import warn
from reprmetrics.sinks import FilesSink, MLflowSink, TensorBoardSink, WandbSink, drawable, write_figures

__all__ = ["TrainerBackends", "drawable", "log_figures"]

_warned_loggers: set[str] = set()


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
