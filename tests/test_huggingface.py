"""The Hugging Face adapter in a real ``transformers.Trainer`` on CPU: tiny models from configs, random weights,
nothing downloaded."""

import ast
import glob
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from references import rankme_ref  # noqa: E402
from references_centred import normalized_std_ref  # noqa: E402
from references_similarity import linear_cka_ref  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from reprmetrics.callbacks.huggingface import RepresentationCallback, first_token  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from reprmetrics.monitor import MonitorConfigurationError, Tap  # noqa: E402

CALLBACKS = Path(__file__).resolve().parent.parent / "callbacks"


# ---- data and models ------------------------------------------------------------------------------
class Tokens(Dataset):
    """Random token ids; the label is whether the first token is in the upper half of the vocabulary."""

    def __init__(self, n, seed, length=12, vocab=100):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] >= vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Points(Dataset):
    """Gaussian points in 16-D with 4 classes given by the signs of two coordinates."""

    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=generator)
        self.labels = (self.x[:, 0] > 0).long() * 2 + (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return BertForSequenceClassification(config)


class Encoder(nn.Module):
    """Any ``nn.Module`` returning a loss trains with the Trainer. ``objective="collapse"`` turns every
    embedding towards the same direction (complete collapse); ``"classify"`` is a healthy
    cross-entropy fine-tune. With ``views=2`` the encoder runs on two noisy copies of the batch."""

    def __init__(self, objective="classify", views=1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)
        self.objective = objective
        self.views = views

    def forward(self, x, labels=None):
        zs = (
            [self.encoder(x + 0.1 * torch.randn_like(x)) for _ in range(self.views)]
            if self.views > 1
            else [self.encoder(x)]
        )
        z = zs[0]
        logits = self.head(z)
        if self.objective == "collapse":
            loss = 1 - F.normalize(z, dim=1).mean(0).pow(2).sum()  # 0 when every embedding points the same way
        elif self.objective == "diverge":
            loss = -z.pow(2).mean()  # unbounded below: with a large learning rate the weights overflow
        else:
            loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits, "embeddings": z}


def training_args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=64,
        per_device_eval_batch_size=128,
        learning_rate=5e-3,
        eval_strategy="epoch",
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def eval_logs(trainer):
    """The Trainer's evaluation entries of ``log_history``, each with the callbacks' entries of the same
    evaluation (values, stop reason: entries of their own, appended right after it) merged in."""
    merged = []
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            merged.append(dict(entry))
        elif merged and entry["step"] == merged[-1]["step"] and any(key.startswith("eval_") for key in entry):
            merged[-1].update(entry)
    return merged


@torch.no_grad()
def bert_outputs(model, dataset):
    """The pooler output and layer 1's first-token hidden state, computed outside the Trainer."""
    model.eval()
    out = model.bert(input_ids=dataset.ids, output_hidden_states=True)
    return out.pooler_output.double().numpy(), out.hidden_states[2][
        :, 0
    ].double().numpy()  # hidden_states[0]: the embeddings


