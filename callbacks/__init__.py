"""Lightning callbacks, installed and imported as ``reprmetrics.callbacks`` (needs the ``lightning`` extra)."""

import os

try:
    import lightning.pytorch  # noqa: F401
except ModuleNotFoundError as error:  # pragma: no cover - exercised in a subprocess test
    raise ModuleNotFoundError(
        'reprmetrics.callbacks needs Lightning: pip install "reprmetrics[lightning]"'
        f" (importing lightning.pytorch failed: {error})",
        name=error.name,
    ) from error

from reprmetrics.monitor import register_library_dir

register_library_dir(os.path.dirname(os.path.abspath(__file__)))  # warnings point past the callbacks

from reprmetrics.callbacks.collapse_early_stopping import CollapseEarlyStopping, collapse_kind  # noqa: E402
from reprmetrics.callbacks.representation_monitor import RepresentationMonitor  # noqa: E402
from reprmetrics.plotting import spectrum_figure  # noqa: E402

__all__ = ["CollapseEarlyStopping", "RepresentationMonitor", "collapse_kind", "spectrum_figure"]
