"""Parameters the loss does not reach (an unused head, a branch the examples do not take): zero per-example
gradients, proven by autograd, with no whole-model fallback; and the parameters that only look unused."""

import torch
from torch import nn

from lightning_stiffness.gram import gradient_gram, gram_plan
from tests.reference import reference_gram


class SpareHead(nn.Module):
    """A second head the forward never calls (an auxiliary or pre-training head left in the model)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.spare = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class Branch(nn.Module):
    """A branch taken by the examples whose first feature is positive: reached by some examples only."""

    def __init__(self):
        super().__init__()
        self.body, self.extra = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        out = self.body(x)
        if bool((x[:, 0] > 0).any()):
            out = out + self.extra(x) * (x[:, :1] > 0)
        return out


class _Scale(torch.autograd.Function):
    """A custom autograd Function: the recorder sees no call of the parameter it multiplies by."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad * weight, (grad * x).sum_to_size(weight.shape)


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(_Scale.apply(x, self.scale))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_an_unused_head_is_unused_in_the_plan_and_adds_nothing():
    torch.manual_seed(0)
    model = SpareHead().double().eval()
    x, y = _data(7)
    plan = gram_plan(model, x, y)
    assert plan.forms["spare.weight"] == plan.forms["spare.bias"] == "unused"
    assert "spare.weight" not in plan.fallback and "spare.weight" not in plan.calls
    assert all(form not in ("torch.func", "loop") for form in plan.forms.values())
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))
    layers = gradient_gram(model, x, y, per_layer=True)
    assert list(layers) == ["body", "head", "spare"]
    assert torch.equal(layers["spare"], torch.zeros(7, 7, dtype=torch.float64))


def test_an_unused_head_in_a_cross_gram_and_in_small_chunks():
    torch.manual_seed(1)
    model = SpareHead().double().eval()
    (x, y), (x2, y2) = _data(5, 1), _data(8, 2)
    expected = reference_gram(model, x, y, x2, y2)
    for chunk_size in (None, 2, 3):
        torch.testing.assert_close(gradient_gram(model, x, y, x2, y2, chunk_size=chunk_size), expected)


def test_a_branch_some_examples_take_is_exact_and_not_unused():
    torch.manual_seed(2)
    model = Branch().double().eval()
    x, y = _data(9, 3)
    x[:3, 0] = -x[:3, 0].abs()  # the check's first examples do not take the branch
    x[3:, 0] = x[3:, 0].abs()
    # The plan describes the check's examples: unused where they do not take the branch, factored where they do.
    assert gram_plan(model, x, y).forms["extra.weight"] == "unused"
    assert gram_plan(model, x.flip(0), y.flip(0)).forms["extra.weight"] not in ("unused", "torch.func", "loop")
    for order in (torch.arange(9), torch.arange(8, -1, -1)):
        expected = reference_gram(model, x[order], y[order])
        for chunk_size in (None, 3, 4):
            torch.testing.assert_close(gradient_gram(model, x[order], y[order], chunk_size=chunk_size), expected)


def test_a_parameter_used_by_a_custom_function_is_not_taken_for_unused():
    torch.manual_seed(3)
    model = CustomFunction().double().eval()
    x, y = _data(6, 4)
    plan = gram_plan(model, x, y)
    assert plan.forms["scale"] != "unused" and "scale" in plan.fallback
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))


def test_a_frozen_input_path_leaves_the_rest_exact():
    torch.manual_seed(4)
    model = SpareHead().double().eval()
    model.body.requires_grad_(False)
    x, y = _data(6, 5)
    plan = gram_plan(model, x, y)
    assert set(plan.forms) == {"head.weight", "head.bias", "spare.weight", "spare.bias"}
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))
