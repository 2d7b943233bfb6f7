"""Fine-tuning stopped: a harmful learning rate wrecks a pretrained encoder and is stopped; a sane one is not.

    python examples/finetune_stopped.py                      # pretrains here first (~20 s), then two fine-tunes
    python examples/finetune_stopped.py --pretrained runs/ssl_digits/version_0/checkpoints/last.ckpt
    python examples/finetune_stopped.py --lr 0.05 --healthy-lr 0   # one run at a sane learning rate
    python examples/finetune_stopped.py --fast               # a few seconds: the CI smoke run

An encoder pretrained with SimCLR on the digits (by examples/ssl_digits.py, or here) is fine-tuned
with a classification head on 10 labelled digits per class with SGD, first at a learning rate 20×
too high (1.0), then at a sane one (0.05), with the same guard: the settings recommended for
*supervised* fine-tuning. A RepresentationMonitor with ``reference="initial"`` logs the backbone's
linear CKA to the pretrained backbone on the 500 held-out digits every epoch; one
CollapseEarlyStopping stops when that CKA stays below 0.8 for 2 epochs (representation drift: the
fine-tune forgets what pretraining learned), another when normalised std falls below 0.25/√D
(complete collapse). RankMe is not a stopping signal here: in supervised fine-tuning it falls as the
representation becomes class-structured, in healthy runs too. A ModelCheckpoint on backbone RankMe
keeps the least damaged weights.

The held-out labels are used only to show what the metric was protecting: the accuracy of the
fine-tuned classifier, and a 5-shot linear probe of the backbone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits_ssl module

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from digits_ssl import (  # noqa: E402  (first: it quiets an import-time warning of Lightning)
    NUM_CLASSES,
    SimCLR,
    Stopwatch,
    augment,
    digit_splits,
    example_session,
    few_shot_probe_accuracy,
    format_table,
    make_trainer,
    metric_values,
    representation_metrics,
    train_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from reprmetrics.callbacks import CollapseEarlyStopping, RepresentationMonitor  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

MONITORED = "repr/val/backbone/rankme"  # what the checkpoint keeps the best of
DRIFT = "repr/val/backbone/cka_to_reference"
SPREAD = "repr/val/backbone/normalized_std"


class FineTuner(pl.LightningModule):
    """The pretrained backbone plus a linear head, trained with cross-entropy on augmented images.

    ``validation_step`` embeds the clean held-out images once (one forward call of the backbone:
    ``num_views=1``) and logs the classifier's accuracy on them; ``val_accuracies`` keeps one per epoch.
    """

    def __init__(self, lr: float, feature_dim: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = SimCLR(feature_dim=feature_dim).backbone  # weights loaded by the caller
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.lr = lr
        self.val_accuracies: list[float] = []
        self._correct = self._seen = 0

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.head(self.backbone(augment(images))), labels)
        self.log("finetune/train_loss", loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = self._seen = 0

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        images, labels = batch
        correct = self.head(self.backbone(images)).argmax(1) == labels
        self._correct += int(correct.sum())
        self._seen += len(labels)
        self.log("finetune/val_accuracy", correct.float().mean(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_accuracies.append(self._correct / self._seen)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained", default=None, help="a SimCLR checkpoint from ssl_digits.py (default: pretrain here)"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="SimCLR epochs when pretraining here (default 20; 5 with --fast)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 20; 6 with --fast)")
    parser.add_argument(
        "--lr", type=float, default=1.0, help="SGD learning rate (momentum 0.9) of the first run; 1.0 is harmful"
    )
    parser.add_argument(
        "--healthy-lr", type=float, default=0.05, help="learning rate of the second run, same guard (0: skip it)"
    )
    parser.add_argument(
        "--min-cka", type=float, default=0.8, help="stop when CKA to the pretrained backbone stays below this ..."
    )
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--patience", type=int, default=2, help="... for this many consecutive epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-dir", default="runs/finetune_stopped", help="TensorBoard logs and checkpoints go to LOG_DIR/version_N"
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="shorter pretraining and fine-tuning, fewer probe draws, no progress bar (CI)",
    )
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 5 if args.fast else 20
    if args.epochs is None:
        args.epochs = 6 if args.fast else 20
    args.probe_draws = 3 if args.fast else 10
    return args


def pretrained_encoder(args: argparse.Namespace, splits: Any) -> SimCLR:
    if args.pretrained:
        return SimCLR.load_from_checkpoint(args.pretrained, map_location="cpu")
    model = SimCLR()
    make_trainer(
        args.pretrain_epochs, [], logger=False, progress_bar=False, enable_checkpointing=False, limit_val_batches=0
    ).fit(model, train_loader(splits, 128))
    return model


def few_labels(splits: Any, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` labelled training images of each digit, drawn once."""
    rng = np.random.default_rng(seed)
    labels = splits.train_labels.numpy()
    chosen = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(NUM_CLASSES)]
    )
    return splits.train_images[chosen], splits.train_labels[chosen]


def backbone_rankme(model: FineTuner, loader: DataLoader) -> float:
    """The monitored value, computed the way the monitor computes it, outside a Trainer."""
    values = representation_metrics(
        model, loader, taps=("backbone",), num_views=1, forward=lambda batch: model.backbone(batch[0])
    )
    return values["backbone/rankme"]


