"""Hand-made layouts of the operations Hugging Face models use, against the float64 loop.

Products with a parameter wherever it sits (``x @ W.T``, ``W @ x``, ``torch.addmm`` on flattened positions as GPT-2's
``Conv1D``, ``bmm`` and ``einsum`` over heads, a scaled weight), grouped, depthwise and 3-D convolutions with stride
and dilation, tensors computed from parameters alone and broadcast over the examples (position embeddings of [1, T]
ids, a bias table indexed twice, keys tiled with ``repeat``), convolutions over many positions (their per-example
gradients from the convolution's own weight backward), outputs written in place, and operations with no factored
form, whose parameters' gradients come from their own vector-Jacobian product (their examples along a dimension or
flattened in one). Each must be exact, and none may leave the factored engine.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_stiffness.gram import gradient_gram, gram_plan
from tests.reference import reference_gram

D, T, H, CLASSES = 6, 5, 2, 3


class TransposedWeight(nn.Module):
    """``x @ W.T + b`` at every position, and a weight on the left of a product: ``W @ h``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, D) / D**0.5)
        self.bias = nn.Parameter(torch.randn(4))
        self.left = nn.Parameter(torch.randn(CLASSES, 4) / 2)

    def forward(self, x):
        h = torch.tanh(x @ self.weight.T + self.bias)  # [N, T, 4]
        return torch.matmul(self.left, h.mean(dim=1).unsqueeze(-1)).squeeze(-1)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x.view(-1, nx), weight)`` with the examples flattened with positions."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight, beta=0.5, alpha=2.0)
        return out.view(*x.shape[:-1], -1)


class HeadsEinsum(nn.Module):
    """Per-head projections by ``einsum`` over heads, attention by ``bmm`` with the heads flattened into the batch,
    a projection by ``torch.mm`` and a weight used scaled (``0.5 * W``) by ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = Conv1D(D, 3 * H * 4)
        self.per_head = nn.Parameter(torch.randn(H, 4, 4) / 2)
        self.out = nn.Parameter(torch.randn(H * 4, D) / 3)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, T, 3, H, 4).permute(2, 0, 3, 1, 4)  # each [N, H, T, 4]
        q = torch.einsum("nhtd,hde->nhte", q, self.per_head)
        scores = torch.bmm(q.reshape(n * H, T, 4), k.reshape(n * H, T, 4).transpose(1, 2)) / 2
        mixed = torch.bmm(scores.softmax(-1), v.reshape(n * H, T, 4)).view(n, H, T, 4)
        merged = torch.mm(mixed.permute(0, 2, 1, 3).reshape(n * T, H * 4), self.out).view(n, T, D)
        return F.linear(merged.mean(dim=1), 0.5 * self.head.weight, self.head.bias)


class EllipsisEinsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, 4) / 2)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(torch.einsum("...d,de->...e", x, self.weight)).mean(dim=1))


class ThreeOperandEinsum(nn.Module):
    """An ``einsum`` of the examples and two parameters: no factored form, each operand's vjp of that call alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(D, 5) / 2)
        self.b = nn.Parameter(torch.randn(5, 4) / 2)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(torch.einsum("ntd,de,ef->ntf", x, self.a, self.b)).mean(dim=1))


def _conv_net(dims: int, **conv) -> nn.Module:
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(
        conv_cls(4, 6, 3, **conv), nn.Tanh(), conv_cls(6, 6, 3, groups=6, padding="same"), pool(1), nn.Flatten(),
        nn.Linear(6, CLASSES),
    )  # fmt: skip


def _wide_conv_net(dims: int) -> nn.Module:
    """Ungrouped convolutions over 64 or more output positions (their per-example gradients from the convolution's
    own weight backward): an even kernel with "same" padding (padded unequally), then stride 2 with dilation 2."""
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(
        conv_cls(3, 5, 4, padding="same"), nn.Tanh(), conv_cls(5, 4, 3, stride=2, dilation=2), pool(1), nn.Flatten(),
        nn.Linear(4, CLASSES),
    )  # fmt: skip


