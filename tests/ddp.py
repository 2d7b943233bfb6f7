"""Run a function on both ranks of the test run's shared 2-process gloo group (see ``_helpers/ddp.py``)."""

from _helpers.ddp import RankFailed, run_distributed

__all__ = ["RankFailed", "run_distributed"]
