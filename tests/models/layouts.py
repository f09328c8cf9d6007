"""Small models whose layouts break the "dim 0 indexes the examples" assumption, or that no rule covers.

Each situation of issue 9 ("Exact on every model") has a model here: examples moved out of dim 0 (seq-first
attention, time steps or frames flattened into the batch), tensors shared by every example (a [1, T, 2] coordinate
buffer through an MLP, a learned [1, d] query), kernels vmap cannot run (RNN, GRU, LSTM and packed sequences, their
models from :mod:`tests.models.sequences`; an old-style ``autograd.Function``), parametrizations, and forwards that
update buffers even in eval mode.
:func:`random_model` builds further models from a menu of layers and layouts. Everything is tiny: the tests compare
each engine with a per-example float64 loop.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from tests.models.basic import tanh_mlp
from tests.models.sequences import LSTMOnly, PackedRecurrent, RecurrentClassifier

FEATURES = 4  # input features per time step (or per example for "vector" inputs)
WIDTH = 6  # hidden width; even, for two attention heads
CLASSES = 3
VOCAB = 9  # token ids 1..VOCAB-1; 0 is padding
FRAME_LENGTH = 5  # samples per frame for the flattened Conv1d


# --- examples not along dim 0 -----------------------------------------------------------------------------------------


class SeqFirstTransformer(nn.Module):
    """[N, T, d] transposed to [T, N, d] for ``nn.TransformerEncoder(batch_first=False)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x).transpose(0, 1))  # [T, N, d]
        return self.head(h.mean(dim=0))


class SeqFirstAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first=False) used directly on [T, N, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, num_heads=2)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).transpose(0, 1)
        attended, _ = self.attn(h, h, h)
        return self.head(torch.tanh(attended).mean(dim=0))


class FlattenedTimeLinear(nn.Module):
    """A Linear applied to the time steps flattened into the batch, ``x.reshape(N * T, C)``, then reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.frame = nn.Linear(FEATURES, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        h = torch.tanh(self.frame(x.reshape(n * t, c))).reshape(n, t, WIDTH)
        return self.head(h.mean(dim=1))


class FlattenedFramesConv(nn.Module):
    """A Conv1d applied to frames [N, F, C, L] flattened into the batch, [N * F, C, L]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(FEATURES, WIDTH, kernel_size=3)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        n, f, c, length = x.shape
        h = torch.tanh(self.conv(x.reshape(n * f, c, length)))
        return self.head(h.reshape(n, f, WIDTH, -1).mean(dim=(1, 3)))


# --- tensors shared by every example ----------------------------------------------------------------------------------


class RelativePositionMLP(nn.Module):
    """A small MLP on a fixed [1, T, 2] coordinate buffer; its [1, T, d] output is added to every example."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.register_buffer("coords", torch.stack([torch.linspace(-1, 1, t), torch.linspace(0.5, -0.3, t)], -1)[None])
        self.embed = nn.Linear(FEATURES, WIDTH)
        self.position = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position(self.coords)
        return self.head(torch.tanh(h).mean(dim=1))


class LearnedQuery(nn.Module):
    """Attention pooling with a learned [1, d] query, projected by a Linear, then expanded over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, WIDTH))
        self.q_proj = nn.Linear(WIDTH, WIDTH)  # its input is the [1, d] query: one row for all the examples
        self.key = nn.Linear(FEATURES, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        keys = self.key(x)  # [N, T, d]
        query = self.q_proj(self.query).expand(x.shape[0], -1)  # [N, d]
        weights = torch.softmax(torch.einsum("ntd,nd->nt", keys, query) / WIDTH**0.5, dim=1)
        return self.head(torch.einsum("nt,ntd->nd", weights, keys))


# --- kernels vmap cannot run ------------------------------------------------------------------------------------------


class _ScaleByParameter(torch.autograd.Function):
    """x * scale, old style: static forward(ctx, ...) and backward(ctx, ...), no setup_context (vmap refuses it)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        x, scale = ctx.saved_tensors
        return grad_output * scale, (grad_output * x).sum(dim=0)


class OldStyleFunction(nn.Module):
    """An old-style ``autograd.Function`` acting on a raw parameter between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, WIDTH)
        self.scale = nn.Parameter(torch.randn(WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(_ScaleByParameter.apply(self.lin(x), self.scale)))


# --- no parameter covered by a rule -----------------------------------------------------------------------------------


def spectral_norm_model() -> nn.Module:
    return nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(FEATURES, 5)),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(5, CLASSES)),
    )


