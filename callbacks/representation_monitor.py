"""RepresentationMonitor: compute representation metrics during training and log them."""

from __future__ import annotations

import contextlib
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


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives epoch-end values, so figures and scalars line up."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


@contextlib.contextmanager
def _as_misconfiguration() -> Iterator[None]:
    """Re-raise the tracker's configuration errors as Lightning's MisconfigurationException."""
    try:
        yield
    except MonitorConfigurationError as error:
        raise MisconfigurationException(str(error)) from error


class RepresentationMonitor(Callback):
    r"""Watch the representations a LightningModule learns, without labels.

    Logs ``{prefix}/{stage}/{tap}/{metric}`` through ``pl_module.log`` (stage ``train`` or ``val``), e.g.
    ``repr/val/projector/rankme``. Values are computed on every rank from metrics synced across ranks,
    so they are identical everywhere and ``EarlyStopping``/``ModelCheckpoint`` can monitor them under DDP.

    - ``train``: every ``every_n_train_steps`` training steps, over the most recent
      ``train_buffer_size`` samples per tap (captured during the steps just before; other steps
      capture nothing).
    - ``val``: over the whole validation set, at each validation epoch end (streamed; point-based
      metrics keep a uniform sample of at most ``max_samples``).

    Each tap and stage also logs ``num_samples`` (samples the metrics used) and
    ``nonfinite_fraction``. Embeddings with NaN/inf values (a diverged run) make every metric of that
    tap and stage NaN, so ``check_finite`` stoppers act on them and ``ModelCheckpoint`` still finds
    its key; values computed on fewer than ``min_samples`` samples are not logged at all (a warning
    says why). Scalars, figures and histograms of one validation epoch share one logger step (the
    one Lightning gives epoch-end values).

    Each validation epoch also adds, per tap, the covariance eigenvalue spectrum as a log-log figure
    with the α-ReQ fit (``{prefix}/val/{tap}/spectrum``), and histograms of the singular values and
    of the per-sample local intrinsic dimension, to every logger: TensorBoard (figure, histograms),
    Weights & Biases (``wandb.Image``, ``wandb.Histogram``), MLflow (PNG artifacts
    ``{key}/step_{step}.png``; histograms drawn as bar charts), and any other logger (CSVLogger, ...)
    as PNG files ``{log_dir}/figures/{key}/step_{step}.png``. Without a logger nothing is drawn, and
    the values are logged without Lightning's "no logger configured" warnings.

    Args:
        taps: submodule names (a forward hook reads their output; see
            :class:`reprmetrics.monitor.Tap` for pooling feature maps) and/or keys of the dict that
            ``training_step``/``validation_step`` return, holding ``(B, D)``, ``(B, q, D)`` or a list
            of q ``(B, D)`` tensors.
        num_views: views per sample (LiDAR and alignment need q ≥ 2).
        view_layout: how the q views of one step arrive: ``"calls"`` (q forward calls of the tapped
            module, or a list of q tensors), ``"concat"`` (one call on ``torch.cat([view_1, ...])``),
            ``"stacked"`` (one ``(B, q, D)`` tensor), or ``"auto"`` (calls or stacked; one 2-D tensor
            is ambiguous and raises). Captures that do not match raise ``MisconfigurationException``.
        every_n_train_steps: training-stage cadence (0 disables training-stage metrics).
        train_buffer_size: samples per tap that training-stage metrics read.
        max_samples: cap on points kept by uniformity and local intrinsic dimension (8,192: lower than
            the Metric classes' 25,600 because this runs every validation epoch; both cost O(N²·D)).
        min_samples: values computed on fewer usable samples are not logged (``num_samples`` is).
        rankme_diagnostics: also log RankMe's top singular value and condition number.
        reference: log ``{prefix}/val/{tap}/cka_to_reference``, the linear CKA between each tap's
            embeddings and a reference's on the same validation inputs: ``"initial"`` (a frozen copy of
            each tapped submodule at the start of fit: the pretrained encoder when fine-tuning), an
            ``nn.Module`` with the same submodule names, or a checkpoint path. See
            :class:`~reprmetrics.monitor.RepresentationTracker` for the memory cost and output-key taps.
        metrics: extra metrics: opt-in names (``["sigreg", "twonn", "mle_dimension"]``, see
            :func:`reprmetrics.monitor.available_metrics`) or ``{name: Metric}``, cloned per tap and
            stage (they receive ``(B, D)``).
        default_metrics: RankMe, α-ReQ (D ≥ 13), normalised std, uniformity, local intrinsic
            dimension, NESum, coding rate, Wasserstein uniformity, IsoScore, and with views LiDAR
            and alignment.
        progress_bar: the validation metric shown in the progress bar for each tap (``None``: none).
        log_figures: add the spectrum figure and histograms to the loggers.
        figures_every_n_epochs: draw them every this many validation epochs (drawing costs time on CPU).
        strict: raise instead of warning once and skipping a metric that cannot be computed.
        prefix: first component of every logged name.

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
        with _as_misconfiguration():
            self.tracker = RepresentationTracker(
                taps,
                num_views=num_views,
                every_n_train_steps=every_n_train_steps,
                train_buffer_size=train_buffer_size,
                max_samples=max_samples,
                metrics=metrics,
                default_metrics=default_metrics,
                strict=strict,
                view_layout=view_layout,
                min_samples=min_samples,
                reference=reference,
                rankme_diagnostics=rankme_diagnostics,
                owner="RepresentationMonitor",
            )
        self.progress_bar = progress_bar
        if (
            isinstance(figures_every_n_epochs, bool)
            or not isinstance(figures_every_n_epochs, int)
            or figures_every_n_epochs < 1
        ):
            raise MisconfigurationException(
                "RepresentationMonitor: `figures_every_n_epochs` must be a positive integer, got"
                f" {figures_every_n_epochs!r}"
            )
        self.log_figures = log_figures
        self.figures_every_n_epochs = figures_every_n_epochs
        self._val_epochs = 0
        self.prefix = prefix

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(taps=[t.name for t in self.tracker.taps], prefix=self.prefix)

    def key(self, stage: str, tap: str, metric: str) -> str:
        """The logged name of a value."""
        return f"{self.prefix}/{stage}/{tap}/{metric}"

    # ---- lifecycle -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with _as_misconfiguration():
            self.tracker.attach(pl_module)
        # Stoppers find this monitor's results by the trainer and the prefix, not by class.
        channel(trainer, self.prefix).publish_from(self.tracker)
        # An output-key tap missing from training_step's dict may come from validation_step.
        self.tracker.expect_eval = is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker.reference == "initial":
            # The weights as training starts, once the strategy has broadcast them to every rank.
            self.tracker.retake_reference(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.tracker.detach()

    # ---- training --------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.tracker.start_train_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with _as_misconfiguration():
            values = self.tracker.end_train_step(outputs)
        if values:
            self._log(trainer, pl_module, "train", values, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracker.end_train_epoch()

    # ---- validation ------------------------------------------------------------------------------
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
        with _as_misconfiguration():
            if trainer.sanity_checking:
                self.tracker.observe(outputs, "eval")  # output keys only: tap names are checked early
            else:
                self.tracker.end_eval_step(outputs)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with _as_misconfiguration():
            values = self.tracker.end_eval()
        if values:
            self._log(trainer, pl_module, "val", values, on_step=False)
        if self.log_figures and self._val_epochs % self.figures_every_n_epochs == 0:
            self._log_figures(trainer)
        self._val_epochs += 1

    # ---- logging ---------------------------------------------------------------------------------
    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        values: Mapping[str, Tensor],
        on_step: bool,
    ) -> None:
        named = {}
        for name, value in values.items():
            tap, metric = name.rsplit("/", 1)
            key = self.key(stage, tap, metric)
            named[key] = value.to(torch.float32)
            pl_module.log(
                key,
                named[key],
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=metric == self.progress_bar and stage == "val",
                # Train values go to the loggers below: Lightning would keep only those on its
                # `log_every_n_steps` grid, which need not meet `every_n_train_steps`. None, not True:
                # the same (validate() returns them) without a warning per key when there is no logger.
                logger=False if on_step else None,
                sync_dist=False,  # already identical on every rank
                batch_size=1,
            )
        if on_step:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in named.items()}, step=_logger_step(trainer))

    def _log_figures(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        for tap, artifacts in drawable(self.tracker.last_result, self.tracker.min_samples):
            log_figures(trainer.loggers, f"{self.prefix}/val/{tap}", tap, artifacts, _logger_step(trainer))

    # ---- persistence -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
