"""What "exact" means under each precision: the engines' Gram matrices against float64 arithmetic on the same weights
(the reduced-precision weights widened), measured on the digits MLP and a small transformer encoder.

Under float32 and float64 the engines agree with float64 arithmetic to rounding. Under float16 and bfloat16 the model
runs in that precision (the activations and gradients rounded to it), which the engines do not undo: the factors are
widened to float32 before they are multiplied, so the Gram matrix holds the model's own reduced-precision gradients
to float32, and differs from float64 arithmetic by about that precision's rounding. The bounds below are about 2-5x
the errors measured, and the README's precision table quotes the measurements.
"""

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_stiffness.gram import gradient_gram
from tests.models.transformer import RowsEncoder
from tests.reference import reference_gram

#: dtype -> (largest relative error of the Gram matrix, largest absolute error of the cosine stiffness).
BOUNDS = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 1e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return {"mlp": mlp, "encoder": RowsEncoder()}


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / norms[:, None] / norms[None, :]


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return torch.tensor(data.data[:48], dtype=torch.float64) / 16, torch.tensor(data.target[:48])


@pytest.mark.parametrize("method", ["auto", "loop"])
@pytest.mark.parametrize("dtype", list(BOUNDS), ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_the_engines_against_float64_arithmetic_on_the_same_weights(digits, name, dtype, method):
    x, y = digits
    model = _models()[name].to(dtype).eval()
    inputs = x.to(dtype)
    expected = reference_gram(copy.deepcopy(model).double(), inputs.double(), y)
    got = gradient_gram(model, inputs, y, method=method)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gram_bound, cosine_bound = BOUNDS[dtype]
    error = float((got.double() - expected).abs().max() / expected.abs().max())
    assert error < gram_bound, f"{name} {dtype} {method}: relative error {error:.2g}"
    cosine_error = float((_cosine(got.double()) - _cosine(expected)).abs().max())
    assert cosine_error < cosine_bound, f"{name} {dtype} {method}: cosine stiffness off by {cosine_error:.2g}"
