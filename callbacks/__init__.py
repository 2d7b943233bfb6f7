"""Framework adapters, installed and imported as ``reprmetrics.callbacks``.

- Lightning (the ``lightning`` extra): :class:`RepresentationMonitor`, :class:`CollapseEarlyStopping`,
  importable from here.
- Hugging Face ``Trainer`` (the ``huggingface`` extra): ``reprmetrics.callbacks.huggingface``.

Each adapter needs only its own framework: the Lightning names are imported on first use, so
``import reprmetrics.callbacks.huggingface`` works without Lightning installed, and using a Lightning
name without Lightning says what to install.
"""

import importlib
import os
from typing import Any

from reprmetrics.monitor import register_library_dir

register_library_dir(os.path.dirname(os.path.abspath(__file__)))  # warnings point past the callbacks

_LIGHTNING_NAMES = {
    "CollapseEarlyStopping": "reprmetrics.callbacks.collapse_early_stopping",
    "collapse_kind": "reprmetrics.callbacks.collapse_early_stopping",
    "RepresentationMonitor": "reprmetrics.callbacks.representation_monitor",
}

__all__ = ["CollapseEarlyStopping", "RepresentationMonitor", "collapse_kind", "spectrum_figure"]


def _require_lightning() -> None:
    try:
        import lightning.pytorch  # noqa: F401
    except ModuleNotFoundError as error:  # exercised in a subprocess test
        raise ModuleNotFoundError(
            'reprmetrics.callbacks needs Lightning for its Lightning callbacks: pip install "reprmetrics[lightning]"'
            f" (importing lightning.pytorch failed: {error}). The Hugging Face Trainer callback is"
            ' reprmetrics.callbacks.huggingface (pip install "reprmetrics[huggingface]")',
            name=error.name,
        ) from error


def __getattr__(name: str) -> Any:
    if name == "spectrum_figure":
        from reprmetrics.plotting import spectrum_figure

        return spectrum_figure
    if name in _LIGHTNING_NAMES:
        _require_lightning()
        value = getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'reprmetrics.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
