"""Small transformer-ish models: tiny sizes, dropout 0, built in float32 (``tests/test_transformers.py`` converts
them with ``.double().eval()``). Most use the sizes below; :class:`SentenceEncoder` (and its recurrent variant) and
:class:`RowsEncoder` take theirs from their callers."""

import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 13
WIDTH = 8
HEADS = 2
CLASSES = 3


def _encoder(batch_first: bool, layers: int = 2, norm_first: bool = False, bias: bool = True, final_norm=False):
    layer = nn.TransformerEncoderLayer(
        WIDTH, HEADS, dim_feedforward=12, dropout=0.0, batch_first=batch_first, norm_first=norm_first, bias=bias
    )
    norm = nn.LayerNorm(WIDTH, bias=bias) if final_norm else None
    return nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)


class EncoderClassifier(nn.Module):
    """Token ids [N, T] -> embedding + learned positions -> ``nn.TransformerEncoder`` -> mean over T -> Linear."""

    def __init__(self, t: int, batch_first: bool = True, norm_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.3 * torch.randn((1, t, WIDTH) if batch_first else (t, 1, WIDTH)))
        self.encoder = _encoder(batch_first, norm_first=norm_first, bias=bias, final_norm=norm_first)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self.head(self.encoder(self.embed(ids) + self.pos).mean(dim=1))
        return self.head(self.encoder(self.embed(ids.T) + self.pos).mean(dim=0))  # [T, N, d]


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` from a query sequence to a memory with its own key and value widths.

    forward(query [N, Tq, d], key [N, Tk, kdim], value [N, Tk, vdim], key_padding_mask [N, Tk] bool, optional).
    """

    def __init__(self, kdim=None, vdim=None, batch_first=True, add_bias_kv=False, add_zero_attn=False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(
            WIDTH,
            HEADS,
            dropout=0.0,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, query, key, value, key_padding_mask=None):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, _ = self.attn(query, key, value, key_padding_mask=key_padding_mask)
        return self.head(out.mean(dim=1 if self.batch_first else 0))


class SelfAttention(nn.Module):
    """Self-attention (one tensor as query, key and value): the packed in-projection used whole."""

    def __init__(self, batch_first=True, add_bias_kv=False, add_zero_attn=False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(
            WIDTH, HEADS, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, batch_first=batch_first
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x, key_padding_mask=None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask)
        return self.head(out.mean(dim=1 if self.batch_first else 0))


class TiedClassifier(nn.Module):
    """Embedding (with ``padding_idx``) whose table is also the output layer: a module tie or ``F.linear``."""

    def __init__(self, padding_idx: int = 0, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx)
        self.mix = nn.Linear(WIDTH, WIDTH)
        if not functional:
            self.out = nn.Linear(WIDTH, VOCAB, bias=False)
            self.out.weight = self.embed.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))  # [N, T, d]
        return F.linear(h, self.embed.weight) if self.functional else self.out(h)  # [N, T, V]


def token_loss(padding_idx: int):
    """Per-example loss of a language model: cross-entropy summed over the non-padding positions."""

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=padding_idx).sum(1)

    return loss_fn


class TwiceMLP(nn.Module):
    """One MLP block applied twice (weight sharing), on vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.LayerNorm(WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.block(self.block(x)))


class TwiceEncoderLayer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` applied twice over token embeddings."""

    def __init__(self, t: int, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.3 * torch.randn(1, t, WIDTH))
        self.layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.embed(ids) + self.pos
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.layer(self.layer(h))
        return self.head(h.mean(dim=1 if self.batch_first else 0))


class DecoderClassifier(nn.Module):
    """``nn.TransformerDecoderLayer`` (causal self-attention and cross-attention to an encoded source).

    forward(tgt_ids [N, Tt], src_ids [N, Ts]); one embedding for both sides.
    """

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.decoder = nn.TransformerDecoderLayer(WIDTH, HEADS, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tgt_ids, src_ids):
        tgt, src = self.embed(tgt_ids), self.embed(src_ids)
        if not self.batch_first:
            tgt, src = tgt.transpose(0, 1), src.transpose(0, 1)
        size = tgt_ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(size, dtype=tgt.dtype)
        h = self.decoder(tgt, src, tgt_mask=causal)
        return self.head(h.mean(dim=1 if self.batch_first else 0))


class MaskedEncoder(nn.Module):
    """forward(input_ids [N, T], attention_mask [N, T]): padding masked from attention and from a masked mean."""

    def __init__(self, max_len: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.pos = nn.Parameter(0.3 * torch.randn(1, max_len, WIDTH))
        self.encoder = _encoder(batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(dim=1) / weights.sum(dim=1))


class Wrapper(nn.Module):
    """A LightningModule-like wrapper: the network in ``self.model``, no forward of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class Tempered(nn.Module):
    """A forward that needs an extra argument: logits divided by a temperature."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.net = EncoderClassifier(t)

    def forward(self, ids, temperature):
        return self.net(ids) / temperature


class TextCNN(nn.Module):
    """Embeddings -> Conv1d -> GroupNorm -> ReLU -> max over time -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, 6, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv1d(6, 4, kernel_size=2, dilation=2, stride=1)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, ids):
        h = self.embed(ids).transpose(1, 2)  # [N, d, T]
        h = F.relu(self.norm(self.conv(h)))
        return self.head(self.conv2(h).amax(dim=2))


