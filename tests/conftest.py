import os
import sys

import pytest
import torch

# tests/ helpers (ddp.py, references.py) import as top-level modules, in spawned processes too.
sys.path.insert(0, os.path.dirname(__file__))


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


@pytest.fixture
def hf_trainer(monkeypatch):
    """``transformers.Trainer`` as these tests need it: ``tests/datasets.py`` (a helper module on
    sys.path) shadows Hugging Face's ``datasets`` package, which the Trainer then takes for installed
    and probes (``datasets.Dataset``); tell it the package is absent, as it is here."""
    trainer_module = pytest.importorskip("transformers.trainer")
    import datasets

    if os.path.dirname(os.path.abspath(datasets.__file__)) == os.path.dirname(os.path.abspath(__file__)):
        monkeypatch.setattr(trainer_module, "is_datasets_available", lambda: False)
    return trainer_module.Trainer
