"""Exact on every model (issue 9): each engine against a per-example float64 loop on layouts that break the
"dim 0 indexes the examples" assumption, kernels vmap cannot run, models no rule covers and forwards that update
buffers; the loop engine on the engine-test models; buffers bitwise untouched; randomised models; the plan.

The reference (:func:`exact_gram`) runs one ``torch.autograd.grad`` per example and gives every example the model state
as it was before the call (buffers and plain attributes restored before each example), which is what a Gram matrix
of a model whose forward updates buffers means.
"""

import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_stiffness.functional import gradient_gram
from lightning_stiffness.gram import gram_plan
from lightning_stiffness.measures.representations import layer_outputs
from tests.models.basic import MODELS, build
from tests.models.basic import make_inputs as model_inputs
from tests.models.layouts import BLOCKS, FRONTS, LAYOUTS, MUTATING, random_model
from tests.reference import reference_gram

FACTORED_FORMS = {"outer", "flat", "ghost", "materialised", "materialised-blocked", "tokens"}
FALLBACK_FORMS = {"torch.func", "loop"}
ENGINES = ("auto", "factored", "loop", "torch.func")
TOLERANCE = {"rtol": 1e-7, "atol": 1e-9}


# --- the reference ----------------------------------------------------------------------------------------------------


class ModelState:
    """Every module's buffers and plain tensor/number attributes: the objects and their values, restorable."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = []
        for module in model.modules():
            buffers = dict(module._buffers)
            attributes = {
                key: value
                for key, value in vars(module).items()
                if not key.startswith("_") and key != "training" and isinstance(value, Tensor | int | float)
            }
            values = {
                key: value.clone() for key, value in {**buffers, **attributes}.items() if isinstance(value, Tensor)
            }
            self.saved.append((module, buffers, attributes, values))

    def restore(self) -> None:
        for module, buffers, attributes, values in self.saved:
            for key in [k for k in module._buffers if k not in buffers]:
                del module._buffers[key]
            module._buffers.update(buffers)
            module.__dict__.update(attributes)
            with torch.no_grad():
                for key, value in {**buffers, **attributes}.items():
                    if isinstance(value, Tensor):
                        value.copy_(values[key])


def exact_gram(model, x, y, x2=None, y2=None, loss_fn=None, params=None, per_layer=False):
    """Float64 Gram [N, M] (or module name -> [N, M]), one backward per example, state restored before each."""
    state = ModelState(model)
    return reference_gram(model, x, y, x2, y2, loss_fn, params, per_layer=per_layer, before_each=state.restore)


def _close(got: Tensor, expected: Tensor) -> None:
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, **TOLERANCE)


def _quiet_gram(*args, **kwargs):
    """gradient_gram without the (expected) warning about the loop fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loop.*", category=UserWarning)
        return gradient_gram(*args, **kwargs)


