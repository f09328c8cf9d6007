"""Embeddings with sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``, a functional
``F.embedding(..., sparse=True)``): every engine exact against a float64 loop over a dense copy, the flags kept."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_stiffness.gram import gradient_gram
from tests.reference import reference_gram

VOCAB, DIM, CLASSES = 20, 4, 3


class Lookup(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "embedding":
            self.table = nn.Embedding(VOCAB, DIM, sparse=True, padding_idx=0)
        elif kind.startswith("bag"):
            self.table = nn.EmbeddingBag(VOCAB, DIM, sparse=True, mode=kind.split("-")[1])
        else:
            self.weight = nn.Parameter(torch.randn(VOCAB, DIM))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids):
        if self.kind == "embedding":
            h = self.table(ids).mean(1)
        elif self.kind.startswith("bag"):
            h = self.table(ids)
        else:
            h = F.embedding(ids, self.weight, sparse=True).sum(1)
        return self.head(torch.tanh(h))


def _dense_copy(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            module.sparse = False
    if getattr(dense, "kind", None) == "functional":
        dense.kind = "functional-dense"
        dense.forward = lambda ids: dense.head(torch.tanh(F.embedding(ids, dense.weight).sum(1)))
    return dense


@pytest.mark.parametrize("method", ["auto", "torch.func", "loop"])
@pytest.mark.parametrize("kind", ["embedding", "bag-mean", "bag-sum", "bag-max", "functional"])
def test_sparse_embeddings_are_exact_with_every_engine(kind, method):
    torch.manual_seed(0)
    model = Lookup(kind).double()
    ids, y = torch.randint(0, VOCAB, (6, 5)), torch.randint(0, CLASSES, (6,))
    ids2, y2 = torch.randint(0, VOCAB, (4, 5)), torch.randint(0, CLASSES, (4,))
    expected = reference_gram(_dense_copy(model), ids, y, ids2, y2)
    if kind == "functional" and method == "torch.func":
        # A sparse flag inside the forward cannot be turned off: vmap cannot batch its gradient, and says what can.
        with pytest.raises(RuntimeError, match="method='loop' can"):
            gradient_gram(model, ids, y, ids2, y2, method=method)
        return
    got = gradient_gram(model, ids, y, ids2, y2, method=method)
    torch.testing.assert_close(got, expected)
    sparse = [m.sparse for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    assert all(sparse), "the model's sparse flags are put back"


def test_a_sparse_model_trains_as_before_after_a_measurement():
    torch.manual_seed(1)
    model = Lookup("embedding").double()
    ids, y = torch.randint(0, VOCAB, (6, 5)), torch.randint(0, CLASSES, (6,))
    before = copy.deepcopy(model.state_dict())
    gradient_gram(model, ids, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loss = F.cross_entropy(model(ids), y)
    loss.backward()
    assert model.table.weight.grad.layout == torch.sparse_coo  # the user's training still gets sparse gradients