def weight_norm_model() -> nn.Module:
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(FEATURES, 5)),
        nn.Tanh(),
        parametrizations.weight_norm(nn.Linear(5, CLASSES)),
    )


class BilinearOnly(nn.Module):
    """``nn.Bilinear`` of the first and last time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(FEATURES, FEATURES, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.bilinear(x[:, 0], x[:, -1])


class TwiceRegistered(nn.Module):
    """The same Linear registered under two attribute names (``first`` and ``second``), called once under each."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(FEATURES, FEATURES)
        self.second = self.first

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))[:, :CLASSES]


# --- forwards that update buffers in eval mode ------------------------------------------------------------------------


class RunningMean(nn.Module):
    """Centres its input with a running mean it then updates in place (``.mul_().add_()``), in any mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.linspace(-0.5, 0.5, FEATURES))
        self.lin = nn.Linear(FEATURES, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(torch.tanh(self.lin(x - self.running_mean)))
        with torch.no_grad():
            self.running_mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return out


class CallCounter(nn.Module):
    """Counts its calls in a buffer (``self.count += 1``); the count scales the output."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.tensor(0))
        self.lin = nn.Linear(FEATURES, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        self.count += 1
        return self.head(torch.tanh(self.lin(x))) * (1 + 0.1 * self.count)


class ReassignedStat(nn.Module):
    """Adds a buffer to its output, then reassigns it: ``self.stat = self.stat * 0.9 + ...`` (a new tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stat", torch.tensor([0.2, -0.1, 0.3]))
        self.lin = nn.Linear(FEATURES, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(torch.tanh(self.lin(x))) + self.stat
        self.stat = self.stat * 0.9 + 0.1 * out.detach().mean(dim=0)
        return out


def batch_norm_eval() -> nn.Module:
    """BatchNorm in eval mode (the model is put in eval mode by :meth:`Layout.build`): buffers read, never written."""
    model = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


# --- inputs -----------------------------------------------------------------------------------------------------------


def make_inputs(kind: str, n: int, t: int, seed: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of ``n`` examples; ``kind`` is "vector" [N, C], "sequence" [N, T, C], "frames"
    [N, T, C, L] or "tokens" [N, T] (ids >= 1, padded with 0 at the end, at least one real token)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vector":
        x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    elif kind == "sequence":
        x = torch.randn(n, t, FEATURES, generator=g, dtype=torch.float64)
    elif kind == "frames":
        x = torch.randn(n, t, FEATURES, FRAME_LENGTH, generator=g, dtype=torch.float64)
    elif kind == "tokens":
        x = torch.randint(1, VOCAB, (n, t), generator=g)
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        lengths[0] = t  # one full-length example
        x[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    else:
        raise ValueError(kind)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


@dataclass(frozen=True)
class Layout:
    """A model, its kind of input and the sizes to try it at.

    ``vmap``: torch.func (``vmap(grad(...))``) can run it, so ``method="torch.func"`` must be exact on it too.
    ``fallback``/``factored``: prefixes of parameter names that must go to an exact fallback, and that must keep a
    factored form, in :func:`~lightning_stiffness.gram.gram_plan`.
    """

    factory: Callable[[int], nn.Module]
    inputs: str
    n: int = 6
    t: int = 5
    vmap: bool = True
    fallback: tuple[str, ...] = ()
    factored: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        model = self.factory(self.t).double().eval()
        return (model, *make_inputs(self.inputs, self.n, self.t, seed + 1))

    def more_inputs(self, n: int, seed: int = 7) -> tuple[Tensor, Tensor]:
        return make_inputs(self.inputs, n, self.t, seed)


LAYOUTS: dict[str, Layout] = {
    # examples not along dim 0
    "seq_first_transformer": Layout(
        lambda t: SeqFirstTransformer(), "sequence", 6, 5, fallback=(), factored=("embed.", "encoder.", "head.")
    ),
    "seq_first_transformer_n_eq_t": Layout(
        lambda t: SeqFirstTransformer(), "sequence", 6, 6, fallback=(), factored=("embed.", "encoder.", "head.")
    ),
    "seq_first_attention": Layout(
        lambda t: SeqFirstAttention(), "sequence", 5, 4, fallback=(), factored=("embed.", "attn.", "head.")
    ),
    "seq_first_attention_n_eq_t": Layout(
        lambda t: SeqFirstAttention(), "sequence", 5, 5, fallback=(), factored=("embed.", "attn.", "head.")
    ),
    "flattened_time_linear": Layout(
        lambda t: FlattenedTimeLinear(), "sequence", 6, 5, fallback=(), factored=("frame.", "head.")
    ),
    "flattened_time_linear_n_eq_t": Layout(
        lambda t: FlattenedTimeLinear(), "sequence", 5, 5, fallback=(), factored=("frame.", "head.")
    ),
    "flattened_frames_conv1d": Layout(
        lambda t: FlattenedFramesConv(), "frames", 5, 3, fallback=(), factored=("conv.", "head.")
    ),
    # shared by every example
    "relative_position_mlp": Layout(
        RelativePositionMLP, "sequence", 5, 4, fallback=(), factored=("embed.", "position.", "head.")
    ),
    "relative_position_mlp_n_eq_t": Layout(
        RelativePositionMLP, "sequence", 5, 5, fallback=(), factored=("embed.", "position.", "head.")
    ),
    "learned_query": Layout(
        lambda t: LearnedQuery(), "sequence", 6, 4, fallback=(), factored=("query", "q_proj.", "key.", "head.")
    ),
    # kernels vmap cannot run
    "gru": Layout(lambda t: RecurrentClassifier("gru", FEATURES, WIDTH, CLASSES), "sequence", vmap=False),
    "rnn": Layout(lambda t: RecurrentClassifier("rnn", FEATURES, WIDTH, CLASSES), "sequence", vmap=False),
    "gru_bidirectional_2_layers": Layout(
        lambda t: RecurrentClassifier("gru", FEATURES, WIDTH, CLASSES, num_layers=2, bidirectional=True),
        "sequence",
        5,
        4,
        vmap=False,
    ),
    "lstm_only": Layout(lambda t: LSTMOnly(FEATURES, CLASSES), "sequence", 5, 4, vmap=False),
    "packed_gru": Layout(lambda t: PackedRecurrent("gru", VOCAB, WIDTH, CLASSES), "tokens", 6, 5, vmap=False),
    "packed_lstm": Layout(lambda t: PackedRecurrent("lstm", VOCAB, WIDTH, CLASSES), "tokens", 5, 4, vmap=False),
    "old_style_function": Layout(lambda t: OldStyleFunction(), "vector", vmap=False),
    # no parameter covered by a rule
    "spectral_norm": Layout(lambda t: spectral_norm_model(), "vector"),
    "weight_norm": Layout(lambda t: weight_norm_model(), "vector"),
    "bilinear_only": Layout(lambda t: BilinearOnly(), "sequence", 5, 3),
    "twice_registered": Layout(lambda t: TwiceRegistered(), "vector"),
    # forwards that update buffers
    "running_mean": Layout(lambda t: RunningMean(), "vector", vmap=False),
    "call_counter": Layout(lambda t: CallCounter(), "vector", vmap=False),
    "reassigned_stat": Layout(lambda t: ReassignedStat(), "vector"),
    # plain models
    "batch_norm_eval": Layout(lambda t: batch_norm_eval(), "vector"),
    "mlp": Layout(lambda t: tanh_mlp(FEATURES, WIDTH, CLASSES), "vector"),
}

#: Layouts whose forward writes to a buffer (in place or by reassignment), even in eval mode.
MUTATING = ("running_mean", "call_counter", "reassigned_stat")


# --- randomised models ------------------------------------------------------------------------------------------------

FRONTS = ("linear", "seq_first_linear", "flat_linear", "conv_time", "embedding")
BLOCKS = (
    "linear",
    "seq_first_linear",
    "flat_linear",
    "layer_norm",
    "seq_first_layer_norm",
    "gru",
    "seq_first_gru",
    "conv_time",
    "broadcast_buffer",
    "broadcast_parameter",
    "shared_twice",
    "tied",
)


class _Broadcast(nn.Module):
    """Adds ``proj(source)`` to every example, ``source`` a [1, T, 2] buffer or parameter."""

    def __init__(self, t: int, width: int, parameter: bool) -> None:
        super().__init__()
        source = torch.randn(1, t, 2)
        if parameter:
            self.source = nn.Parameter(source)
        else:
            self.register_buffer("source", source)
        self.proj = nn.Linear(2, width)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.proj(self.source)


class RandomModel(nn.Module):
    """A front layer, one to three blocks, mean pooling over time and a Linear head, drawn from ``seed``.

    Inputs are [N, T, C] (or token ids [N, T] for the "embedding" front); hidden states are [N, T, width].
    """

    def __init__(self, seed: int, t: int, width: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.front_kind = rng.choice(FRONTS)
        self.front = self._layer(self.front_kind, t, FEATURES, width)
        self.kinds = [rng.choice(BLOCKS) for _ in range(rng.randint(1, 3))]
        self.blocks = nn.ModuleList(self._layer(kind, t, width, width) for kind in self.kinds)
        self.head = nn.Linear(width, CLASSES)

    @staticmethod
    def _layer(kind: str, t: int, d_in: int, d_out: int) -> nn.Module:
        if kind in ("linear", "seq_first_linear", "flat_linear", "shared_twice"):
            return nn.Linear(d_in, d_out)
        if kind == "embedding":
            return nn.Embedding(VOCAB, d_out)
        if kind == "conv_time":
            return nn.Conv1d(d_in, d_out, kernel_size=3, padding=1)
        if kind in ("layer_norm", "seq_first_layer_norm"):
            norm = nn.LayerNorm(d_out)
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
            return norm
        if kind == "gru":
            return nn.GRU(d_in, d_out, batch_first=True)
        if kind == "seq_first_gru":
            return nn.GRU(d_in, d_out, batch_first=False)
        if kind in ("broadcast_buffer", "broadcast_parameter"):
            return _Broadcast(t, d_out, parameter=kind == "broadcast_parameter")
        if kind == "tied":
            pair = nn.ModuleList([nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)])
            pair[1].weight = pair[0].weight
            return pair
        raise ValueError(kind)

    @staticmethod
    def _run(kind: str, layer: nn.Module, h: Tensor) -> Tensor:
        if kind in ("linear", "embedding"):
            return torch.tanh(layer(h))
        if kind == "seq_first_linear":
            return torch.tanh(layer(h.transpose(0, 1))).transpose(0, 1)
        if kind == "flat_linear":
            n, t = h.shape[:2]
            return torch.tanh(layer(h.reshape(n * t, -1))).reshape(n, t, -1)
        if kind == "conv_time":
            return torch.tanh(layer(h.transpose(1, 2))).transpose(1, 2)
        if kind == "layer_norm":
            return layer(h)
        if kind == "seq_first_layer_norm":
            return layer(h.transpose(0, 1)).transpose(0, 1)
        if kind == "gru":
            return layer(h)[0]
        if kind == "seq_first_gru":
            return layer(h.transpose(0, 1))[0].transpose(0, 1)
        if kind in ("broadcast_buffer", "broadcast_parameter"):
            return layer(h)
        if kind == "shared_twice":
            return torch.tanh(layer(torch.tanh(layer(h))))
        if kind == "tied":
            return torch.tanh(layer[1](torch.tanh(layer[0](h))))
        raise ValueError(kind)

    def forward(self, x: Tensor) -> Tensor:
        h = self._run(self.front_kind, self.front, x)
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            h = self._run(kind, block, h)
        return self.head(h.mean(dim=1))

    def describe(self) -> str:
        return "-".join([self.front_kind, *self.kinds])


def random_model(seed: int) -> tuple[RandomModel, Tensor, Tensor]:
    """A float64 eval-mode :class:`RandomModel` with its inputs: N in 4..7, T in 3..6 (N == T about one time in
    four), width 4 or 6."""
    rng = random.Random(10_000 + seed)
    n = rng.randint(4, 7)
    t = n if rng.random() < 0.25 and n <= 6 else rng.randint(3, 6)
    width = rng.choice((4, 6))
    torch.manual_seed(seed)
    model = RandomModel(seed, t, width).double().eval()
    kind = "tokens" if model.front_kind == "embedding" else "sequence"
    x, y = make_inputs(kind, n, t, seed + 100)
    if kind == "tokens":
        x = x.clamp_min(1)  # no padding here: every position is a token
    return model, x, y
