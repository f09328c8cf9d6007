"""Whatever a model returns (a tensor, a Hugging Face ``ModelOutput``, a dataclass, a named tuple, a dict, a tuple
with auxiliary outputs), the default loss takes its logits, and every engine is exact against a float64 loop; an
output with no logits gets one error naming its type and what to pass."""

import dataclasses
from typing import NamedTuple

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from lightning_stiffness.gram import gradient_gram
from lightning_stiffness.gram.validation import logits_of
from tests.hf_models import _bert_like, _labels, _text
from tests.reference import reference_gram


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
