"""RepresentationMonitor: compute representation metrics during a Lightning run and log them."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from reprmetrics.callbacks._figures import drawable, log_figures
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from reprmetrics.monitor import (
    DEFAULT_MIN_SAMPLES,
    MONITOR_MAX_SAMPLES,
    MonitorConfigurationError,
    RepresentationTracker,
    Tap,
)
from reprmetrics.results import channel
from reprmetrics.stopping import KeyStyle

#: How Lightning's keys read: ``{prefix}/{train|val}/{tap}/{metric}``.
STYLE = KeyStyle(
    "RepresentationMonitor",
    {"train": "train", "val": "val"},
    {stage: f"{{prefix}}/{stage}/{{tap}}/{{metric}}" for stage in ("train", "val")},
)

#: The constructor arguments that are the tracker's.
TRACKER_SETTINGS = set(inspect.signature(RepresentationTracker).parameters) - {"owner"}


@contextlib.contextmanager
def as_misconfiguration() -> Iterator[None]:
    """Re-raise the core's configuration errors as Lightning's MisconfigurationException."""
    try:
        yield
    except MonitorConfigurationError as error:
        raise MisconfigurationException(str(error)) from error


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives epoch-end values, so figures and scalars line up."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


class RepresentationMonitor(Callback):
    r"""Watch the representations a LightningModule learns, without labels.

    Logs ``{prefix}/{stage}/{tap}/{metric}`` (e.g. ``repr/val/projector/rankme``) through
    ``pl_module.log``: ``train`` values every ``every_n_train_steps`` steps over the last
    ``train_buffer_size`` samples per tap, ``val`` values over the whole validation set at each
    validation epoch end. Values are computed from metrics synced across ranks, so they are the same on
    every rank and ``EarlyStopping``/``ModelCheckpoint`` can monitor them under DDP. Each tap and stage
    also logs ``num_samples`` and ``nonfinite_fraction``; non-finite embeddings make the tap's metrics
    NaN; values from fewer than ``min_samples`` samples are withheld. Each validation epoch adds the
    spectrum figure and histograms to every logger. The guide: ``docs/guide/monitor.md``.

    Args:
        taps: submodule names (a forward hook reads their output; :class:`~reprmetrics.monitor.Tap`
            pools feature maps) and/or keys of the dict ``training_step``/``validation_step`` return.
        num_views: views per sample (LiDAR and alignment need q ≥ 2).
        every_n_train_steps: training-stage cadence (0: none).
        train_buffer_size: samples per tap the training-stage metrics read.
        max_samples: points kept by uniformity and LID per computation.
        metrics: opt-in metric names (:func:`~reprmetrics.monitor.available_metrics`) or ``{name: Metric}``.
        default_metrics: include the default set.
        progress_bar: the validation metric shown in the progress bar (``None``: none).
        log_figures: add the spectrum figure and histograms to the loggers.
        figures_every_n_epochs: draw them every this many validation epochs.
        strict: raise instead of warning once and skipping a metric that cannot be computed.
        prefix: first component of every logged name.
        view_layout: ``"calls"``, ``"concat"``, ``"stacked"`` or ``"auto"``
            (:class:`~reprmetrics.monitor.RepresentationTracker`).
        min_samples: values from fewer usable samples are not logged (``num_samples`` is).
        reference: ``"initial"``, an ``nn.Module`` or a checkpoint path: logs ``cka_to_reference``.
        rankme_diagnostics: also log RankMe's top singular value and condition number.

    Example::

        trainer = Trainer(callbacks=[RepresentationMonitor(["backbone", "projector"], num_views=2)])
    """

    def __init__(
        self,
        taps: Iterable[str | Tap],
        num_views: int = 1,
        every_n_train_steps: int = 200,
        train_buffer_size: int = 1024,
        max_samples: int = MONITOR_MAX_SAMPLES,
        metrics: Mapping[str, Metric] | list[str] | None = None,
        default_metrics: bool = True,
        progress_bar: str | None = "rankme",
        log_figures: bool = True,
        figures_every_n_epochs: int = 1,
        strict: bool = False,
        prefix: str = "repr",
        view_layout: str = "auto",
        min_samples: int = DEFAULT_MIN_SAMPLES,
        reference: Any = None,
        rankme_diagnostics: bool = False,
    ) -> None:
        super().__init__()
        settings = {k: v for k, v in locals().items() if k in TRACKER_SETTINGS}
        with as_misconfiguration():
            self.tracker = RepresentationTracker(**settings, owner="RepresentationMonitor")
        if (
            isinstance(figures_every_n_epochs, bool)
            or not isinstance(figures_every_n_epochs, int)
            or figures_every_n_epochs < 1
        ):
            raise MisconfigurationException(
                "RepresentationMonitor: `figures_every_n_epochs` must be a positive integer, got"
                f" {figures_every_n_epochs!r}"
            )
        self.progress_bar, self.prefix = progress_bar, prefix
        self.log_figures, self.figures_every_n_epochs, self._val_epochs = log_figures, figures_every_n_epochs, 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(taps=[t.name for t in self.tracker.taps], prefix=self.prefix)

    def key(self, stage: str, tap: str, metric: str) -> str:
        """The logged name of a value."""
        return STYLE.key(self.prefix, stage, tap, metric)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with as_misconfiguration():
            self.tracker.attach(pl_module)
        channel(trainer, self.prefix).publish_from(self.tracker)  # stoppers find results by trainer and prefix
        # An output-key tap missing from training_step's dict may come from validation_step.
        self.tracker.expect_eval = is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker.reference == "initial":
            self.tracker.retake_reference(pl_module)  # once the strategy has broadcast the weights to every rank

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.tracker.detach()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.tracker.start_train_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with as_misconfiguration():
            values = self.tracker.end_train_step(outputs)
        if values:
            self._log(trainer, pl_module, "train", values)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracker.end_train_epoch()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.tracker.start_eval()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with as_misconfiguration():
            if trainer.sanity_checking:
                self.tracker.observe(outputs, "eval")  # output keys only: tap names are checked early
            else:
                self.tracker.end_eval_step(outputs)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with as_misconfiguration():
            values = self.tracker.end_eval()
        if values:
            self._log(trainer, pl_module, "val", values)
        if (
            self.log_figures
            and self._val_epochs % self.figures_every_n_epochs == 0
            and trainer.is_global_zero
            and trainer.loggers
        ):
            for tap, artifacts in drawable(self.tracker.last_result, self.tracker.min_samples):
                log_figures(trainer.loggers, f"{self.prefix}/val/{tap}", tap, artifacts, _logger_step(trainer))
        self._val_epochs += 1

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, values: Mapping[str, Tensor]
    ) -> None:
        on_step = stage == "train"
        named = {self.key(stage, *name.rsplit("/", 1)): value.to(torch.float32) for name, value in values.items()}
        for key, value in named.items():
            # Train values go to the loggers below: Lightning keeps only those on its `log_every_n_steps` grid.
            # logger=None, not True: the same, without a warning per key when there is no logger.
            progress = not on_step and key.rsplit("/", 1)[1] == self.progress_bar
            pl_module.log(
                key,
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=progress,
                batch_size=1,
                logger=False if on_step else None,
                sync_dist=False,
            )
        if on_step:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in named.items()}, step=_logger_step(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