# ---- logging --------------------------------------------------------------------------------------
def test_values_and_figures_reach_log_history_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_bert()
    eval_set = Tokens(256, seed=1)
    callback = RepresentationCallback(
        ["bert.pooler", Tap("bert.encoder.layer.1", reduce=first_token)], every_n_train_steps=4, train_buffer_size=128
    )
    args = training_args(tmp_path, num_train_epochs=2, report_to=["tensorboard"])
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(512, seed=0), eval_dataset=eval_set, callbacks=[callback]
    )
    trainer.train()

    # One evaluation log per epoch holds the eval loss and the representation metrics together.
    evals = eval_logs(trainer)
    assert len(evals) == 2
    for entry in evals:
        for tap in ("bert.pooler", "bert.encoder.layer.1"):
            for metric in ("rankme", "alpha_req", "normalized_std", "uniformity", "lid"):
                assert math.isfinite(entry[f"eval_repr/{tap}/{metric}"])
            assert entry[f"eval_repr/{tap}/num_samples"] == 256
    # The last evaluation ran on the final weights, over the whole evaluation set: an independent reference agrees.
    pooled, first_tokens = bert_outputs(model, eval_set)
    assert evals[-1]["eval_repr/bert.pooler/rankme"] == pytest.approx(rankme_ref(pooled), rel=1e-4)
    assert evals[-1]["eval_repr/bert.pooler/normalized_std"] == pytest.approx(normalized_std_ref(pooled), rel=1e-4)
    assert evals[-1]["eval_repr/bert.encoder.layer.1/rankme"] == pytest.approx(rankme_ref(first_tokens), rel=1e-4)

    # Training-stage values: every 4 steps, in entries of their own at that step.
    train_steps = [e["step"] for e in trainer.state.log_history if "repr/bert.pooler/rankme" in e]
    assert train_steps == [4, 8, 12, 16]

    # One TensorBoard run: the Trainer's own scalars and the callback's, which it writes itself (the
    # integration runs before user callbacks), with the spectrum figure and histograms at each evaluation.
    (run_dir,) = glob.glob(str(tmp_path / "out" / "runs" / "*"))
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("eval/loss")] == [e["step"] for e in evals]
    scalars = accumulator.Scalars("eval/repr/bert.pooler/rankme")
    assert [s.step for s in scalars] == [e["step"] for e in evals]
    assert [s.value for s in scalars] == pytest.approx([e["eval_repr/bert.pooler/rankme"] for e in evals], rel=1e-6)
    assert [s.step for s in accumulator.Scalars("train/repr/bert.encoder.layer.1/lid")] == train_steps
    for tap in ("bert.pooler", "bert.encoder.layer.1"):
        assert [i.step for i in accumulator.Images(f"eval/repr/{tap}/spectrum")] == [e["step"] for e in evals]
        for histogram in ("singular_values", "lid_per_sample"):
            assert [h.step for h in accumulator.Histograms(f"eval/repr/{tap}/{histogram}")] == [
                e["step"] for e in evals
            ]


@pytest.mark.gpu
def test_on_cuda_the_metrics_run_where_the_model_is(tmp_path):
    model = tiny_bert()
    eval_set = Tokens(256, seed=1)
    callback = RepresentationCallback(
        ["bert.pooler"], log_figures=False, every_n_train_steps=2, train_buffer_size=128, reference="initial"
    )
    args = training_args(tmp_path, num_train_epochs=1, use_cpu=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(256, seed=0), eval_dataset=eval_set, callbacks=[callback]
    )
    trainer.train()
    assert next(model.parameters()).is_cuda
    assert all(m.device.type == "cuda" for m in callback.tracker.metric_sets("val")["bert.pooler"].metrics.values())
    last = eval_logs(trainer)[-1]
    assert 0 < last["eval_repr/bert.pooler/cka_to_reference"] <= 1 + 1e-6
    pooled, _ = bert_outputs(model.cpu(), eval_set)
    assert last["eval_repr/bert.pooler/rankme"] == pytest.approx(rankme_ref(pooled), rel=1e-3)


def test_evaluate_alone_returns_the_values_and_drift_starts_at_one(tmp_path):
    model = Encoder()
    eval_set = Points(256, seed=1)
    callback = RepresentationCallback(["encoder"], log_figures=False, every_n_train_steps=0, reference="initial")
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=1),
        train_dataset=Points(512, seed=0),
        eval_dataset=eval_set,
        callbacks=[callback],
    )
    metrics = trainer.evaluate()
    assert metrics["eval_repr/encoder/cka_to_reference"] == pytest.approx(
        1.0, abs=1e-6
    )  # before training: the reference itself
    assert metrics["eval_repr/encoder/num_samples"] == 256
    initial = model.encoder(eval_set.x).detach().double().numpy()

    trainer.train()
    final = eval_logs(trainer)[-1]
    with torch.no_grad():
        model.eval()
        trained = model.encoder(eval_set.x).double().numpy()
    assert final["eval_repr/encoder/cka_to_reference"] == pytest.approx(linear_cka_ref(trained, initial), rel=1e-4)
    assert final["eval_repr/encoder/cka_to_reference"] < 1 - 1e-4


# ---- stopping -------------------------------------------------------------------------------------
FLOOR = (
    0.25 / 16**0.5 / 4
)  # a quarter of the normalised std of this encoder's embeddings at initialisation (about 0.045)


