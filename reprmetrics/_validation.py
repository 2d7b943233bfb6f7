"""Input checks shared by every metric.

Each check raises ``ValueError`` whose message starts with the metric's name, and runs before any
state changes, so a rejected batch leaves a Metric exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_tensor(
    x: Any,
    metric: str,
    name: str = "embeddings",
    ndim: int = 2,
    min_rows: int = 1,
    features: int | None = None,
) -> Tensor:
    """Check that ``x`` is a finite floating tensor with ``ndim`` dimensions and return it.

    Integer tensors are accepted and converted to float32. ``min_rows`` bounds the first dimension,
    ``features`` (when given) fixes the last one.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{metric}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = {2: "(N, D)", 3: "(N, Q, D)"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{metric}: `{name}` must have shape {shape}, got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{metric}: `{name}` must be real-valued, got dtype {x.dtype}")
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