def _parameters(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {key: (p, p.detach().clone()) for key, p in model.named_parameters()}


def _assert_same_parameters(model: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> None:
    """The model still holds its own parameter objects (not copies or plain tensors), with their values."""
    for key, (obj, value) in before.items():
        module, _, leaf = key.rpartition(".")
        now = model.get_submodule(module)._parameters.get(leaf)
        assert now is obj, f"parameter {key} was replaced by a {type(now).__name__}"
        assert torch.equal(now, value), f"parameter {key} changed"


def _layout_cases(methods=ENGINES, names=None):
    for name, layout in LAYOUTS.items():
        if names is not None and name not in names:
            continue
        for method in methods:
            if method != "torch.func" or layout.vmap:
                yield pytest.param(name, method, id=f"{name}-{method}")


# --- the reference itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_gram_agrees_with_reference_gram(name):
    """The stateful reference is the plain one on models without state."""
    model = build(name)
    x, y = model_inputs(name, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(exact_gram(model, x, y), reference_gram(model, x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [name for name in LAYOUTS if name not in MUTATING])
def test_exact_gram_agrees_with_reference_gram_on_layouts(name):
    model, x, y = LAYOUTS[name].build()
    torch.testing.assert_close(exact_gram(model, x, y), reference_gram(model, x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MUTATING)
def test_exact_gram_restores_state(name):
    model, x, y = LAYOUTS[name].build()
    before = {k: (v, v.clone()) for k, v in model.named_buffers()}
    first = exact_gram(model, x, y)
    after = dict(model.named_buffers())
    assert all(after[k] is obj and torch.equal(obj, value) for k, (obj, value) in before.items())
    torch.testing.assert_close(exact_gram(model, x, y), first, rtol=0, atol=0)
    # and each example saw the original state: example i alone gives the i-th diagonal entry
    alone = exact_gram(model, x[2:3], y[2:3])
    torch.testing.assert_close(alone[0, 0], first[2, 2], rtol=1e-12, atol=1e-12)


# --- every situation of the issue, each engine ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize(("name", "method"), list(_layout_cases()))
def test_layout_gram_is_exact(name, method):
    model, x, y = LAYOUTS[name].build()
    expected = exact_gram(model, x, y)
    params = _parameters(model)
    got = gradient_gram(model, x, y, method=method)
    assert got.dtype == torch.float64
    _close(got, expected)
    _assert_same_parameters(model, params)


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize(("name", "method"), list(_layout_cases(("auto", "loop"))))
def test_layout_cross_gram_is_exact(name, method):
    layout = LAYOUTS[name]
    model, x, y = layout.build()
    x2, y2 = layout.more_inputs(4)
    expected = exact_gram(model, x, y, x2, y2)
    params = _parameters(model)
    _close(gradient_gram(model, x, y, x2, y2, method=method), expected)
    _assert_same_parameters(model, params)


CHUNKED = ("seq_first_transformer", "flattened_time_linear", "relative_position_mlp", "learned_query", "gru")
CHUNKED += MUTATING


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize(("name", "method"), list(_layout_cases(("auto", "loop"), CHUNKED)))
def test_layout_chunked_gram_is_exact(name, method, chunk_size):
    """Chunks of one example, and chunks that do not divide N, change nothing (square and cross)."""
    layout = LAYOUTS[name]
    model, x, y = layout.build()
    x2, y2 = layout.more_inputs(3)
    _close(gradient_gram(model, x, y, method=method, chunk_size=chunk_size), exact_gram(model, x, y))
    _close(gradient_gram(model, x, y, x2, y2, method=method, chunk_size=chunk_size), exact_gram(model, x, y, x2, y2))


PER_LAYER = ("seq_first_transformer", "relative_position_mlp", "gru", "packed_lstm", "old_style_function")


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize(("name", "method"), list(_layout_cases(("auto", "factored", "loop"), PER_LAYER)))
def test_layout_per_layer_is_exact(name, method):
    model, x, y = LAYOUTS[name].build()
    expected = exact_gram(model, x, y, per_layer=True)
    got = gradient_gram(model, x, y, method=method, per_layer=True)
    assert list(got) == list(expected)
    for key in expected:
        _close(got[key], expected[key])


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize(
    ("name", "params"),
    [
        pytest.param("gru", ["rnn.weight_hh_l0", "head.weight"], id="gru-recurrent-and-head"),
        pytest.param("seq_first_transformer", ["encoder.layers.0.linear1.weight", "head.bias"], id="transformer"),
        pytest.param("learned_query", ["query", "key.weight"], id="learned-query"),
        pytest.param("old_style_function", ["scale"], id="old-style-function-only"),
    ],
)
@pytest.mark.parametrize("method", ["auto", "loop"])
def test_layout_params_subset_is_exact(name, params, method):
    model, x, y = LAYOUTS[name].build()
    _close(gradient_gram(model, x, y, method=method, params=params), exact_gram(model, x, y, params=params))


# --- the loop fallback ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "factored"])
@pytest.mark.parametrize("name", ["gru", "packed_lstm", "old_style_function"])
def test_vmap_failure_falls_back_to_loop_with_one_warning(name, method):
    model, x, y = LAYOUTS[name].build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gradient_gram(model, x, y, method=method)
    loop_warnings = [w for w in caught if issubclass(w.category, UserWarning) and "loop" in str(w.message)]
    assert len(loop_warnings) == 1, [str(w.message) for w in caught]
    _close(got, exact_gram(model, x, y))


@pytest.mark.parametrize("name", ["mlp", "seq_first_transformer", "relative_position_mlp"])
def test_no_loop_warning_where_vmap_runs(name):
    model, x, y = LAYOUTS[name].build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradient_gram(model, x, y)
    assert not [w for w in caught if "loop" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("method", ["auto", "factored", "loop"])
def test_model_without_covered_parameter_works(method):
    """LSTM only: no rule covers any parameter, so no empty backward ("inputs argument to grad() cannot be empty")."""
    model, x, y = LAYOUTS["lstm_only"].build()
    _close(_quiet_gram(model, x, y, method=method), exact_gram(model, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = gram_plan(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    assert set(plan.fallback) == set(names)
    assert all(plan.forms[n] in FALLBACK_FORMS for n in names)


# --- the loop engine on the engine-test models ------------------------------------------------------------------------


def _model_data(name, n, seed):
    return model_inputs(name, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loop_square_and_cross(name):
    model = build(name)
    x, y = _model_data(name, 7, 1)
    x2, y2 = _model_data(name, 4, 2)
    _close(gradient_gram(model, x, y, method="loop"), reference_gram(model, x, y))
    _close(gradient_gram(model, x, y, x2, y2, method="loop"), reference_gram(model, x, y, x2, y2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loop_chunked(name):
    model = build(name)
    x, y = _model_data(name, 7, 1)
    x2, y2 = _model_data(name, 5, 2)
    _close(gradient_gram(model, x, y, method="loop", chunk_size=2), reference_gram(model, x, y))
    _close(gradient_gram(model, x, y, x2, y2, method="loop", chunk_size=2), reference_gram(model, x, y, x2, y2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loop_per_layer(name):
    model = build(name)
    x, y = _model_data(name, 6, 1)
    x2, y2 = _model_data(name, 3, 2)
    for args in ((x, y), (x, y, x2, y2)):
        expected = exact_gram(model, *args, per_layer=True)
        got = gradient_gram(model, *args, method="loop", per_layer=True)
        assert list(got) == list(expected)
        for key in expected:
            _close(got[key], expected[key])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loop_params_subset(name):
    model = build(name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    subset = [names[0], names[-1]]
    x, y = _model_data(name, 6, 1)
    _close(gradient_gram(model, x, y, method="loop", params=subset), reference_gram(model, x, y, params=subset))


def test_loop_float32_model():
    model = build("mlp")
    x, y = _model_data("mlp", 6, 1)
    expected = reference_gram(model, x, y)
    got = gradient_gram(model.float(), x.float(), y, method="loop")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# --- buffers bitwise untouched ----------------------------------------------------------------------------------------


def _buffers(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {name: (b, b.clone()) for name, b in model.named_buffers()}


def _assert_untouched(model: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> None:
    after = dict(model.named_buffers())
    assert list(after) == list(before)
    for name, (obj, value) in before.items():
        assert after[name] is obj, f"buffer {name} was replaced by another tensor"
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), f"buffer {name} changed"


BUFFERED = (*MUTATING, "batch_norm_eval", "spectral_norm", "relative_position_mlp")


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize(("name", "method"), list(_layout_cases(names=BUFFERED)))
def test_gradient_gram_leaves_buffers_untouched(name, method):
    layout = LAYOUTS[name]
    model, x, y = layout.build()
    x2, y2 = layout.more_inputs(3)
    before = _buffers(model)
    gradient_gram(model, x, y, method=method)
    _assert_untouched(model, before)
    gradient_gram(model, x, y, x2, y2, method=method, chunk_size=2, per_layer=True)
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", BUFFERED)
def test_gram_plan_leaves_buffers_untouched(name):
    model, x, y = LAYOUTS[name].build()
    before = _buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gram_plan(model, x, y)
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", BUFFERED)
def test_layer_outputs_leaves_buffers_untouched(name):
    model, x, _ = LAYOUTS[name].build()
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    before = _buffers(model)
    layer_outputs(model, x, [layer], chunk_size=2)
    _assert_untouched(model, before)


def test_layer_outputs_of_running_mean_model_use_the_state_as_it_was():
    """Every chunk sees the running mean as it was before the call."""
    model, x, _ = LAYOUTS["running_mean"].build()
    with torch.no_grad():
        expected = model.lin(x - model.running_mean)
    got = layer_outputs(model, x, ["lin"], chunk_size=2)["lin"]
    # Not bitwise: a matmul over 2 rows may round differently from one over all (a moved mean differs by far more).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --- randomised models ------------------------------------------------------------------------------------------------

RANDOM_SEEDS = range(32)


@pytest.mark.filterwarnings("ignore:.*loop.*:UserWarning")
@pytest.mark.parametrize("seed", RANDOM_SEEDS, ids=lambda s: f"seed{s}")
def test_random_model_gram_is_exact(seed):
    model, x, y = random_model(seed)
    expected = exact_gram(model, x, y)
    got = gradient_gram(model, x, y, method="auto")
    assert got.shape == expected.shape, model.describe()
    torch.testing.assert_close(got.double(), expected, **TOLERANCE, msg=lambda m: f"{model.describe()}: {m}")


def test_random_models_cover_the_menu():
    """The seeds draw every front and block kind, and some N == T."""
    fronts, blocks, square = set(), set(), 0
    for seed in RANDOM_SEEDS:
        model, x, _ = random_model(seed)
        fronts.add(model.front_kind)
        blocks.update(model.kinds)
        square += x.shape[0] == x.shape[1]
    assert fronts == set(FRONTS)
    assert blocks == set(BLOCKS)
    assert square >= 3


# --- the plan ---------------------------------------------------------------------------------------------------------

PLANNED = [name for name, layout in LAYOUTS.items() if layout.fallback or layout.factored]


@pytest.mark.parametrize("name", PLANNED)
def test_plan_factors_proven_layouts_and_sends_the_rest_to_fallback(name):
    """Sequence-first and flattened layouts are factored (proven per example); broadcast ones go to the fallback."""
    layout = LAYOUTS[name]
    model, x, y = layout.build()
    plan = gram_plan(model, x, y)
    for param, _ in model.named_parameters():
        assert param in plan.forms, f"{param} has no form in the plan"
        if param.startswith(layout.fallback):
            assert param in plan.fallback, f"{param} kept the factored form {plan.forms[param]!r}"
            assert plan.forms[param] in FALLBACK_FORMS, plan.forms[param]
            assert isinstance(plan.fallback[param], str) and plan.fallback[param]
        elif param.startswith(layout.factored):
            assert param not in plan.fallback, f"{param} fell back: {plan.fallback[param]}"
            assert plan.forms[param] in FACTORED_FORMS, plan.forms[param]


def test_plan_of_mlp_has_no_fallback():
    model, x, y = LAYOUTS["mlp"].build()
    plan = gram_plan(model, x, y)
    assert plan.fallback == {}
    assert set(plan.forms) == {n for n, _ in model.named_parameters()}
    assert set(plan.forms.values()) <= FACTORED_FORMS


@pytest.mark.parametrize("name", ["gru", "packed_gru", "old_style_function"])
def test_plan_names_loop_where_vmap_fails(name):
    """Parameters torch.func cannot run are planned for the loop engine."""
    model, x, y = LAYOUTS[name].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = gram_plan(model, x, y)
    assert "loop" in set(plan.forms.values())
    for param, form in plan.forms.items():
        assert (form in FALLBACK_FORMS) == (param in plan.fallback), (param, form)
