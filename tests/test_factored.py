"""The factored engine: each rule alone and in mixes, every fallback path, per-layer grams, against the loop."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_stiffness.gram import factored, gradient_gram, gram_plan, terms
from lightning_stiffness.gram.terms import BlockedTerm, GhostTerm, PerExampleTerm, sequence_term
from tests.reference import reference_gram


class Sequence(nn.Module):
    """Linear layers applied at every position of a sequence, then mean-pooled."""

    def __init__(self, d=5, p=4):
        super().__init__()
        self.proj = nn.Linear(d, p)
        self.norm = nn.LayerNorm(p)
        self.head = nn.Linear(p, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(dim=1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=2))


class OutsideUse(nn.Module):
    """A Linear whose weight is also used directly in forward: the rule alone would be wrong."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.layer(x)) + 0.5 * F.linear(x, self.layer.weight)
        return self.head(h)


class ScaledLinear(nn.Linear):
    """A subclass that changes forward: its scaled weight is a derived tensor, chained back to the parameter."""

    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


def _convnet(**conv):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, **conv),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


CASES = {
    "conv2d": (lambda: _convnet(padding=1), (2, 7, 7), {"0.weight": "materialised", "1.weight": "flat"}),
    "conv2d_strided": (lambda: _convnet(stride=2, dilation=2, padding=2), (2, 9, 9), {"0.weight": "materialised"}),
    "conv2d_groups": (lambda: _convnet(groups=2), (2, 6, 6), {"0.weight": "flat"}),
    "conv2d_same": (lambda: _convnet(padding="same"), (2, 6, 6), {"0.weight": "materialised"}),
    "conv2d_reflect": (lambda: _convnet(padding=1, padding_mode="reflect"), (2, 6, 6), {"0.weight": "materialised"}),
    "conv1d": (Conv1dNet, (2, 9), {"conv.weight": "materialised", "conv.bias": "flat"}),
    "sequence": (Sequence, (7, 5), {"proj.weight": "materialised", "norm.weight": "flat", "head.weight": "outer"}),
    "batchnorm_eval": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)),
        (2, 5, 5),
        {"1.weight": "flat", "1.bias": "flat"},
    ),
    "batchnorm1d_eval": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)),
        (6,),
        {"1.weight": "flat", "0.weight": "outer"},
    ),
    "layernorm_no_bias": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5, bias=False), nn.Tanh(), nn.Linear(5, 3)),
        (6,),
        {"1.weight": "flat"},
    ),
    "embedding": (
        lambda: nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(12, 3)),
        None,
        {"0.weight": "tokens", "2.weight": "outer"},
    ),
    "outside_use": (OutsideUse, (6,), {"layer.weight": "ghost", "layer.bias": "flat", "head.weight": "outer"}),
    "subclass": (
        lambda: nn.Sequential(ScaledLinear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
        (6,),
        {"0.weight": "flat", "2.weight": "outer"},
    ),
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    make = CASES[name][0]
    model = make().double()
    if "batchnorm" in name:  # give the running statistics values other than 0 and 1
        model.train()
        with torch.no_grad():
            model(_inputs(name, 16, 9))
    return model.eval()


def _inputs(name, n, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = CASES[name][1]
    if shape is None:
        return torch.randint(0, 9, (n, 3), generator=gen)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64)


def _targets(n, seed):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 100))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_or_fallback_matches_loop(name):
    model = _build(name)
    x, y = _inputs(name, 7, 1), _targets(7, 1)
    x2, y2 = _inputs(name, 4, 2), _targets(4, 2)
    torch.testing.assert_close(gradient_gram(model, x, y, method="factored"), reference_gram(model, x, y))
    torch.testing.assert_close(
        gradient_gram(model, x, y, x2, y2, method="factored", chunk_size=3), reference_gram(model, x, y, x2, y2)
    )
    plan = gram_plan(model, x, y)
    for param, form in CASES[name][2].items():
        if form is None:
            assert param in plan.fallback, (param, str(plan))
        else:
            assert plan.forms.get(param) == form, (param, str(plan))


@pytest.mark.parametrize("name", ["conv2d", "sequence", "outside_use", "embedding"])
def test_per_layer_grams_match_loop_per_layer(name):
    model = _build(name)
    x, y = _inputs(name, 6, 3), _targets(6, 3)
    for method in ("factored", "torch.func"):
        layers = gradient_gram(model, x, y, method=method, per_layer=True)
        owners = {}
        for param, _ in model.named_parameters():
            owners.setdefault(param.rpartition(".")[0] or param, []).append(param)
        assert list(layers) == list(owners)
        for layer, params in owners.items():
            torch.testing.assert_close(layers[layer], reference_gram(model, x, y, params=params))
        total = sum(layers.values())
        torch.testing.assert_close(total, gradient_gram(model, x, y, method=method))


