"""Framework adapters, installed and imported as ``reprmetrics.callbacks``.

- Lightning (the ``lightning`` extra): :class:`RepresentationMonitor`, :class:`CollapseEarlyStopping`,
  importable from here.
- Hugging Face ``Trainer`` (the ``huggingface`` extra): ``reprmetrics.callbacks.huggingface``.

Each adapter needs only its own framework. Without Lightning, ``import reprmetrics.callbacks`` (or
using a Lightning name) raises with the ``pip install`` line to run, while
``import reprmetrics.callbacks.huggingface`` still works: the Lightning names are imported on first use.
"""

import importlib
import os
import sys
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


# Adapters that do not need Lightning: importing them imports this package first.
_LIGHTNING_FREE_ADAPTERS = ("huggingface",)


def _importing_lightning_free_adapter() -> bool:
    """Whether this package is being imported on the way to a Lightning-free adapter.

    ``import reprmetrics.callbacks.huggingface`` imports this package first; CPython's import machinery
    holds the full module name in the ``name`` local of its ``_find_and_load`` frames. Where that
    cannot be read, the answer is "yes", and a Lightning name still raises when used.
    """
    frame = sys._getframe(1)
    seen_import_machinery = False
    while frame is not None:
        if frame.f_code.co_name in ("_find_and_load", "_find_and_load_unlocked"):
            seen_import_machinery = True
            name = frame.f_locals.get("name")
            parts = name.split(".") if isinstance(name, str) else []
            if len(parts) >= 3 and ".".join(parts[:2]) == __name__ and parts[2] in _LIGHTNING_FREE_ADAPTERS:
                return True
        frame = frame.f_back
    return not seen_import_machinery


try:
    import lightning.pytorch  # noqa: F401
except ModuleNotFoundError:
    if not _importing_lightning_free_adapter():
        _require_lightning()


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
