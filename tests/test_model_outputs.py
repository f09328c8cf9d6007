"""Whatever a model returns (a tensor, a Hugging Face ``ModelOutput``, a dataclass, a named tuple, a dict, a tuple
with auxiliary outputs), the default loss takes its logits, and every engine is exact against a float64 loop; an
output with no logits gets one error naming its type and what to pass. In the callback, a LightningModule returning
any of them (a Hugging Face model with padded dict batches included) gets every probe, exact; a loss every probe would
fail on (a mean, outputs without logits) is refused when training starts."""

import dataclasses
from typing import NamedTuple

import pytest
import torch
import transformers
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.gram import gradient_gram
from lightning_stiffness.gram.validation import logits_of
from lightning_stiffness.names import MODEL
from tests.helpers import trainer
from tests.models.hugging_face import _bert_like, _labels, _text
from tests.reference import reference_gradients, reference_gram


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class Pair(NamedTuple):
    features: torch.Tensor
    logits: torch.Tensor


class Net(nn.Module):
    """A small classifier returning its logits in the container ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body, self.head, self.aux = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits, aux = self.head(h), self.aux(h)
        return {
            "tensor": logits,
            "tuple": (logits, aux),
            "list": [logits, aux],
            "dict": {"aux": aux, "logits": logits},
            "dataclass": Output(logits, h),
            "namedtuple": Pair(h, logits),
            "model_output": transformers.modeling_outputs.SequenceClassifierOutput(logits=logits, hidden_states=(h,)),
        }[self.kind]


def _cross_entropy(outputs, targets):
    return F.cross_entropy(logits_of(outputs), targets, reduction="none")


@pytest.mark.parametrize("method", ["auto", "torch.func", "loop"])
@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "dataclass", "namedtuple", "model_output"])
def test_the_default_loss_takes_the_logits_of_any_container(kind, method):
    torch.manual_seed(0)
    model = Net(kind).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    logits = model.head(torch.tanh(model.body(x)))
    assert torch.equal(logits_of(model(x)), logits)
    expected = reference_gram(model, x, y, loss_fn=_cross_entropy)
    torch.testing.assert_close(gradient_gram(model, x, y, method=method), expected)


def test_a_hugging_face_classifier_runs_as_it_is_with_dict_batches():
    """No wrapper, no forward_fn, no loss_fn: the engine calls model(**batch) and takes ``.logits``."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**_bert_like(type_vocab_size=2, pad_token_id=0))
    ).eval()
    batch, y = _text(5), _labels(5)
    got = gradient_gram(model, batch, y)
    expected = reference_gram(model.double(), batch, y, loss_fn=_cross_entropy)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_an_output_without_logits_is_refused_with_its_type():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(5, 3)

        def forward(self, x):
            return {"features": self.body(x)}

    with pytest.raises(TypeError, match=r"returned dict, with no tensor of logits.*`loss_fn\(outputs, targets\)`"):
        gradient_gram(Features(), torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))


# --- in the callback: a LightningModule whose forward returns any container, and a Hugging Face model ---------------