class WeightNormGroupedConv(nn.Module):
    """Wav2Vec2's positional convolution: grouped, weight-normalised (a parametrization), added to its input."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.head((x + F.gelu(self.conv(x))).mean(dim=2))


class BroadcastPositions(nn.Module):
    """BERT's embeddings: token embeddings plus a position embedding looked up with a [1, T] buffer of ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(11, D)
        self.positions = nn.Embedding(T + 2, D)
        self.register_buffer("position_ids", torch.arange(T)[None, :], persistent=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        h = self.norm(self.tokens(ids) + self.positions(self.position_ids))
        return self.head(torch.tanh(h).mean(dim=1))


class BiasTableTwice(nn.Module):
    """A relative-position bias table indexed by a buffer, permuted to [1, H, T, T] and added to the scores of two
    attention layers (the table indexed twice, once per layer, as T5 shares its first layer's bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, H * 4)
        self.table = nn.Parameter(torch.randn(2 * T - 1, H))
        position = torch.arange(T)
        self.register_buffer("index", position[None, :] - position[:, None] + T - 1, persistent=False)
        self.head = nn.Linear(H * 4, CLASSES)

    def attend(self, h):
        n = h.shape[0]
        heads = h.view(n, T, H, 4).transpose(1, 2)  # [N, H, T, 4]
        bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        scores = heads @ heads.transpose(-1, -2) / 2 + bias
        return (scores.softmax(-1) @ heads).transpose(1, 2).reshape(n, T, H * 4)

    def forward(self, x):
        h = self.attend(self.attend(torch.tanh(self.embed(x))))
        return self.head(h.mean(dim=1))


class TiledKeys(nn.Module):
    """DeBERTa's relative position keys: a projection of a position table, tiled over the examples with
    ``repeat(N, 1, 1)`` and multiplied with the queries of [N * H, T, d] by ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(D, H * 4)
        self.positions = nn.Parameter(torch.randn(2 * T, D))
        self.key = nn.Linear(D, H * 4)
        self.head = nn.Linear(H * 2 * T, CLASSES)

    def forward(self, x):
        n = x.shape[0]
        q = self.query(x).view(n, T, H, 4).transpose(1, 2).reshape(n * H, T, 4)
        keys = self.key(self.positions).view(2 * T, H, 4).transpose(0, 1)  # [H, 2T, 4], no example
        scores = torch.bmm(q, keys.repeat(n, 1, 1).transpose(1, 2))  # [N * H, T, 2T]
        return self.head(torch.tanh(scores).view(n, H, T, 2 * T).mean(dim=2).flatten(1))


class InPlaceOutputs(nn.Module):
    """Funnel's attention: a Linear's output (a view of its [N * T, p] product when it has a bias) and an einsum's
    output (a permuted view) written in place (``mul_``, ``+=``) before anything else reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.heads = nn.Parameter(torch.randn(D, H, 2) / 2)
        self.head = nn.Linear(H * 2, CLASSES)

    def forward(self, x):
        h = self.proj(x)
        h.mul_(0.5)
        h += x
        per_head = torch.einsum("ntd,dhe->nthe", torch.tanh(h), self.heads)
        per_head.add_(1.0)
        return self.head(torch.tanh(per_head).mean(dim=1).flatten(1))


class FlattenedLookups(nn.Module):
    """Operations without a rule on examples flattened with positions: a table looked up by ``index_select`` with
    ids flattened to [N * T], and ``torch.atan2`` of a [N * T, d] reshape against a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(11, D))
        self.phase = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        n, t = ids.shape
        rows = torch.index_select(self.table, 0, ids.reshape(-1))  # [N * T, D]
        angles = torch.atan2(rows, self.phase).reshape(n, t, D)
        return self.head(torch.tanh(angles).mean(dim=1))


