"""Small models covering the layer types and parameter layouts the Gram engines must handle (:data:`MODELS`,
built by :func:`build`), and plain classifiers the tests train: a Tanh MLP, a CNN with BatchNorm for the digits, a
mean-pooling token model."""

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def frozen_first_layer() -> nn.Module:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 3))


class RawParameter(nn.Module):
    """A forward that uses a raw ``nn.Parameter`` outside any submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.shift = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.body(x) * self.scale + self.shift * x[:, :1]


class SharedLayer(nn.Module):
    """One module called twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class TiedWeights(nn.Module):
    """The same parameter registered under two modules' names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TokenModel(nn.Module):
    """Token ids through an embedding, mean-pooled over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.proj = nn.Linear(5, 3)

    def forward(self, tokens):
        return self.proj(self.embed(tokens).mean(dim=1))


def tanh_mlp(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    """Linear, Tanh, Linear: the smallest classifier with a hidden layer."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))


class DigitsCNN(nn.Module):
    """Flat 8x8 digits [N, 64] as images: a convolution, BatchNorm, max-pooling and a Linear head over 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 10)
        )

    def forward(self, x):
        return self.body(x.reshape(-1, 1, 8, 8))


class MeanPool(nn.Module):
    """Token ids through an embedding and a Linear with tanh, mean-pooled over the sequence (over the tokens whose
    ``mask`` is 1 where given), then a Linear head."""

    def __init__(self, vocab: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids, mask=None):
        h = torch.tanh(self.proj(self.embed(ids)))
        if mask is None:
            return self.head(h.mean(dim=1))
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def make_inputs(name: str, n: int, generator: torch.Generator):
    """(inputs, targets) for the model called ``name``, in float64 where floating."""
    if name == "cnn":
        x = torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)
    elif name == "tokens":
        x = torch.randint(0, 12, (n, 7), generator=generator)
    else:
        x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "frozen": frozen_first_layer,
    "layer_norm": layer_norm,
    "raw_parameter": RawParameter,
    "shared": SharedLayer,
    "tied": TiedWeights,
    "tokens": TokenModel,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().double().eval()
