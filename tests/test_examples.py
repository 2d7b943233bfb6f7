"""Every example in its fast mode, in-process, with its outputs under tmp_path: what each must show."""

import glob
import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("sklearn")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

import collapse_caught  # noqa: E402
import finetune_stopped  # noqa: E402
import hf_finetune_digits  # noqa: E402
import make_figures  # noqa: E402
import ssl_digits  # noqa: E402

pytestmark = pytest.mark.slow


def event_files(log_dir):
    return glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)


def scalar_tags(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


@pytest.mark.parametrize("example", [ssl_digits, collapse_caught, finetune_stopped, hf_finetune_digits, make_figures])
def test_help_explains_the_example(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--fast" in out and "--seed" in out
    assert example.__doc__.strip().splitlines()[0] in out


def test_main_job_prints_metrics_next_to_accuracies_and_logs_to_tensorboard(tmp_path, capsys):
    log_dir = tmp_path / "runs"
    result = ssl_digits.main(["--fast", "--log-dir", str(log_dir)])
    out = capsys.readouterr().out

    assert "5-shot linear probe accuracy" in out and "k-NN accuracy" in out and ssl_digits.CHECKPOINT_METRIC in out
    assert len(result["scores"]) == 3  # random init, best checkpoint, last epoch
    for scores in result["scores"].values():
        assert 0 <= scores["knn_accuracy"] <= 1 and 0 <= scores["probe_accuracy"] <= 1
        for tap in ("backbone", "projector"):
            for metric in ("rankme", "lidar", "alpha_req", "normalized_std", "uniformity", "alignment", "lid"):
                assert math.isfinite(scores[f"{tap}/{metric}"]), (tap, metric)
    # SSL helps the few-shot probe even in the fast mode's 5 epochs.
    init, *_, last = result["scores"].values()
    assert last["probe_accuracy"] > init["probe_accuracy"]

    (events,) = event_files(log_dir)
    tags = scalar_tags(events)
    assert {"repr/val/backbone/rankme", "repr/val/projector/lidar", "repr/train/projector/rankme"} <= tags

    # The checkpoint kept is the epoch with the best value of the metric it monitors.
    assert os.path.isfile(result["best_checkpoint"])
    values = [v for _, v in result["history"]["val/backbone/normalized_std"]]
    assert result["best_score"] == pytest.approx(max(values), rel=1e-6)
    assert result["best_epoch"] == values.index(max(values))


def test_collapse_is_caught_and_the_healthy_run_continues(tmp_path, capsys):
    result = collapse_caught.main(["--fast", "--log-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    args = collapse_caught.parse_args(["--fast"])
    threshold = args.min_fraction_of_dim * collapse_caught.EMBEDDING_DIM

    collapsing, healthy = result["collapsing"], result["healthy"]
    assert collapsing["stopped"] and collapsing["epochs_run"] < args.epochs
    assert collapsing["reason"].startswith(("Dimensional collapse", "Complete collapse"))
    assert collapse_caught.STOP_METRIC in collapsing["reason"] and collapsing["reason"] in out
    # Truly collapsed: the last `patience` values are all below the floor, and the normalised
    # embeddings have nearly lost their spread (1/sqrt(D) when even), unlike the healthy run's.
    ranks = [v for _, v in collapsing["history"]["val/projector/rankme"]]
    assert all(v < threshold for v in ranks[-args.patience :])
    spread = collapsing["history"]["val/projector/normalized_std"][-1][1]
    assert (
        spread < 0.25 * collapse_caught.EMBEDDING_DIM**-0.5 < healthy["history"]["val/projector/normalized_std"][-1][1]
    )

    assert not healthy["stopped"] and healthy["reason"] is None and healthy["epochs_run"] == args.epochs
    assert min(v for _, v in healthy["history"]["val/projector/rankme"]) > 1.25 * threshold
    assert "healthy run not stopped" in out
    for run in result.values():
        assert event_files(run["log_dir"])


def test_harmful_fine_tune_is_stopped_and_its_best_checkpoint_kept(tmp_path, capsys):
    result = finetune_stopped.main(["--fast", "--log-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    args = finetune_stopped.parse_args(["--fast"])

    assert result["stopped"] and result["epochs_run"] < args.epochs
    assert (
        result["reason"].startswith("Representation drift: CKA to the reference backbone") and result["reason"] in out
    )
    assert all(c < args.min_cka for c in result["cka"][-args.patience :])
    # The healthy fine-tune, with the same guard, runs to the end.
    healthy = result["healthy"]
    assert not healthy["stopped"] and healthy["epochs_run"] == args.epochs and min(healthy["cka"]) > args.min_cka

    path = result["best_checkpoint"]
    assert os.path.isfile(path)
    assert result["best_score"] == pytest.approx(max(result["ranks"]), rel=1e-6)
    # The file holds the best epoch's weights: recomputing the monitored metric from it gives the score.
    best = finetune_stopped.FineTuner.load_from_checkpoint(path, map_location="cpu")
    held_out = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            ssl_digits.digit_splits().held_out_images, ssl_digits.digit_splits().held_out_labels
        ),
        batch_size=250,
    )
    assert finetune_stopped.backbone_rankme(best, held_out) == pytest.approx(result["best_score"], rel=1e-4)
    assert event_files(result["log_dir"])


def test_hugging_face_trainer_fine_tune_is_stopped_and_the_healthy_one_is_not(tmp_path, capsys):
    pytest.importorskip("transformers")
    result = hf_finetune_digits.main(["--fast", "--log-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    args = hf_finetune_digits.parse_args(["--fast"])

    assert result["stopped"] and result["epochs_run"] < args.epochs
    assert (
        result["reason"].startswith("Representation drift: CKA to the reference backbone") and result["reason"] in out
    )
    assert all(c < args.min_cka for c in result["cka"][-args.patience :]) and len(result["cka"]) == result["epochs_run"]
    healthy = result["healthy"]
    assert not healthy["stopped"] and healthy["epochs_run"] == args.epochs and min(healthy["cka"]) > args.min_cka
    assert healthy["accuracy"][-1] > result["accuracy"][-1]
    # load_best_model_at_end kept the epoch with the best eval_accuracy (the least damaged one after the stop).
    for run in (result, healthy):
        assert run["best_metric"] == pytest.approx(max(run["accuracy"])) and os.path.isdir(run["best_checkpoint"])
        (events,) = event_files(run["log_dir"])
        assert {
            "eval/repr/backbone/cka_to_reference",
            "eval/repr/backbone/normalized_std",
            "eval/accuracy",
        } <= scalar_tags(events)


def test_make_figures_writes_the_readme_figure(tmp_path, capsys):
    result = make_figures.main(["--fast", "--out-dir", str(tmp_path)])
    (path,) = result["paths"]
    assert path == str(tmp_path / "collapse_curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 20_000
    assert result["runs"]["collapsing"]["stopped"] and not result["runs"]["healthy"]["stopped"]
    assert "wrote" in capsys.readouterr().out