class KeywordCalls(nn.Module):
    """Torch functions called with keyword arguments only (no positional argument at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(D, D, 3) / 3)
        self.weight = nn.Parameter(torch.randn(CLASSES, D) / 2)

    def forward(self, x):
        h = F.conv1d(input=x.transpose(1, 2), weight=self.kernel, padding="same")  # [N, D, T]
        h = torch.add(input=torch.tanh(h).mean(dim=2), other=torch.zeros(size=(D,)))
        return F.linear(input=h, weight=self.weight)


class NoFactoredForm(nn.Module):
    """Operations with a parameter operand and no rule: ``torch.atan2`` and ``torch.cdist``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.randn(D))
        self.centres = nn.Parameter(torch.randn(4, D))
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.head(torch.cdist(torch.atan2(x.mean(dim=1), self.phase), self.centres))


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, 4)
        self.act = nn.PReLU(4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.head(self.act(self.proj(x).mean(dim=1)))


SEQUENCE, TOKENS = (T, D), None
#: name -> (model factory, input shape per example (None: token ids [T]), {parameter: the calls its plan names}).
CASES = {
    "transposed_weight": (TransposedWeight, SEQUENCE, {"weight": "matmul", "left": "torch.matmul"}),
    "conv1d_addmm": (lambda: nn.Sequential(Conv1D(D, 4), nn.Flatten(), nn.Linear(T * 4, 3)), SEQUENCE, {}),
    "heads_einsum_bmm_mm": (
        HeadsEinsum,
        SEQUENCE,
        {"qkv.weight": "torch.addmm", "per_head": "torch.einsum", "out": "torch.mm", "head.weight": "through"},
    ),
    "einsum_ellipsis": (EllipsisEinsum, SEQUENCE, {"weight": "torch.einsum"}),
    "einsum_three_operands": (ThreeOperandEinsum, SEQUENCE, {"a": "torch.einsum (its own vjp)", "b": "(its own vjp)"}),
    "grouped_conv1d_stride_dilation": (lambda: _conv_net(1, stride=2, dilation=2, groups=2), (4, 13), {}),
    "grouped_conv2d_stride_dilation": (lambda: _conv_net(2, stride=2, dilation=2, groups=2), (4, 9, 9), {}),
    "grouped_conv3d_stride": (lambda: _conv_net(3, stride=(1, 2, 2), groups=2, padding=1), (4, 4, 6, 6), {}),
    "wide_conv1d": (lambda: _wide_conv_net(1), (3, 140), {"0.weight": "F.conv1d", "2.weight": "F.conv1d"}),
    "wide_conv2d": (lambda: _wide_conv_net(2), (3, 20, 20), {"0.weight": "F.conv2d", "2.weight": "F.conv2d"}),
    "wide_conv3d": (lambda: _wide_conv_net(3), (3, 9, 9, 9), {"0.weight": "F.conv3d"}),
    "weight_norm_grouped_conv": (WeightNormGroupedConv, (4, 7), {"conv.parametrizations.weight.original0": "through"}),
    "broadcast_positions": (BroadcastPositions, TOKENS, {"positions.weight": "through"}),
    "bias_table_twice": (BiasTableTwice, SEQUENCE, {"table": "through"}),
    "tiled_keys": (TiledKeys, SEQUENCE, {"positions": "through", "key.weight": "through"}),
    "in_place_outputs": (InPlaceOutputs, SEQUENCE, {"proj.weight": "F.linear", "heads": "torch.einsum"}),
    "flattened_lookups": (
        FlattenedLookups,
        TOKENS,
        {"table": "torch.index_select (its own vjp)", "phase": "torch.atan2 (its own vjp)"},
    ),
    "keyword_calls": (KeywordCalls, SEQUENCE, {"kernel": "F.conv1d", "weight": "F.linear"}),
    "no_factored_form": (NoFactoredForm, SEQUENCE, {"phase": "(its own vjp)", "centres": "(its own vjp)"}),
    "prelu": (PReLUNet, SEQUENCE, {"act.weight": "F.prelu"}),
}


def _case(name: str, n: int, seed: int):
    factory, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (n, T), generator=gen) if shape is None else torch.randn(n, *shape, generator=gen)
    x = x.double() if x.is_floating_point() else x
    return model, x, torch.randint(0, CLASSES, (n,), generator=gen)


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_and_exact(name):
    model, x, y = _case(name, 7, 1)
    _, x2, y2 = _case(name, 4, 2)
    plan = gram_plan(model, x, y)
    assert plan.fallback == {}, str(plan)
    assert set(plan.forms) == {param for param, _ in model.named_parameters()}
    for param, call in CASES[name][2].items():
        assert any(call in c for c in plan.calls[param]), (param, str(plan))
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        gradient_gram(model, x, y, x2, y2, chunk_size=3), reference_gram(model, x, y, x2, y2), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("name", ["heads_einsum_bmm_mm", "bias_table_twice", "tiled_keys", "no_factored_form"])
def test_per_layer_grams_match_the_loop(name):
    model, x, y = _case(name, 6, 3)
    layers = gradient_gram(model, x, y, per_layer=True)
    owners: dict[str, list[str]] = {}
    for param, _ in model.named_parameters():
        owners.setdefault(param.rpartition(".")[0] or param, []).append(param)
    for layer, params in owners.items():
        torch.testing.assert_close(layers[layer], reference_gram(model, x, y, params=params), rtol=1e-9, atol=1e-12)


def test_the_plan_names_each_parameters_calls():
    model, x, y = _case("no_factored_form", 5, 4)
    text = str(gram_plan(model, x, y))
    assert "phase: flat via torch.atan2 (its own vjp)" in text
    assert "head.weight: outer via F.linear" in text


def test_float32_stays_close_to_float64():
    model, x, y = _case("heads_einsum_bmm_mm", 9, 5)
    expected = reference_gram(model, x, y)
    got = gradient_gram(model.float(), x.float(), y).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_parameters_and_buffers_are_left_as_they_were():
    model, x, y = _case("tiled_keys", 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_gram(model, x, y)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
