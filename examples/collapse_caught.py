"""Collapse caught: SimSiam with and without its stop-gradient, side by side, on the bundled digits.

    python examples/collapse_caught.py           # ~30 s on a 2-core CPU
    python examples/collapse_caught.py --fast    # a few seconds: the CI smoke run
    tensorboard --logdir runs/collapse_caught    # both runs' curves side by side

Two runs with the same data, encoder, seed and schedule. The healthy one is SimSiam with its
predictor and the stop-gradient on the target branch. The other drops both: nothing in its loss
(the cosine similarity of two views' embeddings) then keeps different digits apart, and the
representation collapses over a few epochs. The projector's effective rank (RankMe) falls from
about 17 of 64 dimensions after the first epoch to about 3, and the per-dimension spread of the
normalised embeddings (the SimSiam paper's collapse indicator) towards 0.

A CollapseEarlyStopping on the held-out projector RankMe stops a run once it stays below a fraction
of the embedding width for a few consecutive epochs, and prints why. The healthy run goes on to
the end. The collapse is real and costly: left to run, the collapsing setting stays collapsed and
its backbone's few-shot probe accuracy falls while the healthy run's rises
(``python examples/make_figures.py`` draws both runs in full).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits_ssl module

import lightning.pytorch as pl  # noqa: E402
from digits_ssl import (  # noqa: E402  (first: it quiets an import-time warning of Lightning)
    SimSiam,
    Stopwatch,
    digit_splits,
    example_session,
    few_shot_probe_accuracy,
    format_table,
    make_trainer,
    metric_values,
    train_loader,
    validation_loader,
)
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor  # noqa: E402

STOP_METRIC = "repr/val/projector/rankme"
EMBEDDING_DIM = 64

RUNS = {
    # name: (description, SimSiam settings)
    "healthy": ("SimSiam: predictor + stop-gradient", {"stop_gradient": True, "predictor": True}),
    "collapsing": ("no predictor, no stop-gradient", {"stop_gradient": False, "predictor": False}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 8 with --fast)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (cosine schedule), both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-fraction-of-dim", type=float, default=0.2, help="stop when projector RankMe < this × 64 ..."
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="... for this many consecutive epochs (default 3; 2 with --fast)"
    )
    parser.add_argument(
        "--log-dir", default="runs/collapse_caught", help="TensorBoard logs: LOG_DIR/healthy, LOG_DIR/collapsing"
    )
    parser.add_argument("--fast", action="store_true", help="fewer epochs, shorter patience, no progress bar (CI)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 8 if args.fast else 30
    if args.patience is None:
        args.patience = 2 if args.fast else 3
    return args


def train_run(
    name: str, args: argparse.Namespace, stop: bool = True, log_dir: str | None = None, progress_bar: bool | None = None
) -> dict[str, Any]:
    """Train one of :data:`RUNS`; returns its monitor history, whether and why it was stopped, the model."""
    pl.seed_everything(args.seed, verbose=False)
    splits = digit_splits()
    model = SimSiam(lr=args.lr, **RUNS[name][1])
    monitor = RepresentationMonitor(
        ["backbone", "projector"], num_views=2, every_n_train_steps=20, train_buffer_size=512
    )
    callbacks: list[pl.Callback] = [monitor]
    stopper = None
    if stop:
        stopper = CollapseEarlyStopping(
            STOP_METRIC, min_fraction_of_dim=args.min_fraction_of_dim, patience=args.patience
        )
        callbacks.append(stopper)
    logger = TensorBoardLogger(log_dir, name=name, default_hp_metric=False) if log_dir else False
    progress_bar = not args.fast if progress_bar is None else progress_bar
    trainer = make_trainer(args.epochs, callbacks, logger, progress_bar=progress_bar, enable_checkpointing=False)
    trainer.fit(model, train_loader(splits, args.batch_size), validation_loader(splits))
    reason = stopper.stopping_reason_message if stopper is not None else None
    return {
        "name": name,
        "model": model,
        "history": monitor.tracker.history,
        "epochs_run": trainer.current_epoch,
        "stopped": reason is not None,
        "reason": reason,
        "probe_accuracy": few_shot_probe_accuracy(model.backbone, splits, draws=3 if args.fast else 10)[0],
        "log_dir": logger.log_dir if logger else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    clock = Stopwatch()
    with example_session():
        runs = {name: train_run(name, args, stop=True, log_dir=args.log_dir) for name in RUNS}

    threshold = args.min_fraction_of_dim * EMBEDDING_DIM
    rows = []
    for name, run in runs.items():
        rank = metric_values(run["history"], "val/projector/rankme")
        spread = metric_values(run["history"], "val/projector/normalized_std")
        rows.append(
            {
                "run": f"{name} ({RUNS[name][0]})",
                "epochs": f"{run['epochs_run']}/{args.epochs}",
                "stopped": "yes" if run["stopped"] else "no",
                "projector RankMe": f"{rank[0]:.1f} → {rank[-1]:.1f} (min {min(rank):.1f})",
                "normalised std": f"{spread[0]:.3f} → {spread[-1]:.3f}",
                "5-shot probe": run["probe_accuracy"],
            }
        )
    print(
        f"\nCollapseEarlyStopping({STOP_METRIC!r}, min_fraction_of_dim={args.min_fraction_of_dim},"
        f" patience={args.patience}):"
    )
    print(
        f"stop when the held-out projector RankMe stays below {threshold:.1f} of {EMBEDDING_DIM} dimensions."
        f" {clock} in all.\n"
    )
    print(format_table(rows, list(rows[0])))
    for name, run in runs.items():
        if run["stopped"]:
            print(f"\n{name} run stopped after {run['epochs_run']} epochs. Reason:\n  {run['reason']}")
        else:
            print(
                f"\n{name} run not stopped: it ran all {run['epochs_run']} epochs (its RankMe never stayed below"
                f" {threshold:.1f})."
            )
    print(
        "\nNormalised std: 1/sqrt(64) = 0.125 when the embeddings spread evenly, 0 when they all coincide.\n"
        "5-shot probe: backbone accuracy on the held-out labels (used for nothing else). Stopped early, the\n"
        "collapsing run's backbone has not lost much yet; left to run it loses ~6 points (make_figures.py).\n"
        f"TensorBoard: tensorboard --logdir {args.log_dir}"
    )
    return {name: {k: v for k, v in run.items() if k != "model"} for name, run in runs.items()}


if __name__ == "__main__":
    main()
