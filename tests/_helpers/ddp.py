"""One 2-process gloo group per test run, reused by every DDP test (spawning one per test cost ~4 s each).

``run_distributed(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank of the pool and
returns the ranks' results. ``fn`` must be a module-level function (it is pickled to the workers).
A task that raises on a rank raises :class:`RankFailed` here; a task that hangs (a collective one rank
never joins) or kills a worker raises too, and the pool is rebuilt for the next task, so one broken
test cannot take the others down.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TASK_TIMEOUT_S = 180


class RankFailed(RuntimeError):
    """A task raised on a rank (the rank's traceback is in the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> None:
    # The variables Lightning reads to join a group whose processes were launched externally.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
    )
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=TASK_TIMEOUT_S)
    )


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    torch.set_num_threads(1)
    _join(rank, world_size, port)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, rejoin_port = task
        if not dist.is_initialized():  # a task (e.g. a failed Lightning fit) tore the group down
            _join(rank, world_size, rejoin_port)
        try:
            torch.manual_seed(0)
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, False, traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


class DDPPool:
    def __init__(self, world_size: int = 2) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        port = _free_port()
        self.workers = [
            context.Process(target=_serve, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for worker in self.workers:
            worker.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT_S) -> list[Any]:
        rejoin_port = _free_port()
        for q in self.tasks:
            q.put((fn, args, rejoin_port))
        out: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(failures) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, w in enumerate(self.workers) if not w.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(force=True)
                    why = (
                        f"rank(s) {dead} died (exit codes {[self.workers[r].exitcode for r in dead]})"
                        if dead
                        else f"no answer within {timeout:.0f} s (a hang)"
                    )
                    raise RankFailed(
                        f"{fn.__name__}: {why}; results so far: {sorted(out)}; failures: {failures}"
                    ) from None
                continue
            (out if ok else failures)[rank] = value
        if failures:
            raise RankFailed(
                "\n".join(f"{fn.__name__} failed on rank {r}:\n{tb}" for r, tb in sorted(failures.items()))
            )
        return [out[r] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(w.is_alive() for w in self.workers)

    def close(self, force: bool = False) -> None:
        for q, worker in zip(self.tasks, self.workers):
            if worker.is_alive() and not force:
                q.put(None)
        for worker in self.workers:
            worker.join(timeout=0 if force else 10)
            if worker.is_alive():
                worker.kill()
                worker.join()


_POOL: DDPPool | None = None


def pool() -> DDPPool:
    global _POOL
    if _POOL is None or not _POOL.alive():
        if _POOL is not None:
            _POOL.close(force=True)
        _POOL = DDPPool()
    return _POOL


def run_distributed(fn: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT_S) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on both ranks of the shared gloo group; return the results.

    The group is always initialised, with the environment a Lightning ``Trainer(strategy="ddp")``
    reads to join it (Lightning then uses the existing group).
    """
    global _POOL
    try:
        return pool().run(fn, *args, timeout=timeout)
    except RankFailed:
        if _POOL is not None and not _POOL.alive():
            _POOL = None
        raise


@atexit.register
def _close_pool() -> None:
    if _POOL is not None:
        _POOL.close()
