"""Figures for loggers: the covariance spectrum with the α-ReQ fit, and histograms of the singular values
and of the per-sample LID, written to every logger that takes images (TensorBoard today)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reprmetrics.plotting import spectrum_figure

__all__ = ["log_figures"]


def log_figures(loggers: Iterable[Any], base: str, tap: str, artifacts: Mapping[str, Any], step: int) -> None:
    """Write one tap's figures (``artifacts`` of a tracker result) under ``base`` to each logger."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            if "singular_values" in artifacts:
                writer.add_histogram(f"{base}/singular_values", artifacts["singular_values"].float().cpu(), step)
            if "lid_per_sample" in artifacts:
                writer.add_histogram(f"{base}/lid_per_sample", artifacts["lid_per_sample"].float().cpu(), step)
            if "spectrum" in artifacts:
                figure = spectrum_figure(artifacts["spectrum"], title=f"{tap}: covariance spectrum", missing_ok=True)
                if figure is not None:
                    writer.add_figure(f"{base}/spectrum", figure, step)