class NoBiasLayerNormMLP(nn.Module):
    """LayerNorm without bias, and LayerNorm over two trailing dimensions, on sequences."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH, bias=False)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm([t, WIDTH])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.norm2(torch.tanh(self.proj(self.norm(self.embed(ids)))))
        return self.head(h.mean(dim=1))


class TinyViT(nn.Module):
    """Images [N, 1, 4, 4] -> Conv2d patches -> class token (expanded, concatenated) + positions -> encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, WIDTH, kernel_size=2, stride=2)
        self.cls = nn.Parameter(0.3 * torch.randn(1, 1, WIDTH))
        self.pos = nn.Parameter(0.3 * torch.randn(1, 5, WIDTH))
        self.encoder = _encoder(batch_first=True, layers=1, norm_first=True, final_norm=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, images):
        h = self.patch(images).flatten(2).transpose(1, 2)  # [N, 4, d]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        return self.head(self.encoder(h)[:, 0])


# ---- layouts written by hand, to try to break the engine ----


class HandAttention(nn.Module):
    """Attention written with einsum: a packed q/k/v weight split with ``chunk``, scores by einsum, the output
    projection by ``@ weight.T``, a causal mask and a learned 0-dim temperature."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.3 * torch.randn(t, WIDTH))  # [T, d], broadcast over the examples
        self.qkv = nn.Parameter(torch.randn(3 * WIDTH, WIDTH) / math.sqrt(WIDTH))
        self.out_weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH))
        self.out_bias = nn.Parameter(torch.zeros(WIDTH))
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.embed(ids) + self.pos
        n, t, _ = h.shape
        wq, wk, wv = self.qkv.chunk(3)
        q, k, v = (F.linear(h, w).view(n, t, HEADS, -1) for w in (wq, wk, wv))
        scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        mixed = torch.einsum("nhqk,nkhe->nqhe", scores.softmax(-1), v).reshape(n, t, -1)
        h = h + mixed @ self.out_weight.T + self.out_bias
        return self.head(h.mean(dim=1)) * self.temperature


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rotary(nn.Module):
    """Separate q/k/v Linears, rotary position embeddings from buffers, ``F.scaled_dot_product_attention``
    (causal), RMSNorm, a SwiGLU MLP."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.o = nn.Linear(WIDTH, WIDTH, bias=False)
        self.norm = nn.RMSNorm(WIDTH)
        self.gate, self.up = nn.Linear(WIDTH, 12, bias=False), nn.Linear(WIDTH, 12, bias=False)
        self.down = nn.Linear(12, WIDTH, bias=False)
        head = WIDTH // HEADS
        freq = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
        angles = torch.outer(torch.arange(t).float(), freq).repeat(1, 2)  # [T, head]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.embed(ids)
        n, t, _ = h.shape
        x = self.norm(h)
        q, k, v = (proj(x).view(n, t, HEADS, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
        h = h + self.o(attended)
        h = h + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(h[:, -1])


class FullTransformer(nn.Module):
    """``nn.Transformer`` (encoder and decoder, causal target mask), sequence-first, one embedding for both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(
            WIDTH, HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=12, dropout=0.0
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, src_ids, tgt_ids):
        src, tgt = self.embed(src_ids.T), self.embed(tgt_ids.T)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0], dtype=tgt.dtype)
        return self.head(self.transformer(src, tgt, tgt_mask=mask)[-1])


class OddUses(nn.Module):
    """Parameters used in ways no module makes: a weight through ``.T`` in ``F.linear``, a weight used in
    ``F.linear`` and elementwise, a weight used as both factors of a product, subtractions with ``alpha``, an
    embedding table tied to the output through ``@ table.T``, a row slice of a table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, WIDTH) / 2)
        self.w_t = nn.Parameter(torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH))
        self.w = nn.Parameter(torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH))
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(WIDTH))
        self.shift = nn.Parameter(0.1 * torch.randn(WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = F.embedding(ids, self.table[1:])  # ids < VOCAB - 1
        h = torch.tanh(F.linear(h, self.w_t.T))
        g = F.linear(h, self.w)  # [N, T, d]
        h = h + (g.unsqueeze(-1) * self.w).mean(-1)  # w elementwise, broadcast over [N, T]
        h = h * self.scale * self.scale  # scale as both factors
        h = torch.sub(h, self.shift, alpha=0.5) - self.shift
        h = self.shift - h
        pooled = torch.tanh(h).mean(dim=1)
        return self.head(pooled) + (pooled @ self.table.T)[:, :CLASSES]


class SortsByLength(nn.Module):
    """Sorts the batch by length (as code feeding packed RNNs does), runs its layers on the sorted batch, and puts the
    outputs back in the caller's order. forward(ids [N, T], lengths [N])."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids, lengths):
        order = lengths.argsort(descending=True, stable=True)
        h = torch.tanh(self.proj(self.embed(ids[order])))  # the layers see the sorted batch
        mask = (torch.arange(ids.shape[1]) < lengths[order, None]).unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1)
        return self.head(pooled[order.argsort()])


class InPlaceAfterLinear(nn.Module):
    """The output of a Linear written in place (masked_fill_, an indexed assignment) before it is used."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.proj(self.embed(ids))
        h.masked_fill_((ids == 0).unsqueeze(-1), 0.0)
        h[:, 0] = h[:, 0] * 2
        return self.head(torch.tanh(h).mean(dim=1))


class Checkpointed(nn.Module):
    """An encoder whose layers run under ``torch.utils.checkpoint(use_reentrant=False)`` (activation checkpointing;
    the reentrant variant refuses ``torch.autograd.grad`` altogether)."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.3 * torch.randn(1, t, WIDTH))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, HEADS, 12, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = self.embed(ids) + self.pos
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
        return self.head(h.mean(dim=1))


class WeightNormed(nn.Module):
    """A Linear under ``torch.nn.utils.parametrizations.weight_norm`` after an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))).mean(dim=1))


