"""The Gram engine on 21 Hugging Face model families (tiny configs, random weights, nothing downloaded).

Every parameter of every family keeps a factored form (none goes to torch.func or the whole-model loop), and the
Gram matrix equals a float64 loop of one ``torch.autograd.grad`` per example, square and across two sets.
"""

import pytest
import torch

from lightning_stiffness.gram import gradient_gram, gram_plan
from tests.models.hugging_face import FAMILIES, Case
from tests.reference import reference_gram


def _float64(case: Case) -> Case:
    def widen(x):
        return x.double() if x.is_floating_point() else x

    inputs = {k: widen(v) for k, v in case.inputs.items()} if isinstance(case.inputs, dict) else widen(case.inputs)
    return Case(case.model.double(), inputs, case.targets, case.loss_fn)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_parameter_is_factored_and_exact(family):
    case = _float64(FAMILIES[family]())
    other = _float64(FAMILIES[family](4))  # the same weights (seeded), other examples
    model, loss_fn = case.model, case.loss_fn
    plan = gram_plan(model, case.inputs, case.targets, loss_fn=loss_fn)
    assert plan.fallback == {}, str(plan)
    assert set(plan.forms) == {name for name, p in model.named_parameters() if p.requires_grad}
    expected = reference_gram(model, case.inputs, case.targets, loss_fn=loss_fn)
    got = gradient_gram(model, case.inputs, case.targets, loss_fn=loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    cross = reference_gram(model, case.inputs, case.targets, other.inputs, other.targets, loss_fn=loss_fn)
    got = gradient_gram(model, case.inputs, case.targets, other.inputs, other.targets, loss_fn=loss_fn, chunk_size=4)
    torch.testing.assert_close(got, cross, rtol=1e-9, atol=1e-12 * float(cross.abs().max()))


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "swin", "deberta_v2"])
def test_float32_matches_float64_to_single_precision(family):
    case = FAMILIES[family]()
    got = gradient_gram(case.model, case.inputs, case.targets, loss_fn=case.loss_fn).double()
    wide = _float64(case)
    expected = reference_gram(wide.model, wide.inputs, wide.targets, loss_fn=wide.loss_fn)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
