"""The training stage's capture window: which steps capture, the recent samples per tap, and their counts.

The tracker computes training-stage values every ``every_n_train_steps`` steps over the most recent
``train_buffer_size`` samples per tap; :class:`TrainWindow` decides which steps capture so that the
buffer holds recent samples at a scheduled step, and keeps what a resumed run needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from reprmetrics._counts import RecentBuffer


class TrainWindow:
    """Recent-sample buffers for ``taps`` and the steps that fill them."""

    def __init__(self, taps: Iterable[str], every_n_train_steps: int, buffer_size: int) -> None:
        self.every, self.size = every_n_train_steps, buffer_size
        self.buffers = {tap: RecentBuffer(buffer_size) for tap in taps}
        self.dropped = dict.fromkeys(self.buffers, 0)  # samples left out since the last computation
        self.epoch_captures = dict.fromkeys(self.buffers, 0)
        self.epoch_capture_steps = 0
        self.batch_size: int | None = None

    def captures(self, step: int) -> bool:
        """Whether training step ``step`` captures.

        Until the buffers are full every step captures (one detached copy of the tapped outputs per
        step), so the first value — the baseline of relative criteria — reads a full buffer too; then
        the steps just before a scheduled one, enough of them to fill the buffer.
        """
        n = self.every
        filling = self.batch_size is None or any(buffer.fill() < 1.0 for buffer in self.buffers.values())
        window = 1 if self.batch_size is None else max(1, math.ceil(self.size / self.batch_size))
        capture = n > 0 and (filling or (step % n) >= n - window)
        self.epoch_capture_steps += capture
        return capture

    def add(self, tap: str, views: Tensor) -> None:
        self.batch_size = views.shape[0]
        self.buffers[tap].add(views)
        self.epoch_captures[tap] += len(views)

    def take(self, tap: str) -> tuple[Tensor | None, int]:
        """The tap's recent samples (kept for the next computation) and the samples dropped since the last."""
        dropped, self.dropped[tap] = self.dropped[tap], 0
        return self.buffers[tap].recent(), dropped

    def unfilled(self) -> dict[str, int]:
        """``{tap: samples held}`` of the taps whose buffer is not yet full (their values wait)."""
        if not self.every:
            return {}
        return {tap: round(b.fill() * self.size) for tap, b in self.buffers.items() if b.fill() < 1.0}

    def end_epoch(self) -> tuple[int, list[str]]:
        """Start a new epoch's counts; returns the capturing steps of the one that ended and the taps that
        captured nothing in them."""
        steps, silent = self.epoch_capture_steps, [tap for tap, n in self.epoch_captures.items() if not n]
        self.epoch_capture_steps, self.epoch_captures = 0, dict.fromkeys(self.buffers, 0)
        return steps, (silent if steps else [])

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "buffers": {
                tap: (None if (views := buffer.recent()) is None else views.cpu())
                for tap, buffer in self.buffers.items()
            },
            "train_dropped": dict(self.dropped),
            "epoch_capture_steps": self.epoch_capture_steps,
            "epoch_train_captures": dict(self.epoch_captures),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: Any) -> None:
        self.batch_size = state.get("batch_size")
        for tap, views in state.get("buffers", {}).items():
            if tap in self.buffers:
                self.buffers[tap].chunks = [] if views is None else [views.to(device)]
        self.dropped.update({k: int(v) for k, v in state.get("train_dropped", {}).items() if k in self.dropped})
        self.epoch_capture_steps = int(state.get("epoch_capture_steps", 0))
        saved = state.get("epoch_train_captures", {})
        self.epoch_captures.update({k: int(v) for k, v in saved.items() if k in self.epoch_captures})
