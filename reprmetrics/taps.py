"""Where embeddings come from: taps (submodules or step-output keys), their hooks, and views.

:class:`Capture` registers the forward hooks, reads output keys, checks tap names and groups one
step's captures into ``(B, q, D)`` views (:func:`reprmetrics.views.group_views`). The tracker decides
*when* to capture (``mode``) and what to do with the views; this module never computes a metric.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from reprmetrics._validation import closest as _closest
from reprmetrics._validation import load_weights as _load_weights
from reprmetrics._validation import quoted as _quoted
from reprmetrics._warnings import warn
from reprmetrics.registry import MonitorConfigurationError
from reprmetrics.views import (
    FEATURE_MAP_HINT,
    OWNER,
    VIEW_LAYOUTS,
    UngroupableBatch,
    check_view_layout,
    first_token,
    flatten_output,
    group_views,
    module_embeddings,
)

__all__ = [
    "OWNER",
    "VIEW_LAYOUTS",
    "Capture",
    "Tap",
    "UngroupableBatch",
    "first_token",
    "flatten_output",
    "group_views",
]


@dataclass
class Tap:
    """Where embeddings come from.

    Args:
        name: a submodule path of the model (``"backbone"``, ``"encoder.layer4"``) or a key of the dict
            that the training/validation step returns.
        source: ``"module"``, ``"output"``, or ``"auto"`` (a module when the model has such a submodule,
            otherwise an output key).
        reduce: maps what the tap captures to ``(B, D)`` embeddings: a module's output (one call) or an
            output key's value (each tensor of a list value separately). Without it a module output
            must already be ``(B, D)`` (or a tuple whose first element is); a 3-D or 4-D output raises
            with the ``reduce`` to use. :func:`flatten_output` flattens on purpose.
    """

    name: str
    source: str = "auto"
    reduce: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MonitorConfigurationError(f"Tap: a tap name must be a non-empty string, got {self.name!r}")
        if self.source not in ("auto", "module", "output"):
            raise MonitorConfigurationError(
                f"Tap: Tap source must be 'auto', 'module' or 'output', got {self.source!r}"
            )
        if self.reduce is not None and not callable(self.reduce):
            raise MonitorConfigurationError(
                f"Tap: Tap {self.name!r}: `reduce` must be callable, got {type(self.reduce).__name__}"
            )


def _follow_device(copy_: nn.Module, live: nn.Module) -> None:
    """Move a reference copy to the live module's device (Lightning moves the model after attach)."""
    live_tensor = next(iter((*live.parameters(), *live.buffers())), None)
    copy_tensor = next(iter((*copy_.parameters(), *copy_.buffers())), None)
    if live_tensor is not None and copy_tensor is not None and copy_tensor.device != live_tensor.device:
        copy_.to(live_tensor.device)


