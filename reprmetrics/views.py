"""What a tap's output becomes: ``(B, D)`` embeddings (a tap's ``reduce``) and ``(B, q, D)`` views.

:func:`group_views` groups one step's captures by the declared view layout; :func:`flatten_output` and
:func:`first_token` are ready-made ``reduce`` functions. Imported through :mod:`reprmetrics.taps` and
:mod:`reprmetrics.monitor`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from reprmetrics._validation import closest as _closest
from reprmetrics._validation import quoted as _quoted
from reprmetrics.registry import MonitorConfigurationError

__all__ = ["VIEW_LAYOUTS", "UngroupableBatch", "check_view_layout", "first_token", "flatten_output", "group_views"]

VIEW_LAYOUTS = ("auto", "calls", "concat", "stacked")
OWNER = "RepresentationTracker"  # the class the user called names itself in messages (adapters pass theirs)


FEATURE_MAP_HINT = (
    "pass a `reduce` that gives (B, D) embeddings, e.g. Tap({name!r}, reduce=lambda y: y.mean((2, 3))) to"
    " average-pool a (B, C, H, W) feature map, or Tap({name!r}, reduce=lambda y: y[:, 0]) to take the first"
    " token of a (B, T, D) sequence; to flatten on purpose, Tap({name!r}, reduce=flatten_output)"
    " (from reprmetrics.monitor)"
)


def flatten_output(output: Any) -> Tensor:
    """Explicit flattening: the first tensor of a tuple/list output, flattened to ``(B, D)``.

    Not the default: a (B, 64, 56, 56) feature map would become a 200,704-wide embedding. Pass it as a
    tap's ``reduce`` when that is what you want: ``Tap("layer4", reduce=flatten_output)``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise MonitorConfigurationError(
            f"flatten_output: a tap produced {type(output).__name__}; give the Tap a `reduce` function returning"
            " a (B, D) tensor"
        )
    return output.unsqueeze(1) if output.ndim == 1 else output.flatten(1)


def module_embeddings(output: Any, tap: str, owner: str = OWNER) -> Tensor:
    """Default ``reduce`` of a module tap: its output (or the first tensor of a tuple) as ``(B, D)``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        keys = list(output.keys())
        raise MonitorConfigurationError(
            f"{owner}: module tap {tap!r} returns a mapping with keys {_quoted(keys)}; pick the embeddings"
            f" with a `reduce`, e.g. Tap({tap!r}, reduce=lambda out: out[{keys[0] if keys else 'key'!r}])"
        )
    if not isinstance(output, Tensor):
        raise MonitorConfigurationError(
            f"{owner}: module tap {tap!r} returns {type(output).__name__}; give the Tap a `reduce` returning a"
            " (B, D) tensor"
        )
    if output.ndim == 1:
        return output.unsqueeze(1)
    if output.ndim > 2:
        raise MonitorConfigurationError(
            f"{owner}: module tap {tap!r} returns a {output.ndim}-D tensor of shape {tuple(output.shape)};"
            f" embeddings must be (B, D): {FEATURE_MAP_HINT.format(name=tap)}"
        )
    return output


def first_token(output: Any) -> Tensor:
    """A ``reduce`` for hidden-state taps: the first token's vector of a ``(B, T, D)`` output, BERT's ``[CLS]``.

    A transformer layer returns the hidden states (transformers 5) or a tuple whose first element they
    are (transformers 4): both work. ``Tap("bert.encoder.layer.1", reduce=first_token)``.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise MonitorConfigurationError(
            f"first_token: expected (B, T, D) hidden states (or a tuple starting with them), got {shape}"
        )
    return output[:, 0]


def check_view_layout(view_layout: Any, num_views: int, owner: str = OWNER) -> None:
    """Raise for a view layout that does not exist, or one that needs views with ``num_views = 1``."""
    if view_layout not in VIEW_LAYOUTS:
        close = _closest(str(view_layout), VIEW_LAYOUTS)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MonitorConfigurationError(
            f"{owner}: `view_layout` must be one of {VIEW_LAYOUTS}, got {view_layout!r}{hint}"
        )
    if view_layout in ("concat", "stacked") and num_views == 1:
        raise MonitorConfigurationError(f"{owner}: view_layout={view_layout!r} needs num_views >= 2")