class Items(Dataset):
    """Items ``{"input_ids": [L], "labels": int}`` of lengths 3 to 8 (ids >= 2), three classes."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = [
            {
                "input_ids": torch.randint(
                    2, 20, (int(torch.randint(3, 9, (1,), generator=generator)),), generator=generator
                ),
                "labels": torch.tensor(i % 3),
            }
            for i in range(size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad(items: list[dict]) -> dict:
    """A padding collate: ``input_ids`` and ``attention_mask`` [B, longest], ``labels`` [B]."""
    ids = nn.utils.rnn.pad_sequence([item["input_ids"] for item in items], batch_first=True, padding_value=0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.stack([i["labels"] for i in items])}


class HuggingFaceClassifier(LightningModule):
    """What Hugging Face users write: ``forward(**batch)`` returns the model's ``SequenceClassifierOutput``."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(**_bert_like(type_vocab_size=2, pad_token_id=0, vocab_size=20))
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        return F.cross_entropy(self(**batch).logits, labels)

    def validation_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        self.log("val_loss", F.cross_entropy(self(**batch).logits, labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Containers(LightningModule):
    """:class:`Net` (logits in the container ``kind``) trained on synthetic features."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = Net(kind)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(logits_of(self(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(logits_of(self(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _features(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=generator), torch.arange(n) % 3)


def _cosine(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    return (g_a / g_a.norm(dim=1, keepdim=True)) @ (g_b / g_b.norm(dim=1, keepdim=True)).T


def _assert_probe_exact(callback, module, forward_fn=None, atol=2e-5):
    """The last probe's cosine matrices against a float64 loop over the probe examples."""
    result, sets = callback.last_result, callback._probe_sets.sets
    assert result is not None and result.has_stiffness
    grads = {
        name: reference_gradients(module, p.inputs, p.labels, _cross_entropy, forward_fn=forward_fn, float64_copy=True)
        for name, p in sets.items()
    }
    for pair in result.pairs:
        rows, cols = pair.split("-")
        expected = _cosine(grads[rows], grads[cols])
        got = result.classes[pair]["cosine"][MODEL].stiffness.double()
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass", "namedtuple", "model_output"])
def test_a_module_returning_any_container_gets_every_probe(tmp_path, kind):
    torch.manual_seed(0)
    module = Containers(kind)
    callback = StiffnessCallback(samples_per_class=3, log_images=False, num_bootstrap=0)
    fit = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    fit.fit(module, DataLoader(_features(24, 0), batch_size=8), DataLoader(_features(12, 1), batch_size=6))
    assert callback.state_dict()["probes_done"] == 2  # at the start and at the end of the epoch
    assert sorted(callback.last_result.pairs) == ["train-train", "train-val", "val-val"]
    _assert_probe_exact(callback, module)


def test_a_hugging_face_model_in_a_lightning_module_with_padded_dict_batches(tmp_path):
    torch.manual_seed(0)
    module = HuggingFaceClassifier()
    callback = StiffnessCallback(samples_per_class=2, log_images=False, num_bootstrap=0)
    fit = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    train, val = DataLoader(Items(12, 0), batch_size=4, collate_fn=pad), DataLoader(Items(6, 1), 6, collate_fn=pad)
    fit.fit(module, train, val)
    assert callback.state_dict()["probes_done"] == 2
    _assert_probe_exact(callback, module, atol=1e-4)


class _MeanLoss:
    def __call__(self, outputs, targets):
        return F.cross_entropy(outputs, targets)  # reduction="mean": one number for the batch


@pytest.mark.parametrize(
    ("module", "callback_args", "message"),
    [
        (
            lambda: Containers("tensor"),
            {"loss_fn": nn.CrossEntropyLoss()},
            r'shape \[N\].*returned \(\).*reduction="none"',
        ),
        (lambda: Containers("tensor"), {"loss_fn": _MeanLoss()}, r'reduction="none"'),
        # A fixed-length output that equals one check's count: the other count gives it away.
        (
            lambda: Containers("tensor"),
            {"loss_fn": lambda out, y: torch.stack([F.cross_entropy(out, y), out.pow(2).mean()])},
            r"on 3 examples it returned \(2,\)",
        ),
        # A loss that cannot take the outputs (integer labels against [N, C] outputs): the same on every example.
        (
            lambda: Containers("tensor"),
            {"loss_fn": lambda out, y: (out - y).pow(2).sum(-1)},
            r"`loss_fn` cannot take the model's outputs \(\(2, 3\)\) and targets \(\(2,\), int64\): RuntimeError",
        ),
        # A loss class where an instance belongs, directly or as an import path; a module's path.
        (lambda: Containers("tensor"), {"loss_fn": nn.CrossEntropyLoss}, r"`loss_fn` is the class .*CrossEntropyLoss"),
        (lambda: Containers("tensor"), {"loss_fn": "torch.nn.MSELoss"}, r"`loss_fn` is the class .*MSELoss"),
        (lambda: Containers("tensor"), {"loss_fn": "torch.nn.functional"}, r"'torch.nn.functional' is a module"),
        (
            lambda: Containers("dict"),
            {"forward_fn": lambda m, x: {"features": m.net.body(x)}},
            r"returned dict, with no tensor of logits",
        ),
    ],
)
def test_a_loss_every_probe_would_fail_on_is_refused_when_training_starts(tmp_path, module, callback_args, message):
    # Refused by the constructor where the argument alone says so (a class), else when training starts.
    with pytest.raises(MisconfigurationException, match=r"StiffnessCallback: .*" + message):
        callback = StiffnessCallback(samples_per_class=2, log_images=False, **callback_args)
        fit = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2)
        fit.fit(module(), DataLoader(_features(12, 0), batch_size=4))