class Capture:
    """Forward hooks on module taps, output-key taps, tap-name checks and per-step grouping into views.

    ``mode`` (``"train"``, ``"eval"`` or None) says whether hooks capture; captures from a thread other
    than the one that set the mode are rejected (e.g. ``nn.DataParallel`` replicas: their order would
    depend on thread timing), and hooks capture only for the module instance they were attached to
    (a deep copy of the model, such as an EMA teacher, carries the hooks but captures nothing).
    """

    def __init__(self, taps: list[Tap], num_views: int, view_layout: str, reference: Any, owner: str = OWNER) -> None:
        check_view_layout(view_layout, num_views, owner)
        if reference is not None and not isinstance(reference, (str, os.PathLike, nn.Module)):
            raise MonitorConfigurationError(
                f"{owner}: `reference` must be 'initial', an nn.Module or a checkpoint path, got"
                f" {type(reference).__name__}"
            )
        if isinstance(reference, str) and reference != "initial" and not os.path.exists(reference):
            raise MonitorConfigurationError(
                f"{owner}: `reference` is neither 'initial' nor an existing checkpoint file: {reference!r}"
            )
        self.taps = taps
        self.num_views = num_views
        self.view_layout = view_layout
        self.reference = reference
        self.owner = owner
        self.mode: str | None = None
        self.thread = threading.get_ident()
        self.expect_eval = False
        self.module_taps: set[str] = set()
        self.submodule_names: list[str] = []
        self.model: nn.Module | None = None
        self.reference_modules: dict[str, nn.Module] = {}
        self.num_features: dict[str, int] = {}
        self.steps_seen = {"train": 0, "eval": 0}
        self._handles: list[Any] = []
        self._found: set[str] = set()  # taps known to exist (a submodule, or a key seen in a step output)
        self._output_keys: dict[str, set[str]] = {"train": set(), "eval": set()}
        self._taps_checked = False
        self._error: MonitorConfigurationError | None = None
        self._captured: dict[str, list[Tensor]] = {t.name: [] for t in taps}
        self._reference_captured: dict[str, list[Tensor]] = {t.name: [] for t in taps}
        self.repeated_calls: dict[str, int] = {}  # taps called several times per step with num_views=1

    def start(self, mode: str | None) -> None:
        """Capture (``"train"``/``"eval"``) or not (None) until the next call, from this thread."""
        self.mode = mode
        self.thread = threading.get_ident()

    def clear(self) -> None:
        self._captured = {t.name: [] for t in self.taps}
        self._reference_captured = {t.name: [] for t in self.taps}

    def attach(self, model: nn.Module) -> None:
        """Register forward hooks on the module taps (idempotent; replaces earlier hooks).

        A tap with ``source="module"`` that the model lacks raises :class:`MonitorConfigurationError`
        naming the closest submodules; ``"auto"`` taps that are not submodules become output taps.
        """
        self.detach()
        self.model = model
        self.module_taps = set()
        self.submodule_names = [name for name, _ in model.named_modules() if name]
        if self.reference is not None and not self.reference_modules:
            self.reference_modules = self._reference_submodules(model)  # before our hooks exist: copies carry none
        for tap in self.taps:
            try:
                module = model.get_submodule(tap.name)
            except AttributeError:
                module = None
            if tap.source == "module" and module is None:
                close = _closest(tap.name, self.submodule_names)
                raise MonitorConfigurationError(
                    f"{self.owner}: the model has no submodule {tap.name!r}; closest submodules: {_quoted(close)}"
                )
            if module is None or tap.source == "output":
                continue
            self.module_taps.add(tap.name)
            self._found.add(tap.name)
            self._handles.append(module.register_forward_hook(self._make_hook(tap, module), with_kwargs=True))

    def retake_reference(self, model: nn.Module) -> None:
        """Take the reference copies again from ``model`` (and re-attach)."""
        self.reference_modules = {}
        self.attach(model)

    def _reference_submodules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Frozen copies of the tapped submodules: of ``model`` now, or of the given reference."""
        if isinstance(self.reference, nn.Module):
            source = self.reference
        elif self.reference == "initial":
            source = model
        else:
            state = _load_weights(self.reference, self.owner)
            source = copy.deepcopy(model)
            try:
                source.load_state_dict(state)
            except (RuntimeError, TypeError) as error:
                raise MonitorConfigurationError(
                    f"{self.owner}: the reference checkpoint {str(self.reference)!r} does not fit the model: {error}"
                ) from error
        names = [name for name, _ in source.named_modules() if name]
        frozen = {}
        for tap in self.taps:
            try:
                module = model.get_submodule(tap.name)
            except AttributeError:
                continue  # an output tap: its reference comes from the step output
            try:
                reference = source.get_submodule(tap.name) if source is not model else module
            except AttributeError:
                raise MonitorConfigurationError(
                    f"{self.owner}: the reference model has no submodule {tap.name!r}; closest:"
                    f" {_quoted(_closest(tap.name, names))}"
                ) from None
            frozen[tap.name] = copy.deepcopy(reference).eval().requires_grad_(False)
        return frozen

    def detach(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, tap: Tap, attached: nn.Module) -> Callable[..., None]:
        # A deep copy of the model (an EMA teacher) copies its forward hooks too; they must not capture.
        owner = weakref.ref(attached)

        def embed(output: Any) -> Tensor:
            embeddings = (
                tap.reduce(output) if tap.reduce is not None else module_embeddings(output, tap.name, self.owner)
            )
            if not isinstance(embeddings, Tensor):
                raise MonitorConfigurationError(
                    f"{self.owner}: the `reduce` of tap {tap.name!r} returned {type(embeddings).__name__}, not a tensor"
                )
            return embeddings.detach()

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.mode is None or self._error is not None:
                return  # off-schedule: costs one attribute read
            if threading.get_ident() != self.thread:
                self._error = MonitorConfigurationError(
                    f"{self.owner}: tap {tap.name!r} ran in another thread than the training loop (e.g."
                    " torch.nn.DataParallel); the order of captured views would depend on thread timing. Use"
                    " DistributedDataParallel (one process per device)"
                )
                return
            if module is not owner():
                return  # a copy of the attached module (deepcopy carries hooks): not the monitored model
            with torch.no_grad():
                try:
                    self._captured[tap.name].append(embed(output))
                    reference = self.reference_modules.get(tap.name)
                    if reference is not None and self.mode == "eval":
                        _follow_device(reference, module)
                        self._reference_captured[tap.name].append(embed(reference(*args, **kwargs)))
                except MonitorConfigurationError as error:
                    self._error = error  # raised from the next end_*_step, outside the model's forward

        # Under torch.compile the hook runs eagerly (a graph break): it reads Python state and threads.
        return torch.compiler.disable(hook)

    def device(self) -> torch.device:
        if self.model is not None:
            for tensor in (*self.model.parameters(), *self.model.buffers()):
                return tensor.device
        return torch.device("cpu")

    def observe(self, outputs: Any, stage: str = "train") -> None:
        """Read output taps from what a step returned (``stage``: ``"train"`` or ``"eval"``).

        Keys are recorded even when not capturing, so a misspelt tap is caught at the first step.
        """
        self.steps_seen[stage] += 1
        if isinstance(outputs, Mapping):
            if not self._taps_checked:
                self._output_keys[stage].update(str(k) for k in outputs.keys())
                self._found.update(t.name for t in self.taps if t.name in outputs)
        if self.mode is None or not isinstance(outputs, Mapping):
            return
        for tap in self.taps:
            if tap.name in self.module_taps or tap.name not in outputs:
                continue
            self._captured[tap.name].extend(self._output_tensors(tap, outputs[tap.name], tap.name))
            if self.reference is not None and self.mode == "eval":
                key = f"{tap.name}_reference"
                if key not in outputs:
                    raise MonitorConfigurationError(
                        f"{self.owner}: with `reference`, output tap {tap.name!r} needs the reference embeddings"
                        f" under the key {key!r} of the validation step output (same rows and layout); keys"
                        f" seen: {_quoted(sorted(map(str, outputs)))}"
                    )
                self._reference_captured[tap.name].extend(self._output_tensors(tap, outputs[key], key))

    def _output_tensors(self, tap: Tap, value: Any, key: str) -> list[Tensor]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if tap.reduce is not None:
            values = [tap.reduce(v) for v in values]
        out = []
        for v in values:
            if not isinstance(v, Tensor):
                raise MonitorConfigurationError(
                    f"{self.owner}: output key {key!r} holds {type(v).__name__}; it must hold (B, D), (B, q, D)"
                    " or a list of q (B, D) tensors"
                )
            if v.ndim > 3 or (v.ndim == 3 and self.num_views == 1):
                raise MonitorConfigurationError(
                    f"{self.owner}: output key {key!r} holds a tensor of shape {tuple(v.shape)}; embeddings must"
                    f" be (B, D){' or (B, q, D) views' if self.num_views > 1 else ''}:"
                    f" {FEATURE_MAP_HINT.format(name=tap.name)}"
                )
            out.append(v.detach())
        return out

    def hint_at_views(self, warned: set[str]) -> None:
        """Once per tap: a module called several times per step with the same shape may be computing views."""
        for tap, calls in self.repeated_calls.items():
            if f"views-hint/{tap}" not in warned and tap in self.module_taps:
                warned.add(f"views-hint/{tap}")
                warn(
                    f"{self.owner}: tap {tap!r} was called {calls} times in one step with num_views=1, so its"
                    " rows are taken as distinct samples. If the calls are views of the same samples"
                    f" (augmentations), pass num_views={calls}: LiDAR and alignment need views, and uniformity"
                    " and LID would otherwise see near-duplicates"
                )

    def nothing_hint(self, tap: str, stage: str) -> str:
        """Why a tap may have captured nothing, for messages."""
        if tap in self.module_taps:
            return "its module was never called"
        return f"the key is missing from the {'training_step' if stage == 'train' else 'validation_step'} outputs"

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.mode = None
            raise error

    def check_taps(self, stage: str) -> None:
        """Raise for taps that are neither submodules nor step-output keys (called by the step ends).

        After the first training step a tap not found is an error, unless ``expect_eval`` says an
        evaluation pass is still to come that could produce it and no evaluation step has been seen
        (Lightning's sanity check counts); after the first evaluation pass it is an error.
        """
        if self._taps_checked:
            return
        missing = [t for t in self.taps if t.name not in self._found]
        if not missing:
            self._taps_checked = True
            return
        if stage == "train" and self.expect_eval and not self.steps_seen["eval"]:
            return  # the evaluation pass to come may produce them
        keys = sorted(self._output_keys["train"] | self._output_keys["eval"])
        lines = []
        for tap in missing:
            close_modules = _closest(tap.name, self.submodule_names)
            close_keys = _closest(tap.name, keys)
            # Nothing close: name the submodules that exist, so the message always shows a way out.
            more = ", ..." if len(self.submodule_names) > 8 else ""
            modules = (
                f"closest submodules: {_quoted(close_modules)}"
                if close_modules
                else f"submodules: {_quoted(self.submodule_names[:8])}{more}"
            )
            lines.append(
                f"tap {tap.name!r} is neither a submodule of the model nor a key of any step output"
                f" ({modules}; closest output keys: {_quoted(close_keys)}; output keys seen: {_quoted(keys)})"
            )
        self._taps_checked = True
        raise MonitorConfigurationError(
            f"{self.owner}: " + "; ".join(lines) + ". Fix the tap name, or return that key from the step."
        )

    def group(self, on_ungroupable: Callable[[str, int, str], None]) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Group this step's captures per tap (and their reference); batches the layout cannot split go to
        ``on_ungroupable(tap, samples, reason)``."""
        grouped = {}
        for tap in self.taps:
            chunks, self._captured[tap.name] = self._captured[tap.name], []
            reference_chunks, self._reference_captured[tap.name] = self._reference_captured[tap.name], []
            if not chunks:
                continue
            if self.num_views == 1 and len(chunks) > 1 and len({tuple(c.shape) for c in chunks}) == 1:
                self.repeated_calls.setdefault(tap.name, len(chunks))  # same-shaped calls in one step: views, perhaps
            try:
                views = group_views(chunks, self.num_views, tap.name, self.view_layout, self.owner)
                reference = (
                    group_views(reference_chunks, self.num_views, tap.name, self.view_layout, self.owner)
                    if reference_chunks
                    else None
                )
            except UngroupableBatch as error:
                on_ungroupable(tap.name, error.samples, str(error))
                continue
            if reference is not None and reference.shape[:2] != views.shape[:2]:
                raise MonitorConfigurationError(
                    f"{self.owner}: tap {tap.name!r}: the reference gave {tuple(reference.shape[:2])} samples ×"
                    f" views, the live model {tuple(views.shape[:2])}"
                )
            self.num_features[tap.name] = views.shape[-1]
            grouped[tap.name] = (views, reference)
        return grouped