def collapse_run(tmp_path, objective, lr, caplog):
    model = Encoder(objective)
    callback = RepresentationCallback(
        ["encoder", "embeddings"],
        log_figures=False,
        every_n_train_steps=0,
        stop_on={"repr/eval/encoder/rankme": {}, "eval_repr/embeddings/normalized_std": {"min_value": FLOOR}},
        min_value=2.0,
        patience=2,
    )
    args = training_args(
        tmp_path, max_steps=100, eval_strategy="steps", eval_steps=5, learning_rate=lr, lr_scheduler_type="constant"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="reprmetrics.callbacks.huggingface"):
        trainer.train()
    return trainer, callback


def test_forced_collapse_stops_training_with_the_reason(tmp_path, caplog):
    trainer, callback = collapse_run(tmp_path, "collapse", lr=0.02, caplog=caplog)
    assert trainer.state.global_step < 100
    reason = callback.stopping_reason
    assert (
        reason.startswith("Complete collapse: eval_repr/embeddings/normalized_std")
        and "for 2 consecutive checks" in reason
    )
    assert "vs healthy 1/√D = 0.25" in reason and reason in caplog.text
    last = eval_logs(trainer)[-1]
    assert (
        last["eval_repr/stop_reason"] == reason and last["step"] == trainer.state.global_step == callback.stopped_step
    )
    spreads = [e["eval_repr/embeddings/normalized_std"] for e in eval_logs(trainer)]
    assert all(v < FLOOR for v in spreads[-2:]) and spreads[0] > FLOOR
    # A module tap and the output key holding the same embeddings give the same values.
    assert last["eval_repr/embeddings/rankme"] == pytest.approx(last["eval_repr/encoder/rankme"], rel=1e-6)


def test_healthy_run_is_not_stopped(tmp_path, caplog):
    trainer, callback = collapse_run(tmp_path, "classify", lr=0.02, caplog=caplog)
    assert trainer.state.global_step == 100 and callback.stopping_reason is None
    assert not any("stop_reason" in key for entry in trainer.state.log_history for key in entry)
    assert min(e["eval_repr/encoder/rankme"] for e in eval_logs(trainer)) > 2.0


def test_training_stage_key_stops_between_evaluations(tmp_path, caplog):
    model = Encoder("collapse")
    callback = RepresentationCallback(
        ["encoder"],
        log_figures=False,
        every_n_train_steps=5,
        train_buffer_size=128,
        stop_on="repr/train/encoder/normalized_std",
        min_value=FLOOR,
        patience=1,
    )
    args = training_args(tmp_path, max_steps=100, eval_strategy="no", learning_rate=0.02, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=Points(512, seed=0), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="reprmetrics.callbacks.huggingface"):
        trainer.train()
    assert trainer.state.global_step < 100 and trainer.state.global_step % 5 == 0
    entry = next(e for e in trainer.state.log_history if "repr/stop_reason" in e)
    values = next(
        e for e in trainer.state.log_history if "repr/encoder/normalized_std" in e and e["step"] == entry["step"]
    )
    assert entry["step"] == trainer.state.global_step and values["repr/encoder/normalized_std"] < FLOOR
    # The spread is gone; "complete" needs the rank gone too (RankMe below 0.15·D), else it is in progress.
    label = "Complete collapse" if values["repr/encoder/rankme"] < 0.15 * 16 else "Collapse in progress"
    assert entry["repr/stop_reason"] == callback.stopping_reason and callback.stopping_reason.startswith(
        f"{label}: repr/encoder/normalized_std"
    )
    assert callback.stopping_reason in caplog.text


