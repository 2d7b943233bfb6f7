"""Warnings that point at the user's code (the line that called into the library), not at ours."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["register_library_dir", "user_stacklevel", "warn"]

# Frames in these directories are library code: warnings point at the first frame outside them.
_LIBRARY_DIRS: tuple[str, ...] = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (
        torch.__file__,
        __import__("torchmetrics").__file__,
        os.path.join(os.path.dirname(__file__), "__init__.py"),
    )
)
_LIBRARY_PACKAGES = (
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "lightning_utilities",
    "transformers",
    "accelerate",
)
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep


def register_library_dir(path: str) -> None:
    """Treat frames under ``path`` as library code when warnings look for the user's code (adapters)."""
    global _LIBRARY_DIRS
    _LIBRARY_DIRS = (*_LIBRARY_DIRS, os.path.abspath(path) + os.sep)


def _is_library_frame(filename: str) -> bool:
    filename = os.path.abspath(filename)
    if filename.startswith(_LIBRARY_DIRS):
        return True
    if any(f"{os.sep}{package}{os.sep}" in filename for package in _LIBRARY_PACKAGES):
        return True
    # The standard library (contextlib, threading, ...), but not packages installed beside it.
    return filename.startswith(_STDLIB_DIR) and "site-packages" not in filename


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called right here that points at the user's code.

    Walks out of reprmetrics, torch, torchmetrics, Lightning, transformers and the standard library
    (decorators such as ``torch.no_grad`` add frames in ``torch/utils/_contextlib.py``). Falls back to
    the outermost library frame when every frame is library code.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_library_frame(frame.f_code.co_filename):
        if frame.f_back is None:
            return level
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn with the location of the user's code (see :func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
