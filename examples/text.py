"""A small transformer text classifier trained with StiffnessCallback: dict batches, padding, an attention mask.

Synthetic sequences, nothing downloaded: each class has its own few "topic" tokens, and a sequence of 8 to 24 tokens
mixes them with tokens drawn from the whole vocabulary, so a model must learn which tokens tell the classes apart.
Items are dicts ``{"input_ids": LongTensor[L], "labels": int}`` of different lengths; the loaders' ``collate_fn``
pads them and adds an ``attention_mask``. The probe examples go through the same ``collate_fn``, and the model is
called as ``model(input_ids=..., attention_mask=...)``.

    python examples/text.py fit --config examples/configs/text.yaml
    python examples/text.py fit --help
"""

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

PAD = 0


class TopicSequences(Dataset):
    """``size`` sequences of ``num_classes`` classes; tokens 1..vocab_size-1 (0 pads).

    Args:
        size: number of sequences.
        num_classes: classes, each with ``topic_tokens`` tokens of its own.
        vocab_size: tokens, padding included.
        topic_share: the share of a sequence's tokens drawn from its class's topic tokens.
        seed: the draw's seed (train and validation sets use different seeds).
    """

    def __init__(
        self,
        size: int,
        num_classes: int = 4,
        vocab_size: int = 64,
        topic_tokens: int = 4,
        topic_share: float = 0.3,
        seed: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        topics = torch.randperm(vocab_size - 1, generator=generator)[: num_classes * topic_tokens] + 1
        topics = topics.reshape(num_classes, topic_tokens)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)
        self.sequences = []
        for label in self.labels.tolist():
            length = int(torch.randint(8, 25, (1,), generator=generator))
            tokens = torch.randint(1, vocab_size, (length,), generator=generator)
            from_topic = torch.rand(length, generator=generator) < topic_share
            picks = topics[label, torch.randint(0, topic_tokens, (length,), generator=generator)]
            self.sequences.append(torch.where(from_topic, picks, tokens))
        self.classes = [f"topic {c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        return {"input_ids": self.sequences[index], "labels": int(self.labels[index])}


def pad_collate(items: list[dict[str, Tensor | int]]) -> dict[str, Tensor]:
    """Pad ``input_ids`` to the longest item with :data:`PAD`; ``attention_mask`` is True on real tokens."""
    ids = nn.utils.rnn.pad_sequence([item["input_ids"] for item in items], batch_first=True, padding_value=PAD)
    return {
        "input_ids": ids,
        "attention_mask": ids != PAD,
        "labels": torch.tensor([item["labels"] for item in items]),
    }


class TextData(LightningDataModule):
    """Train and validation :class:`TopicSequences`, batched with :func:`pad_collate`."""

    def __init__(self, train_size: int = 800, val_size: int = 200, num_classes: int = 4, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        self.train = TopicSequences(self.hparams.train_size, self.hparams.num_classes, seed=1)
        self.val = TopicSequences(self.hparams.val_size, self.hparams.num_classes, seed=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, self.hparams.batch_size, shuffle=True, collate_fn=pad_collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, self.hparams.batch_size, collate_fn=pad_collate)


class TextClassifier(LightningModule):
    """Token embedding + learned positions -> batch-first ``nn.TransformerEncoder`` with a key padding mask ->
    mean over real tokens -> linear classifier.

    Args:
        vocab_size: tokens, padding (0) included.
        num_classes: classes.
        d_model: width of the embeddings and the encoder.
        num_layers: encoder layers.
        num_heads: attention heads.
        max_length: longest sequence the position table covers.
        lr: Adam's learning rate.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        num_classes: int = 4,
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 32,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(1, max_length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 2 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        h = self.embed(input_ids) + self.position[:, :length]
        h = self.encoder(h, src_key_padding_mask=~attention_mask)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(dim=1) / mask.sum(dim=1))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/accuracy", (logits.argmax(dim=1) == batch["labels"]).float().mean())
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    LightningCLI(TextClassifier, TextData)


if __name__ == "__main__":
    main()