@pytest.mark.filterwarnings("ignore:.*divergence.*", "ignore:.*non-finite.*")
def test_divergence_stops_at_once_and_says_so(tmp_path):
    model = Encoder("diverge")
    callback = RepresentationCallback(
        ["encoder"],
        log_figures=False,
        every_n_train_steps=0,
        stop_on="repr/eval/encoder/rankme",
        min_value=1.0,
        patience=5,
    )
    args = training_args(
        tmp_path, max_steps=100, eval_strategy="steps", eval_steps=2, learning_rate=1e4, optim="sgd", max_grad_norm=0.0
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    trainer.train()
    last = eval_logs(trainer)[-1]
    assert (
        trainer.state.global_step < 100
        and last["eval_repr/encoder/nonfinite_fraction"] > 0
        and math.isnan(last["eval_repr/encoder/rankme"])
    )
    assert callback.stopping_reason.startswith(
        "Divergence: tap encoder produced non-finite embeddings"
    )  # patience does not apply


def test_training_with_and_without_the_callback_gives_identical_weights(tmp_path):
    def train(callbacks):
        model = tiny_bert()
        args = training_args(tmp_path / str(len(callbacks)), num_train_epochs=2, gradient_accumulation_steps=2)
        Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(512, seed=0),
            eval_dataset=Tokens(128, seed=1),
            callbacks=callbacks,
        ).train()
        return model.state_dict()

    plain = train([])
    watched = train(
        [
            RepresentationCallback(
                ["bert.pooler"], log_figures=False, every_n_train_steps=2, train_buffer_size=128, reference="initial"
            )
        ]
    )
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name


def test_metric_for_best_model_keeps_the_best_checkpoint_by_a_repr_key(tmp_path):
    model = Encoder("classify")
    eval_set = Points(256, seed=1)
    callback = RepresentationCallback(["encoder"], log_figures=False, every_n_train_steps=0)
    args = training_args(
        tmp_path,
        max_steps=40,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="steps",
        save_steps=10,
        learning_rate=0.3,
        optim="sgd",
        load_best_model_at_end=True,
        metric_for_best_model="repr/encoder/rankme",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Points(512, seed=0), eval_dataset=eval_set, callbacks=[callback]
    )
    trainer.train()
    ranks = {e["step"]: e["eval_repr/encoder/rankme"] for e in eval_logs(trainer)}
    best_step = max(ranks, key=ranks.get)
    assert trainer.state.best_metric == pytest.approx(ranks[best_step]) and trainer.state.best_global_step == best_step
    # The weights loaded at the end are the best checkpoint's: their RankMe, recomputed independently, is the best
    # value.
    with torch.no_grad():
        model.eval()
        z = model.encoder(eval_set.x).double().numpy()
    assert rankme_ref(z) == pytest.approx(ranks[best_step], rel=1e-4)


def test_gradient_accumulation_with_views_one_tracker_step_per_micro_batch(tmp_path):
    model = Encoder("classify", views=2)
    callback = RepresentationCallback(
        ["encoder"], num_views=2, view_layout="calls", log_figures=False, every_n_train_steps=4, train_buffer_size=64
    )
    args = training_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=32, gradient_accumulation_steps=2)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Points(512, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    trainer.train()
    # 16 micro-batches of 32: every 4 micro-batches (2 optimizer steps), over the 2 most recent micro-batches,
    # the first time too (the buffer fills before the first computation).
    train_entries = [e for e in trainer.state.log_history if "repr/encoder/num_samples" in e]
    assert [e["step"] for e in train_entries] == [2, 4, 6, 8]
    assert [e["repr/encoder/num_samples"] for e in train_entries] == [64, 64, 64, 64]
    assert [e["step"] for e in train_entries if "repr/encoder/lidar" in e] == [2, 4, 6, 8]
    assert math.isfinite(eval_logs(trainer)[-1]["eval_repr/encoder/lidar"])


# ---- misconfiguration -------------------------------------------------------------------------------
def test_misspelt_tap_raises_with_the_closest_names_at_the_first_step(tmp_path):
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path, num_train_epochs=1),
        train_dataset=Tokens(256, seed=0),
        eval_dataset=Tokens(128, seed=1),
        callbacks=[RepresentationCallback(["bert.poolr"], every_n_train_steps=0)],
    )
    with pytest.raises(MonitorConfigurationError, match=r"'bert.poolr'.*closest submodules: 'bert.pooler'") as raised:
        trainer.train()
    assert "output keys seen: 'logits', 'loss'" in str(raised.value)
    assert trainer.state.global_step <= 1


