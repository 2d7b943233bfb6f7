"""A Hugging Face Trainer run interrupted and resumed from a checkpoint gives what the uninterrupted run gives:
the callbacks' state (tracker clock, buffers and history; guards' counts, baseline and best values; the
stop reason) travels in the checkpoint's trainer_state.json (transformers' ExportableState)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from reprmetrics.callbacks.huggingface import CollapseEarlyStoppingCallback, RepresentationCallback  # noqa: E402
from test_huggingface import Encoder, Points, training_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from reprmetrics.monitor import MonitorConfigurationError  # noqa: E402
from reprmetrics.stopping import ssl_guard  # noqa: E402

# Training-stage values every 4 steps over 2 batches (128 samples), an evaluation every 5 steps, a checkpoint at
# step 11. The train-stage rule's baseline is its first value (step 4) and its 2nd collapsing check is at step 8:
# the 3rd, at step 16, stops. The SSL guard (evaluations at 5, 10, 15) counts without reaching its patience of 5:
# its counts and best values must travel through the checkpoint too. Step 12's value reads the samples of steps 11
# (before the interruption) and 12.
SAVE_STEP, STOP_STEP = 11, 16
TRAIN_KEY = "repr/train/encoder/normalized_std"


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """The process dies as the step after ``step`` begins (the checkpoint of ``step`` is on disk)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def callbacks(variant):
    if variant == "embedded":
        return [
            RepresentationCallback(
                ["encoder"],
                every_n_train_steps=4,
                train_buffer_size=128,
                log_figures=False,
                stop_on=[TRAIN_KEY, ssl_guard("encoder", warmup=1, patience=5)],
                max_relative_drop=0.5,
                patience=3,
            )
        ]
    monitor = RepresentationCallback(["encoder"], every_n_train_steps=4, train_buffer_size=128, log_figures=False)
    rules = (
        [TRAIN_KEY] if variant == "rebuilt" else [TRAIN_KEY, ssl_guard("encoder", warmup=1, patience=5)]
    )  # "rebuilt": JSON-only arguments
    return [
        CollapseEarlyStoppingCallback(rules, max_relative_drop=0.5, patience=3),
        monitor,
    ]  # the stopper first: order does not matter


def run(output, variant, interrupt=False, resume_from=None):
    torch.manual_seed(0)
    extra = [InterruptAt(SAVE_STEP)] if interrupt else []
    args = training_args(
        output,
        max_steps=40,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="steps",
        save_steps=SAVE_STEP,
        learning_rate=0.01,
        lr_scheduler_type="constant",
        restore_callback_states_from_checkpoint=variant == "rebuilt",
    )
    made = callbacks(variant)
    trainer = Trainer(
        model=Encoder("collapse"),
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=made + extra,
    )
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Interrupted:
        pass
    trainer.made = made
    return trainer


def ours(trainer):
    """The monitor and the stopper the trainer holds now (with restore_callback_states_from_checkpoint, rebuilt
    ones)."""
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RepresentationCallback))
    stopper = next(
        (c for c in trainer.callback_handler.callbacks if isinstance(c, CollapseEarlyStoppingCallback)), monitor.stopper
    )
    return monitor, stopper


def repr_entries(trainer):
    return [e for e in trainer.state.log_history if any("repr/" in key for key in e)]


def assert_same_entries(got, expected):
    assert [sorted(e) for e in got] == [sorted(e) for e in expected]
    for a, b in zip(got, expected):
        for key, value in b.items():
            assert a[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), key