def test_float32_within_1e5_relative():
    model = _build("conv2d").float()
    x, y = _inputs("conv2d", 9, 4).float(), _targets(9, 4)
    expected = reference_gram(model.double(), x.double(), y)
    got = gradient_gram(model.float(), x, y, method="factored").double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("t, d, p", [(3, 4, 5), (6, 2, 3), (1, 7, 2)])
def test_ghost_equals_materialised(t, d, p):
    gen = torch.Generator().manual_seed(t)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a1, b1, a2, b2 = randn(5, t, d), randn(5, t, p), randn(3, t, d), randn(3, t, p)
    g1 = torch.einsum("ntp,ntd->npd", b1, a1).flatten(1)
    g2 = torch.einsum("ntp,ntd->npd", b2, a2).flatten(1)
    torch.testing.assert_close(GhostTerm(a1, b1).gram(GhostTerm(a2, b2)), g1 @ g2.T)
    torch.testing.assert_close(BlockedTerm(a1, b1).gram(BlockedTerm(a2, b2)), g1 @ g2.T)
    square = BlockedTerm(a1, b1)
    torch.testing.assert_close(square.gram(square), g1 @ g1.T)
    for term in (GhostTerm(a1, b1), BlockedTerm(a1, b1), PerExampleTerm(g1)):
        torch.testing.assert_close(term.per_example(), g1)


def test_blocks_smaller_than_the_data(monkeypatch):
    monkeypatch.setattr(terms, "WORKING_SET_BYTES", 1)  # one example per block
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, 2, generator=gen, dtype=torch.float64),
    )
    g = torch.einsum("ntp,ntd->npd", b, a).flatten(1)
    torch.testing.assert_close(GhostTerm(a, b).gram(GhostTerm(a, b)), g @ g.T)
    square = BlockedTerm(a, b)
    torch.testing.assert_close(square.gram(square), g @ g.T)


def test_cost_model_picks_the_form(monkeypatch):
    wide = torch.zeros(4, 2, 64), torch.zeros(4, 2, 64)
    long = torch.zeros(4, 50, 3), torch.zeros(4, 50, 4)
    assert sequence_term(*wide, n=100, m=100).form == "ghost"
    assert sequence_term(*long, n=100, m=100).form == "materialised"
    monkeypatch.setattr(terms, "PER_EXAMPLE_BYTES", 0)  # per-example gradients too large to keep
    assert sequence_term(*long, n=100, m=100).form == "materialised-blocked"


@pytest.mark.parametrize("chunk_size", [2, 3, 100])
def test_blocked_form_in_a_model_matches_loop(monkeypatch, chunk_size):
    monkeypatch.setattr(terms, "PER_EXAMPLE_BYTES", 0)
    monkeypatch.setattr(terms, "WORKING_SET_BYTES", 2000)
    model = _build("conv2d")
    x, y = _inputs("conv2d", 7, 1), _targets(7, 1)
    x2, y2 = _inputs("conv2d", 5, 2), _targets(5, 2)
    assert gram_plan(model, x, y).forms["0.weight"] == "materialised-blocked"
    got = gradient_gram(model, x, y, x2, y2, method="factored", chunk_size=chunk_size)
    torch.testing.assert_close(got, reference_gram(model, x, y, x2, y2))
    torch.testing.assert_close(gradient_gram(model, x, y, chunk_size=chunk_size), reference_gram(model, x, y))


def test_ghost_form_in_a_model_matches_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Flatten(), nn.Linear(80, 3)).double().eval()
    x = torch.randn(5, 2, 40, dtype=torch.float64)
    y = _targets(5, 0)
    assert gram_plan(model, x, y).forms["0.weight"] == "ghost"
    torch.testing.assert_close(gradient_gram(model, x, y, method="factored"), reference_gram(model, x, y))


def test_unused_layer_contributes_zero():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Unused().double().eval()
    x, y = torch.randn(4, 6, dtype=torch.float64), _targets(4, 0)
    layers = gradient_gram(model, x, y, per_layer=True)
    assert torch.equal(layers["spare"], torch.zeros(4, 4, dtype=torch.float64))
    torch.testing.assert_close(layers["used"], reference_gram(model, x, y))