def test_stop_on_keys_are_checked(tmp_path):
    with pytest.raises(MonitorConfigurationError, match=r"did you mean repr/eval/bert.pooler/rankme"):
        RepresentationCallback(["bert.pooler"], stop_on="repr/eval/bert.poolr/rankme", min_value=2)
    with pytest.raises(MonitorConfigurationError, match=r"repr/eval/\{tap\}/\{metric\}"):
        RepresentationCallback(["bert.pooler"], stop_on="repr/bert.pooler/rankme", min_value=2)
    with pytest.raises(MonitorConfigurationError, match="lower-is-healthier"):
        RepresentationCallback(["bert.pooler"], stop_on="eval_repr/bert.pooler/uniformity", min_value=2)
    with pytest.raises(MonitorConfigurationError, match="no `stop_on`"):
        RepresentationCallback(["bert.pooler"], min_value=2)
    with pytest.raises(MonitorConfigurationError, match="eval_strategy='no'"):
        Trainer(
            model=tiny_bert(),
            args=training_args(tmp_path, eval_strategy="no"),
            train_dataset=Tokens(128, seed=0),
            callbacks=[RepresentationCallback(["bert.pooler"], stop_on="repr/eval/bert.pooler/rankme", min_value=2)],
        )
    # A metric name the tracker does not compute: at the first evaluation, with the names it does compute.
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path, num_train_epochs=1),
        train_dataset=Tokens(128, seed=0),
        eval_dataset=Tokens(128, seed=1),
        callbacks=[
            RepresentationCallback(
                ["bert.pooler"], every_n_train_steps=0, stop_on="repr/eval/bert.pooler/rankmee", min_value=2
            )
        ],
    )
    with pytest.raises(MonitorConfigurationError, match=r"closest: `repr/eval/bert.pooler/rankme`"):
        trainer.train()


# ---- packaging --------------------------------------------------------------------------------------
@pytest.mark.slow  # two fresh interpreters
def test_adapters_need_only_their_own_framework():
    hf_only = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import reprmetrics.callbacks.huggingface"
    )
    assert subprocess.run([sys.executable, "-c", hf_only], capture_output=True, text=True).returncode == 0
    # The Lightning adapter imports nothing of transformers (torchmetrics itself imports transformers when it is
    # installed, so blocking the package in a subprocess would test torchmetrics, not us).
    for name in ("__init__", "representation_monitor", "collapse_early_stopping"):
        tree = ast.parse((CALLBACKS / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "transformers" or m.endswith("huggingface") for m in imported), name
    # reprmetrics.monitor imports torchmetrics (which imports transformers when installed) before the block;
    # `import reprmetrics` alone no longer does: it loads its Metric classes lazily.
    missing = (
        "import sys, reprmetrics.monitor\nsys.modules['transformers'] = None\nimport reprmetrics.callbacks.huggingface"
    )
    result = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True)
    assert result.returncode != 0 and 'pip install "reprmetrics[huggingface]"' in result.stderr


