"""Input checks shared by every metric.

Each check raises ``ValueError`` whose message starts with the metric's name, and runs before any
state changes, so a rejected batch leaves a Metric exactly as it was.
"""

from __future__ import annotations

import difflib
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

#: Floating dtypes accepted as input (float8 and other exotic formats: convert first).
SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    x: Any, metric: str, name: str = "embeddings", ndim: int = 2, min_rows: int = 1, features: int | None = None
) -> Tensor:
    """Check that ``x`` is a finite floating tensor with ``ndim`` dimensions and return it.

    Integer tensors are accepted and converted to float32. ``min_rows`` bounds the first dimension,
    ``features`` (when given) fixes the last one.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{metric}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = {2: "(N, D)", 3: "(N, Q, D)"}.get(ndim, f"{ndim}-D")
        raise ValueError(
            f"{metric}: `{name}` must have shape {shape}, got a {x.ndim}-D tensor of shape {tuple(x.shape)}"
        )
    if x.layout != torch.strided:
        raise ValueError(f"{metric}: `{name}` must be a dense tensor, got layout {x.layout}; call .to_dense() first")
    if x.device.type == "meta":
        raise ValueError(f"{metric}: `{name}` is on the 'meta' device and holds no values")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{metric}: `{name}` must be real-valued, got dtype {x.dtype}")
    if x.is_floating_point() and x.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise ValueError(
            f"{metric}: `{name}` has dtype {x.dtype}, which is not supported; convert it with .float() first"
        )
    if not x.is_floating_point():
        x = x.float()
    if x.shape[0] < min_rows:
        raise ValueError(f"{metric}: `{name}` needs at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[-1] == 0:
        raise ValueError(f"{metric}: `{name}` has no features (last dimension is 0)")
    if features is not None and x.shape[-1] != features:
        raise ValueError(
            f"{metric}: `{name}` has {x.shape[-1]} features but earlier batches had {features};"
            " call reset() before feeding embeddings of another width"
        )
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{metric}: `{name}` contains NaN or infinite values")
    return x


def result_dtype(x: Tensor) -> torch.dtype:
    """Dtype of a function's result: the input's, but at least float32 (half inputs are upcast)."""
    return torch.promote_types(x.dtype, torch.float32)


def check_positive_int(value: Any, metric: str, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{metric}: `{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def check_nonnegative_float(value: Any, metric: str, name: str, strictly_positive: bool = False) -> float:
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or value != value
    if not bad:
        bad = value <= 0 if strictly_positive else value < 0
    if bad:
        bound = "> 0" if strictly_positive else ">= 0"
        raise ValueError(f"{metric}: `{name}` must be a finite number {bound}, got {value!r}")
    return float(value)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (CUDA: free device memory; CPU: available RAM), or None if
    unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            import os

            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def check_memory(needed_bytes: int, device: torch.device, owner: str, what: str, hint: str) -> None:
    """Raise ``ValueError`` before allocating ``needed_bytes`` that ``device`` cannot hold (with a margin)."""
    available = available_memory_bytes(device)
    if available is not None and needed_bytes > 0.8 * available:
        raise ValueError(
            f"{owner}: {what} needs about {needed_bytes / 1e9:,.1f} GB, more than the {available / 1e9:,.1f} GB"
            f" available on {device}; {hint}"
        )


def check_device(device: object, owner: str) -> torch.device | None:
    """``device`` as a torch.device (None stays None), or ``ValueError`` naming what is wrong."""
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{owner}: `device` {device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner}: device {str(target)!r} requested but CUDA is not available")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(
            f"{owner}: device {str(target)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if target.type == "meta":
        raise ValueError(f"{owner}: the 'meta' device holds no values; compute on 'cpu' or 'cuda'")
    if target.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"{owner}: device type {target.type!r} is not supported; use 'cpu' or 'cuda'")
    return target


def _configuration_error(message: str) -> ValueError:
    from reprmetrics.registry import MonitorConfigurationError

    return MonitorConfigurationError(message)


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)


def quoted(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + f", ... ({len(names)} in all)") if len(names) > limit else (shown or "none")


def load_weights(path: str | os.PathLike, owner: str) -> Mapping[str, Tensor]:
    """A state dict (or a Lightning checkpoint's ``state_dict``) from ``path``, never running pickled code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _configuration_error(
            f"{owner}: cannot load the reference checkpoint {str(path)!r} safely ({first_line[:200]}). It is read with"
            " torch.load(weights_only=True), which never runs pickled code: save only the weights, e.g."
            " torch.save(model.state_dict(), path), or pass the reference model itself as `reference`"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise _configuration_error(
            f"{owner}: the reference checkpoint {str(path)!r} holds {type(state).__name__}, not a state dict of"
            " tensors; save it with torch.save(model.state_dict(), path)"
        )
    return state
