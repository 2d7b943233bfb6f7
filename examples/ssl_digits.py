"""Self-supervised training on the bundled handwritten digits, watched without labels.

    python examples/ssl_digits.py            # ~1 min on a 2-core CPU, no GPU, no download
    python examples/ssl_digits.py --fast     # a few seconds: the CI smoke run
    tensorboard --logdir runs/ssl_digits     # the curves, spectra and histograms it logged

SimCLR (a small MLP encoder, torch-only augmentations) learns the 8×8 digits that ship inside
scikit-learn. A RepresentationMonitor reads the backbone and the projector through forward hooks and
logs label-free representation metrics (RankMe, LiDAR, α-ReQ, normalised std, uniformity,
alignment, local intrinsic dimension) to TensorBoard: on training batches every few steps and on
two fixed augmented views of 500 held-out digits every epoch. A ModelCheckpoint keeps the epoch
with the best held-out representation metric.

At the end it prints those metrics next to what they are meant to predict: the accuracy of the
backbone on the held-out labels (a k-NN on every training label, and a 5-shot linear probe), for
the randomly initialised encoder, the best checkpoint and the last epoch. Labels are used for
nothing else.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits_ssl module

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits_ssl import (  # noqa: E402  (first: it quiets an import-time warning of Lightning)
    SimCLR,
    Stopwatch,
    digit_splits,
    example_session,
    format_table,
    make_trainer,
    metric_values,
    score,
    train_loader,
    validation_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from reprmetrics.callbacks import RepresentationMonitor  # noqa: E402

# On the digits a barely trained encoder has the highest rank (RankMe and LiDAR fall slightly as
# features specialise), so a max-RankMe checkpoint keeps epoch 1 or 2. The spread of the normalised
# backbone features rises while the encoder learns and falls if it collapses. Measured over 30-epoch
# runs at three learning-rate/temperature settings: the max-spread epoch's 5-shot probe was within
# 0.005 of the best epoch's; the max-RankMe epoch's was 0.02-0.03 below.
CHECKPOINT_METRIC = "repr/val/backbone/normalized_std"

METRIC_LABELS = {
    "rankme": "RankMe ↑",
    "lidar": "LiDAR ↑",
    "alpha_req": "α-ReQ (≈1 is good)",
    "normalized_std": "normalised std ↑",
    "uniformity": "uniformity ↓",
    "alignment": "alignment ↓",
    "lid": "local intrinsic dim.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 50; 5 with --fast)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (cosine schedule)")
    parser.add_argument("--temperature", type=float, default=0.2, help="SimCLR softmax temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-dir", default="runs/ssl_digits", help="TensorBoard logs and checkpoints go to LOG_DIR/version_N"
    )
    parser.add_argument("--fast", action="store_true", help="a few epochs, fewer probe draws, no progress bar (CI)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.fast else 50
    args.probe_draws = 3 if args.fast else 10
    return args


def summary_table(scores: dict[str, dict[str, float]]) -> str:
    columns = ["", *scores]
    rows: list[dict[str, Any]] = []
    for tap in ("backbone", "projector"):
        for metric, label in METRIC_LABELS.items():
            key = f"{tap}/{metric}"
            if any(key in s for s in scores.values()):
                rows.append({"": f"{tap:<9} {label}", **{name: s.get(key) for name, s in scores.items()}})
    rows.append({"": "k-NN accuracy (k=5, all 1297 labels)", **{name: s["knn_accuracy"] for name, s in scores.items()}})
    rows.append(
        {
            "": "5-shot linear probe accuracy",
            **{name: f"{s['probe_accuracy']:.3f} ± {s['probe_std']:.3f}" for name, s in scores.items()},
        }
    )
    return format_table(rows, columns)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with example_session():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = Stopwatch()
    pl.seed_everything(args.seed, verbose=False)
    splits = digit_splits()
    train, val = train_loader(splits, args.batch_size), validation_loader(splits)
    model = SimCLR(lr=args.lr, temperature=args.temperature)
    initial = copy.deepcopy(model)

    monitor = RepresentationMonitor(
        ["backbone", "projector"],  # submodule names: forward hooks read their outputs
        num_views=2,  # the two forward calls of each step are views 1 and 2 (LiDAR, alignment)
        every_n_train_steps=10 if args.fast else 20,
        train_buffer_size=512,
    )
    logger = TensorBoardLogger(args.log_dir, name="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(
        monitor=CHECKPOINT_METRIC,
        mode="max",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_last=True,
    )
    trainer = make_trainer(args.epochs, [monitor, checkpoint], logger, progress_bar=not args.fast)
    trainer.fit(model, train, val)
    train_time = str(clock)

    best_model = SimCLR.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
    best_epoch = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)["epoch"]
    scores = {
        "random init": score(initial, splits, val, args.probe_draws),
        f"best (epoch {best_epoch})": score(best_model, splits, val, args.probe_draws),
        f"last (epoch {trainer.current_epoch - 1})": score(model, splits, val, args.probe_draws),
    }

    backbone_ranks = metric_values(monitor.tracker.history, "val/backbone/rankme")
    max_rank_epoch = backbone_ranks.index(max(backbone_ranks))
    this_run = (
        f" (this run: epoch {max_rank_epoch} of {len(backbone_ranks)})"
        if max_rank_epoch < len(backbone_ranks) // 4
        else ""
    )
    print(f"\nSimCLR on the digits: {args.epochs} epochs trained in {train_time}, {clock} in all (seed {args.seed}).")
    print(
        f"Representation metrics on 2 fixed views of the {len(splits.held_out_labels)} held-out digits;"
        " accuracies of the backbone on their labels.\n"
    )
    print(summary_table(scores))
    print(
        f"\nBest checkpoint: {checkpoint.best_model_path}\n"
        f"  ModelCheckpoint(monitor={CHECKPOINT_METRIC!r}, mode='max') kept the epoch whose\n"
        f"  normalised backbone features are most spread out ({float(checkpoint.best_model_score):.4f}; 0 is"
        " complete collapse).\n"
        f"  Not RankMe: on the digits a barely trained encoder has the highest rank{this_run},\n"
        "  and rank falls a little as features specialise.\n"
        "Alignment alone rewards collapse: the random encoder 'aligns' views best because it separates little\n"
        "(see its uniformity). k-NN with every label scores ~0.95 even for a random encoder here; the 5-shot\n"
        f"probe (5 labels per class, mean ± std over {args.probe_draws} draws) is the accuracy that separates"
        " encoders.\n"
        f"TensorBoard: tensorboard --logdir {args.log_dir}"
    )
    return {
        "scores": scores,
        "best_checkpoint": checkpoint.best_model_path,
        "best_score": float(checkpoint.best_model_score),
        "best_epoch": best_epoch,
        "checkpoint_metric": CHECKPOINT_METRIC,
        "log_dir": logger.log_dir,
        "history": monitor.tracker.history,
        "epochs_run": trainer.current_epoch,
    }


if __name__ == "__main__":
    main()