class LoRA(nn.Module):
    """A frozen projection with a trainable low-rank update, ``F.linear(x, weight + B @ A)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.embed.weight.requires_grad_(False)
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH), requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(2, WIDTH) / 4)
        self.lora_b = nn.Parameter(torch.randn(WIDTH, 2) / 4)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        h = torch.tanh(F.linear(self.embed(ids), self.weight + self.lora_b @ self.lora_a))
        return self.head(h.mean(dim=1))


class SentenceEncoder(nn.Module):
    """Embedding + positions -> one batch-first encoder layer with a key padding mask -> masked mean -> classes.

    forward(input_ids [N, T], attention_mask [N, T] bool, True for a token); T is at most 8.
    """

    def __init__(self, vocab: int, pad: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=pad)
        self.position = nn.Parameter(torch.randn(1, 8, 8) * 0.1)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
        h = self.contextualise(h, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))

    def contextualise(self, h, attention_mask):
        return self.layer(h, src_key_padding_mask=~attention_mask)


class RecurrentSentenceEncoder(SentenceEncoder):
    """The same, with a GRU after the attention layer: its weights need the loop engine (vmap cannot run it)."""

    def __init__(self, vocab: int, pad: int, classes: int) -> None:
        super().__init__(vocab, pad, classes)
        self.gru = nn.GRU(8, 8, batch_first=True)

    def contextualise(self, h, attention_mask):
        return self.gru(super().contextualise(h, attention_mask))[0]


class RowsEncoder(nn.Module):
    """Digits [N, 64] as 8 rows of 8 pixels: a batch-first transformer encoder layer over the rows, then a linear
    head over 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.layer(self.embed(x.reshape(-1, 8, 8))).mean(1))