@pytest.mark.parametrize("variant", ["split", "embedded", "rebuilt"])
def test_interrupted_and_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path, variant):
    # The spread is gone while RankMe keeps about 4 of 16 (above 0.15·D): collapse in progress, not complete.
    whole = run(tmp_path / "whole", variant)
    monitor, stopper = ours(whole)
    assert whole.state.global_step == stopper.stopped_step == STOP_STEP, stopper.stopping_reason
    assert (
        stopper.stopping_reason.startswith(f"Collapse in progress: {TRAIN_KEY.replace('/train', '')}")
        and "for 3 consecutive checks" in stopper.stopping_reason
    )

    interrupted = run(tmp_path / "parts", variant, interrupt=True)
    assert interrupted.state.global_step == SAVE_STEP and ours(interrupted)[1].stopping_reason is None
    resumed = run(tmp_path / "parts", variant, resume_from=str(tmp_path / "parts" / "out" / f"checkpoint-{SAVE_STEP}"))
    resumed_monitor, resumed_stopper = ours(resumed)
    # With restore_callback_states_from_checkpoint the Trainer replaced the callbacks by ones rebuilt from the
    # checkpoint (ExportableState.from_state); without, the callbacks made for the run restored themselves.
    assert (resumed_monitor in resumed.made) is (variant != "rebuilt")

    # The same stop, the same reason (its baseline is the step-4 value, from before the interruption) and the
    # same values: step 12's training-stage value read the buffer the checkpoint carried.
    assert resumed.state.global_step == resumed_stopper.stopped_step == STOP_STEP
    assert resumed_stopper.stopping_reason == stopper.stopping_reason
    assert_same_entries(repr_entries(resumed), repr_entries(whole))
    assert resumed_monitor.tracker.train_steps == monitor.tracker.train_steps
    assert resumed_monitor.tracker.history.keys() == monitor.tracker.history.keys()
    for key, values in monitor.tracker.history.items():
        assert [s for s, _ in resumed_monitor.tracker.history[key]] == [s for s, _ in values]
        assert [v for _, v in resumed_monitor.tracker.history[key]] == pytest.approx(
            [v for _, v in values], rel=1e-6, nan_ok=True
        ), key
    assert [r.state_dict() for _, r in resumed_stopper.rules] == [r.state_dict() for _, r in stopper.rules]


@pytest.mark.slow
def test_without_the_saved_state_the_resumed_run_differs_and_says_so(tmp_path):
    """The control: the same resume from a checkpoint that holds no state for these callbacks starts them afresh."""
    whole = run(tmp_path / "whole", "split")
    run(tmp_path / "parts", "split", interrupt=True)
    checkpoint = tmp_path / "parts" / "out" / f"checkpoint-{SAVE_STEP}"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert {"RepresentationCallback", "CollapseEarlyStoppingCallback"} <= set(state["stateful_callbacks"])
    for name in (
        "RepresentationCallback",
        "CollapseEarlyStoppingCallback",
    ):  # (the Trainer needs the entries to save again)
        state["stateful_callbacks"][name]["attributes"]["resume_state"]["identity"] = "another run's"
    state_file.write_text(json.dumps(state))
    with pytest.warns(RuntimeWarning, match="holds no state for it"):
        resumed = run(tmp_path / "parts", "split", resume_from=str(checkpoint))
    assert resumed.state.global_step != whole.state.global_step
    # Step 12: the buffer starts empty, so no training-stage value until it is full again.
    assert not any(e["step"] == 12 and "repr/encoder/rankme" in e for e in resumed.state.log_history)


def test_rebuilding_from_the_checkpoint_needs_arguments_json_can_hold(tmp_path):
    args = training_args(tmp_path, eval_strategy="no", restore_callback_states_from_checkpoint=True)
    with pytest.raises(
        MonitorConfigurationError,
        match=r"CollapseEarlyStoppingCallback: restore_callback_states_from_checkpoint=True.*stop_on",
    ):
        Trainer(
            model=Encoder(),
            args=args,
            train_dataset=Points(128, seed=0),
            callbacks=[
                RepresentationCallback(["encoder"]),
                CollapseEarlyStoppingCallback(ssl_guard("encoder", stage="train")),
            ],
        )
    with pytest.raises(
        MonitorConfigurationError, match=r"RepresentationCallback: .*its reference cannot be held in JSON"
    ):
        Trainer(
            model=Encoder(),
            args=args,
            train_dataset=Points(128, seed=0),
            callbacks=[RepresentationCallback(["encoder"], reference=Encoder())],
        )
