"""Recurrent models (RNN, GRU, LSTM, packed sequences): their kernels have no factored rule and vmap cannot run
them, so the exact fallback (torch.func or the loop engine) computes their Gram matrices."""

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence


class RecurrentClassifier(nn.Module):
    """An RNN/GRU/LSTM over [N, T, C] (batch_first), its last output through a Linear head.

    ``steps``: flat inputs [N, steps * features] (a digits image read as 8 rows of 8 pixels) are read as ``steps``
    time steps of ``features``.
    """

    def __init__(
        self,
        kind: str,
        features: int,
        hidden: int,
        classes: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        steps: int | None = None,
    ) -> None:
        super().__init__()
        cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.features, self.steps = features, steps
        self.rnn = cell(features, hidden, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.steps is not None:
            x = x.reshape(-1, self.steps, self.features)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class LSTMOnly(nn.Module):
    """An LSTM whose last output is the logits: no parameter any factored rule covers."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, classes, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return out[:, -1]


class PackedRecurrent(nn.Module):
    """Token ids padded at the end through an embedding and ``pack_padded_sequence`` (so padding cannot change the
    outputs), the last hidden state through a Linear head.

    The lengths are read from ``mask`` (1 for a token, 0 for padding) where given, else from the ids (0 is padding).
    ``embedding``: the embedding width (``width`` where None).
    """

    def __init__(
        self,
        kind: str,
        vocab: int,
        width: int,
        classes: int,
        embedding: int | None = None,
        padding_idx: int | None = 0,
    ) -> None:
        super().__init__()
        embedding = width if embedding is None else embedding
        self.embed = nn.Embedding(vocab, embedding, padding_idx=padding_idx)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](embedding, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        lengths = (tokens != 0).sum(dim=1).cpu() if mask is None else mask.sum(1).long().cpu()
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, hidden = self.rnn(packed)
        if isinstance(hidden, tuple):  # LSTM: (h, c)
            hidden = hidden[0]
        return self.head(hidden[-1])