class Scale(nn.Module):
    """An elementwise scale, y = x * weight: a layer type with no built-in rule."""

    def __init__(self, d=6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class WronglyScaled(Scale):
    """The same layer, registered below with a wrong rule: the per-example check must refuse it."""


@pytest.fixture
def user_rules():
    from lightning_stiffness.gram.rules import GRAM_RULES, register_gram_rule
    from lightning_stiffness.gram.terms import FlatTerm

    @register_gram_rule(Scale, params=("weight",))
    def scale_rule(layer, activations, backprops, params, n, m):
        return {"weight": FlatTerm(activations * backprops)}

    @register_gram_rule(WronglyScaled, params=("weight",))
    def wrong_rule(layer, activations, backprops, params, n, m):
        return {"weight": FlatTerm(2 * activations * backprops)}

    yield
    del GRAM_RULES[Scale], GRAM_RULES[WronglyScaled]


@pytest.mark.parametrize("layer", [Scale, WronglyScaled])
def test_user_rule_registered_by_decorator(user_rules, layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), layer(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), _targets(7, 4)
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))
    plan = gram_plan(model, x, y)
    if layer is Scale:
        assert plan.forms["2.weight"] == "flat" and not plan.fallback, str(plan)
    else:
        assert plan.forms["2.weight"] == "torch.func", str(plan)
        assert "per-example check" in plan.fallback["2.weight"], str(plan)


@pytest.mark.parametrize("n", [5, 128, 129, 300, 1030])
def test_symmetric_product_equals_the_plain_one(n):
    rows = torch.randn(n, 7, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(terms.self_gram(rows), rows @ rows.T, rtol=0, atol=1e-12)
    flat, outer = terms.FlatTerm(rows), terms.OuterTerm(rows[:, :3], rows[:, 3:])
    torch.testing.assert_close(flat.gram(flat), rows @ rows.T, rtol=0, atol=1e-12)
    expected = (rows[:, :3] @ rows[:, :3].T) * (rows[:, 3:] @ rows[:, 3:].T)
    torch.testing.assert_close(outer.gram(outer), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("total, chunk", [(64, 21), (5, 2), (7, 1), (2, 1), (1, 1), (1025, 512), (10, 512)])
def test_chunks_are_even_and_never_one_example_alone(total, chunk):
    spans = factored._even_spans(total, chunk)
    sizes = [span.stop - span.start for span in spans]
    assert sum(sizes) == total and [span.start for span in spans] == [sum(sizes[:k]) for k in range(len(sizes))]
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= max(chunk, 3)
    assert total == 1 or min(sizes) >= 2


class ClassToken(nn.Module):
    """ViT's class token: one vector expanded over the examples (``expand(N, -1, -1)``) and put before the rest."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(torch.tanh(self.proj(tokens))[:, 0])


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_a_class_token_stays_factored_whatever_the_chunks(caplog, chunk_size):
    """64 examples in chunks of 21 left a last chunk of one, where ``expand(1, ...)`` broadcasts over nothing: the
    class token's calls differed from the check's, and it went to torch.func for every example."""
    torch.manual_seed(0)
    model = ClassToken().double().eval()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), _targets(5, 0)
    with caplog.at_level("DEBUG", logger="lightning_stiffness.gram.factored"):
        got = gradient_gram(model, x, y, method="factored", chunk_size=chunk_size)
    torch.testing.assert_close(got, reference_gram(model, x, y))
    plan = [record.getMessage() for record in caplog.records if record.getMessage().startswith("gram plan")]
    assert plan and "cls: flat" in plan[-1] and "differ" not in plan[-1], plan


def test_every_form_satisfies_the_term_protocol():
    rows = torch.randn(3, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2], [2, 2]])
    forms = [
        terms.OuterTerm(rows, rows),
        terms.FlatTerm(rows),
        PerExampleTerm(rows),
        GhostTerm(rows[:, None], rows[:, None]),
        BlockedTerm(rows[:, None], rows[:, None]),
        terms.TokenTerm(ids, torch.randn(3, 2, 4, dtype=torch.float64), 5),
        terms.SlicedTerm([((0, 1), terms.FlatTerm(rows))], 4, 4),
    ]
    for term in forms:
        assert isinstance(term, terms.Term), type(term)
        joined = type(term).concat([term, term])
        assert joined.num_examples == 6 and joined.gram(joined).shape == (6, 6)
        torch.testing.assert_close(term.gram(term), term.per_example() @ term.per_example().T)
