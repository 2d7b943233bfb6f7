"""Lightning callbacks, installed and imported as ``reprmetrics.callbacks`` (needs the ``lightning`` extra)."""

from reprmetrics.callbacks.collapse_early_stopping import CollapseEarlyStopping, collapse_kind
from reprmetrics.callbacks.representation_monitor import RepresentationMonitor, spectrum_figure

__all__ = ["CollapseEarlyStopping", "RepresentationMonitor", "collapse_kind", "spectrum_figure"]