def classifier_accuracy(model: FineTuner, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model.head(model.backbone(x)).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The harmful fine-tune's result, with the healthy one's under ``"healthy"`` (when run)."""
    args = parse_args(argv)
    with example_session():
        clock = Stopwatch()
        pl.seed_everything(args.seed, verbose=False)
        splits = digit_splits()
        pretrained = pretrained_encoder(args, splits)
        result = run(args, splits, pretrained, args.lr)
        if args.healthy_lr > 0:
            result["healthy"] = run(args, splits, pretrained, args.healthy_lr)
            summary = [
                {
                    "learning rate": r["lr"],
                    "epochs run": r["epochs_run"],
                    "stopped": "yes" if r["stopped"] else "no",
                    "last CKA to pretrained": r["cka"][-1],
                    "backbone RankMe vs pretrained": f"{r['ranks'][-1] / r['baseline'] - 1:+.0%}",
                    "5-shot probe (last)": r["comparison"][-1]["5-shot probe"],
                }
                for r in (result, result["healthy"])
            ]
            print(
                "\nThe same guard on both fine-tunes (CKA to the pretrained backbone >= "
                f"{args.min_cka} with patience {args.patience}; normalised std >= 0.25/√D):\n"
            )
            print(format_table(summary, list(summary[0])))
        print(f"{clock} in all.")
        return result


def run(args: argparse.Namespace, splits: Any, pretrained: SimCLR, lr: float) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    source = args.pretrained or f"SimCLR, {args.pretrain_epochs} epochs here"
    images, labels = few_labels(splits, args.labels_per_class, args.seed)
    train = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, drop_last=True)
    held_out = DataLoader(TensorDataset(splits.held_out_images, splits.held_out_labels), batch_size=250)

    model = FineTuner(lr=lr)
    model.backbone.load_state_dict(pretrained.backbone.state_dict())
    baseline = backbone_rankme(model, held_out)
    pretrained_probe = few_shot_probe_accuracy(model.backbone, splits, draws=args.probe_draws)[0]

    monitor = RepresentationMonitor(["backbone"], num_views=1, every_n_train_steps=0, reference="initial")
    drift = CollapseEarlyStopping(DRIFT, min_value=args.min_cka, patience=args.patience)
    dim = model.head.in_features
    spread = CollapseEarlyStopping(SPREAD, min_value=0.25 / dim**0.5, patience=1)  # complete collapse
    checkpoint = ModelCheckpoint(
        monitor=MONITORED, mode="max", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False
    )
    logger = TensorBoardLogger(args.log_dir, name="", default_hp_metric=False)
    trainer = make_trainer(args.epochs, [monitor, drift, spread, checkpoint], logger, progress_bar=not args.fast)
    trainer.fit(model, train, held_out)

    history = monitor.tracker.history
    ranks = metric_values(history, "val/backbone/rankme")
    ckas = metric_values(history, "val/backbone/cka_to_reference")
    stds = metric_values(history, "val/backbone/normalized_std")
    best = FineTuner.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
    best_epoch = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)["epoch"]
    reason = drift.stopping_reason_message or spread.stopping_reason_message

    print(f"\nFine-tuning the pretrained encoder ({source}) on {len(labels)} labels, SGD lr={lr}.")
    print(
        f"Stop when CKA to the pretrained backbone stays below {args.min_cka} for {args.patience} epochs, or"
        f" normalised std falls below 0.25/√D = {0.25 / dim**0.5:.3g}. Pretrained backbone RankMe:"
        f" {baseline:.2f}.\n"
    )
    rows = [
        {
            "epoch": epoch,
            "CKA to pretrained": cka,
            "normalised std": std,
            "backbone RankMe": rank,
            "RankMe vs pretrained": f"{rank / baseline - 1:+.0%}",
            "classifier accuracy": accuracy,
        }
        for epoch, (cka, std, rank, accuracy) in enumerate(zip(ckas, stds, ranks, model.val_accuracies))
    ]
    print(format_table(rows, list(rows[0])))
    if reason:
        print(f"\nStopped after {trainer.current_epoch} of {args.epochs} epochs. Reason:\n  {reason}")
    else:
        print(f"\nNot stopped: all {args.epochs} epochs ran.")
    print(f"\nBest checkpoint (ModelCheckpoint on {MONITORED}, mode='max'): {checkpoint.best_model_path}")
    print(f"  epoch {best_epoch}, backbone RankMe {float(checkpoint.best_model_score):.2f}\n")
    comparison = [
        {
            "encoder": "pretrained",
            "backbone RankMe": baseline,
            "classifier accuracy": None,
            "5-shot probe": pretrained_probe,
        },
        {
            "encoder": f"best checkpoint (epoch {best_epoch})",
            "backbone RankMe": backbone_rankme(best, held_out),
            "classifier accuracy": classifier_accuracy(best, held_out),
            "5-shot probe": few_shot_probe_accuracy(best.backbone, splits, draws=args.probe_draws)[0],
        },
        {
            "encoder": f"{'where it stopped' if reason else 'last'} (epoch {trainer.current_epoch - 1})",
            "backbone RankMe": ranks[-1],
            "classifier accuracy": classifier_accuracy(model, held_out),
            "5-shot probe": few_shot_probe_accuracy(model.backbone, splits, draws=args.probe_draws)[0],
        },
    ]
    print(format_table(comparison, list(comparison[0])))
    print("Accuracies on the 500 held-out digits, whose labels were used for nothing else.")
    print(f"TensorBoard: tensorboard --logdir {args.log_dir}")
    return {
        "lr": lr,
        "baseline": baseline,
        "ranks": ranks,
        "cka": ckas,
        "normalized_std": stds,
        "val_accuracies": model.val_accuracies,
        "stopped": reason is not None,
        "reason": reason,
        "epochs_run": trainer.current_epoch,
        "best_checkpoint": checkpoint.best_model_path,
        "best_score": float(checkpoint.best_model_score),
        "best_epoch": best_epoch,
        "comparison": comparison,
        "log_dir": logger.log_dir,
    }


if __name__ == "__main__":
    main()
