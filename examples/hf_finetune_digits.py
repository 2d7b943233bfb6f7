"""Hugging Face Trainer fine-tune guarded by RepresentationCallback: a harmful learning rate is stopped, a sane
one is not.

    python examples/hf_finetune_digits.py                 # pretrains here first (~20 s), then two fine-tunes
    python examples/hf_finetune_digits.py --pretrained runs/ssl_digits/version_0/checkpoints/last.ckpt
    python examples/hf_finetune_digits.py --fast          # a few seconds: the CI smoke run

The setting of examples/finetune_stopped.py, trained by ``transformers.Trainer`` instead of Lightning:
an encoder pretrained with SimCLR on the digits is fine-tuned with a linear head on 10 labelled digits
per class (SGD, momentum 0.9), first at a learning rate 20× too high (1.0), then at a sane one (0.05).
The model is a plain ``nn.Module`` whose forward returns ``{"loss": ..., "logits": ...}``: any such
module trains with the Trainer. One ``RepresentationCallback`` taps ``backbone`` with
``reference="initial"`` and stops on either of

- representation drift: ``eval_repr/backbone/cka_to_reference`` (linear CKA to the pretrained
  backbone on the 500 held-out digits) below 0.8 for 2 evaluations, or
- complete collapse: ``eval_repr/backbone/normalized_std`` below 0.25/√D;

TensorBoard receives every value (``eval/repr/backbone/...``) with the Trainer's own in one event file:
its ``TensorBoardCallback`` is listed after ``RepresentationCallback`` (``report_to="none"``), so its
``on_log`` sees the values the callback adds to the evaluation logs. (With ``report_to="tensorboard"``
the Trainer runs the integration before user callbacks, and the callback writes its values, spectrum
figures and histograms to that run folder itself, in an event file of its own.) The figures go to
``{log_dir}/lr_{lr}/figures`` as PNG files. ``load_best_model_at_end`` with
``metric_for_best_model="accuracy"`` (``compute_metrics`` on the held-out labels) loads the best
epoch's weights at the end: after a stop, the least damaged ones. A representation key works there too
(``metric_for_best_model="repr/backbone/rankme"``: the Trainer looks up ``eval_repr/backbone/rankme``),
but in supervised fine-tuning RankMe falls in healthy runs too, so it would pick the first epoch.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits modules

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from digits_ssl import (
    NUM_CLASSES,
    SimCLR,
    Stopwatch,
    augment,
    digit_splits,
    example_session,
    few_shot_probe_accuracy,
    format_table,
)  # noqa: E402
from finetune_stopped import few_labels, pretrained_encoder  # noqa: E402
from reprmetrics.callbacks.huggingface import RepresentationCallback  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DRIFT = "repr/eval/backbone/cka_to_reference"
SPREAD = "repr/eval/backbone/normalized_std"
BEST = "accuracy"  # metric_for_best_model: the Trainer looks up eval_accuracy


class DigitClassifier(nn.Module):
    """The pretrained backbone plus a linear head; trains on augmented images, evaluates on clean ones."""

    def __init__(self, backbone: nn.Module, feature_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.head(self.backbone(augment(images) if self.training else images))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Digits(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"images": self.images[i], "labels": self.labels[i]}


def evaluations(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per evaluation: the Trainer's entry with the callback's entries of the same evaluation (its
    values, a stop reason) merged in; the callback appends those right after the Trainer's own."""
    merged: list[dict[str, Any]] = []
    for entry in log_history:
        if "eval_loss" in entry:
            merged.append(dict(entry))
        elif merged and entry["step"] == merged[-1]["step"] and any(key.startswith("eval_") for key in entry):
            merged[-1].update(entry)
    return merged


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}


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
    parser.add_argument("--patience", type=int, default=2, help="... for this many consecutive evaluations (epochs)")
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-dir", default="runs/hf_finetune_digits", help="TensorBoard logs and checkpoints go to LOG_DIR/lr_<lr>"
    )
    parser.add_argument(
        "--fast", action="store_true", help="shorter pretraining and fine-tuning, fewer probe draws (CI)"
    )
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 5 if args.fast else 20
    if args.epochs is None:
        args.epochs = 6 if args.fast else 20
    args.probe_draws = 3 if args.fast else 10
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The harmful fine-tune's result, with the healthy one's under ``"healthy"`` (when run)."""
    args = parse_args(argv)
    with example_session():
        clock = Stopwatch()
        torch.manual_seed(args.seed)
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
                    "last normalised std": r["normalized_std"][-1],
                    "last accuracy": r["accuracy"][-1],
                    "best epoch (loaded)": r["best_epoch"],
                    "its 5-shot probe": r["probe"],
                }
                for r in (result, result["healthy"])
            ]
            print(
                f"\nThe same guard on both fine-tunes (CKA to the pretrained backbone >= {args.min_cka} with"
                f" patience {args.patience}; normalised std >= 0.25/√D):\n"
            )
            print(format_table(summary, list(summary[0])))
        print(f"{clock} in all.")
        return result


def run(args: argparse.Namespace, splits: Any, pretrained: SimCLR, lr: float) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    images, labels = few_labels(splits, args.labels_per_class, args.seed)
    model = DigitClassifier(SimCLR(feature_dim=pretrained.hparams.feature_dim).backbone)
    model.backbone.load_state_dict(pretrained.backbone.state_dict())
    dim = model.head.in_features
    pretrained_probe = few_shot_probe_accuracy(model.backbone, splits, draws=args.probe_draws)[0]

    callback = RepresentationCallback(
        ["backbone"],
        every_n_train_steps=0,
        reference="initial",
        stop_on={
            DRIFT: {"min_value": args.min_cka, "patience": args.patience},
            SPREAD: {"min_value": 0.25 / math.sqrt(dim), "patience": 1},
        },
    )
    output_dir = os.path.join(args.log_dir, f"lr_{lr:g}")
    training_args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=250,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # as the Lightning example: no clipping
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=BEST,
        greater_is_better=True,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
        seed=args.seed,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Digits(images, labels),
        eval_dataset=Digits(splits.held_out_images, splits.held_out_labels),
        compute_metrics=accuracy,
        optimizers=(optimizer, None),
        callbacks=[callback, TensorBoardCallback()],  # after the callback: it logs its values too
    )
    trainer.remove_callback(PrinterCallback)  # this example prints its own table
    trainer.train()

    evals = evaluations(trainer.state.log_history)
    ckas = [e["eval_repr/backbone/cka_to_reference"] for e in evals]
    stds = [e["eval_repr/backbone/normalized_std"] for e in evals]
    ranks = [e["eval_repr/backbone/rankme"] for e in evals]
    accuracies = [e["eval_accuracy"] for e in evals]
    epochs_run = int(round(trainer.state.epoch))
    reason = callback.stopping_reason

    print(f"\nHugging Face Trainer: fine-tuning the pretrained encoder on {len(labels)} labels, SGD lr={lr}.")
    print(
        f"Stop when CKA to the pretrained backbone stays below {args.min_cka} for {args.patience} evaluations,"
        f" or normalised std falls below 0.25/√D = {0.25 / math.sqrt(dim):.3g}.\n"
    )
    rows = [
        {
            "epoch": int(round(e["epoch"])),
            "eval_repr/backbone/cka_to_reference": c,
            "normalized_std": s,
            "rankme": r,
            "eval_accuracy": a,
        }
        for e, c, s, r, a in zip(evals, ckas, stds, ranks, accuracies)
    ]
    print(format_table(rows, list(rows[0])))
    if reason:
        print(
            f"\nStopped after {epochs_run} of {args.epochs} epochs (control.should_training_stop). Reason:\n  {reason}"
        )
    else:
        print(f"\nNot stopped: all {args.epochs} epochs ran.")
    best_step = trainer.state.best_global_step
    best_epoch = next(int(round(e["epoch"])) for e in evals if e["step"] == best_step)
    probe = few_shot_probe_accuracy(model.backbone, splits, draws=args.probe_draws)[0]
    print(
        f"load_best_model_at_end on eval_{BEST}: epoch {best_epoch} ({trainer.state.best_metric:.3f}) is loaded;"
        f" 5-shot probe of its backbone {probe:.3f} (pretrained: {pretrained_probe:.3f})."
    )
    print(f"TensorBoard: tensorboard --logdir {output_dir}")
    return {
        "lr": lr,
        "cka": ckas,
        "normalized_std": stds,
        "ranks": ranks,
        "accuracy": accuracies,
        "stopped": reason is not None,
        "reason": reason,
        "epochs_run": epochs_run,
        "best_metric": trainer.state.best_metric,
        "best_epoch": best_epoch,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "probe": probe,
        "pretrained_probe": pretrained_probe,
        "log_history": trainer.state.log_history,
        "log_dir": output_dir,
    }


if __name__ == "__main__":
    hf_logging.set_verbosity_warning()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    main()