# ---- sentence-transformers ----------------------------------------------------------------------------
SENTENCE_TRANSFORMERS_RUN = r"""
import json, os, random, string, sys
sys.path.append(sys.argv[2])  # tests/: the references
import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertModel, BertTokenizerFast
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
try:
    from sentence_transformers.sentence_transformer import losses, modules
except ImportError:  # sentence-transformers < 5.3
    from sentence_transformers import losses, models as modules
from references import rankme_ref
from reprmetrics.callbacks.huggingface import RepresentationCallback
from reprmetrics.monitor import Tap

root = sys.argv[1]
words = [a + b for a in "abcdef" for b in string.ascii_lowercase][:60]
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})  # built here: nothing downloaded
torch.manual_seed(0)
config = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=len(vocab),
    max_position_embeddings=32,
)
BertModel(config).save_pretrained(root)
tokenizer.save_pretrained(root)
transformer = modules.Transformer(root)
model = SentenceTransformer(
    modules=[transformer, modules.Pooling(transformer.get_word_embedding_dimension(), "mean")], device="cpu"
)

rng = random.Random(0)
def sentences(n):
    return [" ".join(rng.choice(words) for _ in range(6)) for _ in range(n)]
train = Dataset.from_dict({"anchor": sentences(256), "positive": sentences(256)})
evaluation = Dataset.from_dict({"anchor": sentences(128), "positive": sentences(128)})
# The Pooling module (submodule "1") returns the features dict: its sentence embeddings are the tap.
# The loss embeds anchor and positive with two forward calls: views 1 and 2.
callback = RepresentationCallback(
    [Tap("1", reduce=lambda features: features["sentence_embedding"])], num_views=2, view_layout="calls",
    log_figures=False, every_n_train_steps=0,
    stop_on="repr/eval/1/rankme", min_value=1000.0, patience=2,  # an impossible floor: stops at the 2nd evaluation
)
args = SentenceTransformerTrainingArguments(
    output_dir=os.path.join(root, "out"), max_steps=40, eval_strategy="steps", eval_steps=8,
    per_device_train_batch_size=32, per_device_eval_batch_size=64, save_strategy="no", report_to="none", use_cpu=True,
    disable_tqdm=True, seed=0,
)
trainer = SentenceTransformerTrainer(
    model=model, args=args, train_dataset=train, eval_dataset=evaluation,
    loss=losses.MultipleNegativesRankingLoss(model), callbacks=[callback],
)
trainer.train()
last = {}
for entry in trainer.state.log_history:  # the last evaluation: the Trainer's entry, then the callback's
    if "eval_loss" in entry:
        last = dict(entry)
    elif entry.get("step") == last.get("step") and any(key.startswith("eval_") for key in entry):
        last.update(entry)
anchors = model.encode(evaluation["anchor"], convert_to_numpy=True).astype(np.float64)
print(json.dumps({
    "last": last, "reference_rankme": rankme_ref(anchors), "global_step": trainer.state.global_step,
    "reason": callback.stopping_reason,
}))
"""


@pytest.mark.slow
def test_sentence_transformers_trainer_offline(tmp_path):
    import importlib.metadata
    import json

    # Run in a fresh interpreter: sentence-transformers and datasets stay out of the test process.
    for distribution in ("sentence-transformers", "datasets"):
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed")

    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", SENTENCE_TRANSFORMERS_RUN, str(tmp_path), tests_dir],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    last = out["last"]
    assert last["eval_repr/1/num_samples"] == 128
    for metric in ("rankme", "normalized_std", "lidar", "alignment", "uniformity"):
        assert math.isfinite(last[f"eval_repr/1/{metric}"])
    # Evaluation-stage values are over the anchors (view 1) of the whole evaluation set: encode() agrees.
    assert last["eval_repr/1/rankme"] == pytest.approx(out["reference_rankme"], rel=1e-4)
    # control.should_training_stop stops sentence-transformers' trainer too: at the 2nd evaluation, step 16 of 40.
    assert (
        out["global_step"] == 16
        and "ollapse" in out["reason"]
        and "eval_repr/1/rankme = " in out["reason"]
        and "below the floor 1000" in out["reason"]
    )
    assert last["eval_repr/stop_reason"] == out["reason"]


def test_ssl_guard_preset_stops_a_collapse_and_not_a_healthy_run(tmp_path, caplog):
    from reprmetrics.stopping import ssl_guard

    def run(objective):
        callback = RepresentationCallback(
            ["encoder"], log_figures=False, every_n_train_steps=0, stop_on=ssl_guard("encoder", patience=2)
        )
        args = training_args(
            tmp_path / objective,
            max_steps=60,
            eval_strategy="steps",
            eval_steps=5,
            learning_rate=0.02,
            lr_scheduler_type="constant",
        )
        trainer = Trainer(
            model=Encoder(objective),
            args=args,
            train_dataset=Points(512, seed=0),
            eval_dataset=Points(256, seed=1),
            callbacks=[callback],
        )
        with caplog.at_level(logging.WARNING, logger="reprmetrics.callbacks.huggingface"):
            trainer.train()
        return trainer, callback

    trainer, callback = run("collapse")
    assert trainer.state.global_step < 60 and callback.stopping_reason is not None
    assert "RankMe" in callback.stopping_reason and "normalized std" in callback.stopping_reason
    assert eval_logs(trainer)[-1]["eval_repr/stop_reason"] == callback.stopping_reason
    trainer, callback = run("classify")
    assert trainer.state.global_step == 60 and callback.stopping_reason is None
    with pytest.raises(MonitorConfigurationError, match="names tap 'encodr'.*did you mean 'encoder'"):
        RepresentationCallback(["encoder"], stop_on=ssl_guard("encodr"))


