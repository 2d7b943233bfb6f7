"""Bad input to evaluate() gets one clear ValueError before any large allocation, never a raw torch error."""

import numpy as np
import pytest
import torch

from reprmetrics import evaluate


@pytest.mark.parametrize(
    "embeddings, views, match",
    [
        (torch.randn(10, 0), None, "no features"),
        (torch.randn(0, 0), None, "no features"),
        (None, torch.randn(10, 1, 8), "at least 2 views"),
        (torch.randn(10, 8), torch.randn(10, 1, 8), "at least 2 views"),
        (torch.randn(10, 8).to_sparse(), None, "dense tensor"),
        (torch.empty(10, 8, device="meta"), None, "'meta' device"),
        (torch.randn(10, 8).to(torch.float8_e4m3fn), None, "float8.*not supported"),
        (torch.randn(10, 8, dtype=torch.complex64), None, "real-valued"),
    ],
    ids=["no-features", "empty", "one-view", "one-view-beside-embeddings", "sparse", "meta", "float8", "complex"],
)
def test_odd_inputs_raise_value_error_naming_the_input(embeddings, views, match):
    with pytest.raises(ValueError, match=f"^evaluate: .*{match}"):
        evaluate(embeddings, views=views)


@pytest.mark.parametrize(
    "device, match", [("bogus", "not a device"), ("meta", "holds no values"), ("cuda:7", "CUDA|device")]
)
def test_a_bad_device_is_a_value_error(device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=match):
        evaluate(torch.randn(10, 8), device=device)


def test_a_width_too_large_for_memory_is_refused_before_allocating():
    # 10 rows of width 100,000 that occupy 4 bytes (a zero-stride view): the D×D statistics would need ~1 TB.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=np.float32), shape=(10, 100_000), strides=(0, 0))
    with pytest.raises(
        ValueError, match=r"D = 100,000 .*needs about [\d,.]+ GB, more than .* available.*uniformity, lid"
    ):
        evaluate(huge)
    # The metrics that keep no D×D matrix are what the message offers, and they run.
    values = evaluate(huge, metrics=["normalized_std"])
    assert values["normalized_std"] == 0.0


def test_a_requested_metric_that_cannot_be_computed_raises_naming_it():
    with pytest.raises(ValueError, match="alpha_req"):
        evaluate(torch.randn(500, 8), metrics=["rankme", "alpha_req"])  # D = 8 < the fit range's 13


def test_batches_of_different_widths_get_an_error_naming_evaluate():
    with pytest.raises(
        ValueError, match=r"^evaluate: a batch of `embeddings` has 9 features but the batches before it have 8"
    ):
        evaluate([torch.randn(10, 8), torch.randn(10, 9)])
