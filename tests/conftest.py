import ast
import glob
import os
import sys

import pytest
import torch

# tests/ helpers (ddp.py, references.py, _helpers/) import as top-level modules, in spawned processes too.
sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one intra-op thread each. With torch's default (a thread per core)
    # the workers' OpenMP and BLAS threads and the DDP pool's processes oversubscribe the cores: a test whose
    # ranks wait on each other ran 30x slower than alone, numpy SVDs 10x.
    torch.set_num_threads(1)
    try:  # numpy's BLAS (the references' SVDs) too
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _tests_on_the_ddp_pool(tests_dir: str) -> set[str]:
    """``tests/test_x.py::test_name`` of every test function whose body calls the DDP pool."""
    found = set()
    for path in sorted(glob.glob(os.path.join(tests_dir, "test_*.py"))):
        source = open(path, encoding="utf-8").read()
        if "run_distributed" not in source:
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if "run_distributed" in (ast.get_source_segment(source, node) or ""):
                    found.add(f"tests/{os.path.basename(path)}::{node.name}")
    return found


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (addopts), every test that runs on the DDP process pool goes to one worker, so a
    test run starts one pool (_helpers/ddp.py), not one per worker. xdist's own ``xdist_group`` marks do
    not group under pytest 9.2 (xdist 3.8 renames ``item._nodeid``, which pytest no longer reads), so the
    scheduler groups by node id itself."""
    from xdist.scheduler import LoadGroupScheduling

    ddp = _tests_on_the_ddp_pool(os.path.dirname(__file__))

    class DDPGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ddp" if nodeid.split("[")[0] in ddp else nodeid

    return DDPGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