def test_guide_lists_every_metric_the_callback_logs(tmp_path):
    import inspect
    import re

    from reprmetrics.registry import available_metrics

    guide = (Path(__file__).parents[1] / "docs" / "guide" / "huggingface.md").read_text()
    section = guide.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    default_part, opt_in_part = section.split("opt-in", 1)
    specs = available_metrics()
    assert {name for name, spec in specs.items() if spec.default} <= set(re.findall(r"`(\w+)`", default_part))
    assert {name for name, spec in specs.items() if not spec.default} <= set(re.findall(r"`(\w+)`", opt_in_part))
    listed = set(re.findall(r"`(\w+)`", section)) - set(
        inspect.signature(RepresentationCallback).parameters
    )  # names, not options
    # With views, a reference, RankMe's diagnostics and every opt-in metric, an evaluation logs exactly what is listed.
    callback = RepresentationCallback(
        ["encoder"],
        num_views=2,
        view_layout="calls",
        every_n_train_steps=0,
        reference="initial",
        rankme_diagnostics=True,
        metrics=[name for name, spec in specs.items() if not spec.default],
        log_figures=False,
    )
    args = training_args(tmp_path, num_train_epochs=1)
    trainer = Trainer(
        model=Encoder(views=2),
        args=args,
        train_dataset=Points(128, seed=0),
        eval_dataset=Points(256, seed=1),
        callbacks=[callback],
    )
    logged = {key.rsplit("/", 1)[1] for key in trainer.evaluate() if key.startswith("eval_repr/encoder/")}
    assert logged == listed


def test_stopping_callback_acts_on_the_monitor_of_its_prefix_only_while_training(tmp_path, caplog):
    from reprmetrics.callbacks.huggingface import CollapseEarlyStoppingCallback

    def trainer_with(*callbacks, **overrides):
        args = training_args(tmp_path, max_steps=20, eval_strategy="steps", eval_steps=5, **overrides)
        return Trainer(
            model=Encoder(),
            args=args,
            train_dataset=Points(512, seed=0),
            eval_dataset=Points(256, seed=1),
            callbacks=list(callbacks),
        )

    # Listed before the monitor, found through the model and the prefix: an impossible floor stops at the first
    # evaluation of training; an evaluate() before training is not a check.
    stop = CollapseEarlyStoppingCallback("eval_repr/encoder/rankme", min_value=1e3, patience=1)
    trainer = trainer_with(stop, RepresentationCallback(["encoder"], every_n_train_steps=0, log_figures=False))
    assert "eval_repr/stop_reason" not in trainer.evaluate() and stop.stopping_reason is None
    with caplog.at_level(logging.WARNING, logger="reprmetrics.callbacks.huggingface"):
        trainer.train()
    assert trainer.state.global_step == stop.stopped_step == 5 and stop.stopping_reason in caplog.text
    assert (
        eval_logs(trainer)[-1]["eval_repr/stop_reason"] == stop.stopping_reason
        and "below the floor 1000" in stop.stopping_reason
    )

    # No monitor with its prefix, or a tap the monitor lacks: raised before the first step.
    with pytest.raises(
        MonitorConfigurationError,
        match=r"no RepresentationCallback with prefix 'repr'.*RepresentationCallback\(\['encoder'\]\)",
    ):
        trainer_with(
            CollapseEarlyStoppingCallback("repr/eval/encoder/rankme", min_value=1.0),
            RepresentationCallback(["encoder"], prefix="other"),
        ).train()
    with pytest.raises(MonitorConfigurationError, match=r"names tap 'encodr'.*did you mean repr/eval/encoder/rankme"):
        trainer_with(
            CollapseEarlyStoppingCallback("repr/eval/encodr/rankme", min_value=1.0), RepresentationCallback(["encoder"])
        ).train()