class UngroupableBatch(ValueError):
    """A batch that the declared layout cannot split into views (e.g. 63 rows into 2 views)."""

    def __init__(self, message: str, samples: int) -> None:
        super().__init__(message)
        self.samples = samples


def group_views(chunks: Sequence[Tensor], num_views: int, tap: str, layout: str = "auto", owner: str = OWNER) -> Tensor:
    """``(B, q, D)`` views from the tensors one step produced for one tap.

    With ``num_views = 1`` every row of every tensor is one sample. With ``num_views = q > 1`` the
    ``layout`` says how views arrive in one step:

    - ``"calls"``: q tensors ``(B, D)``, one per forward call (or a list of q from an output key),
      views 1..q in call order;
    - ``"concat"``: one ``(q·B, D)`` tensor, view-major (``torch.cat([view_1, view_2])``);
    - ``"stacked"``: one ``(B, q, D)`` tensor;
    - ``"auto"``: ``calls`` for q tensors, ``stacked`` for one 3-D tensor. One 2-D tensor is ambiguous
      (a concatenated batch, or a batch without views) and raises: declare the layout.

    Raises :class:`MonitorConfigurationError` when the captured tensors do not match the layout.
    """
    chunks = [c for c in chunks if c is not None]
    if not chunks:
        raise MonitorConfigurationError(f"{owner}: tap {tap!r} captured nothing this step")
    shapes = [tuple(c.shape) for c in chunks]
    if num_views == 1:
        if any(c.ndim != 2 for c in chunks):
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r} captured tensors of shapes {shapes} with num_views=1; each must be (B, D):"
                f" {FEATURE_MAP_HINT.format(name=tap)}, or set num_views if a (B, q, D) tensor holds views"
            )
        return torch.cat(chunks).unsqueeze(1)
    q = num_views
    if layout == "auto":
        if len(chunks) == q and all(c.ndim == 2 for c in chunks):
            layout = "calls"
        elif len(chunks) == 1 and chunks[0].ndim == 3:
            layout = "stacked"
        elif len(chunks) == 1 and chunks[0].ndim == 2:
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r} captured one {shapes[0]} tensor per step with num_views={q}: ambiguous."
                f" Pass view_layout='concat' if it is torch.cat([view_1, ..., view_{q}]) (view-major), or"
                " num_views=1 if its rows are distinct samples"
            )
        else:
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r} captured {len(chunks)} tensor(s) of shapes {shapes} in one step; with"
                f" num_views={q} expected {q} forward calls (view_layout='calls'), one (B, {q}, D) tensor"
                f" ('stacked') or one ({q}·B, D) tensor ('concat')"
            )
    if layout == "calls":
        if len(chunks) != q or any(c.ndim != 2 for c in chunks):
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r}: view_layout='calls' expects {q} (B, D) tensors per step (one per forward"
                f" call, or a list of {q}), got {len(chunks)} of shapes {shapes}"
            )
        if len(set(shapes)) != 1:
            raise MonitorConfigurationError(f"{owner}: the {q} views of tap {tap!r} differ in shape: {shapes}")
        return torch.stack(chunks, dim=1)
    if layout == "stacked":
        if len(chunks) != 1 or chunks[0].ndim != 3 or chunks[0].shape[1] != q:
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r}: view_layout='stacked' expects one (B, {q}, D) tensor per step, got"
                f" shapes {shapes}"
            )
        return chunks[0]
    if layout == "concat":
        if len(chunks) != 1 or chunks[0].ndim != 2:
            raise MonitorConfigurationError(
                f"{owner}: tap {tap!r}: view_layout='concat' expects one ({q}·B, D) tensor per step, got"
                f" {len(chunks)} of shapes {shapes}"
            )
        rows = chunks[0].shape[0]
        if rows % q:
            raise UngroupableBatch(f"a batch of {rows} rows cannot be split into {q} views", samples=rows // q)
        return rearrange(chunks[0], "(q b) d -> b q d", q=q)
    raise MonitorConfigurationError(f"{owner}: `view_layout` must be one of {VIEW_LAYOUTS}, got {layout!r}")
