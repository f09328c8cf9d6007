"""Tiny Hugging Face models of 21 families for tests of the Gram engine.

Every builder takes ``n`` (examples along dim 0) and returns a :class:`Case`: a wrapper module whose forward takes a
tensor or a dict of tensors and returns plain logits, the inputs, the targets and a per-example loss. Configs are tiny
(hidden 16-32, 2 layers, 2-4 heads), weights random from fixed seeds (never downloaded), every dropout, layerdrop and
drop path 0, eager attention, float32, ``.eval()``. Text inputs are ``input_ids`` [N, T] with T = 7 and an
``attention_mask`` that pads some rows at the end. Convert a case with ``.double()`` for float64 references: float
inputs with ``.double()``, token ids stay long.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from torch.nn import functional as F

T = 7  # sequence length: odd and not a common batch size
VOCAB = 50
CLASSES = 3
IMAGE = 16
SEED = 0

#: The BERT-style dropouts, all 0.
NO_DROPOUT = dict(
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    classifier_dropout=0.0,
)


@dataclass
class Case:
    """A model and a batch for it: ``loss_fn(model(inputs), targets)`` gives per-example losses [N]."""

    model: nn.Module
    inputs: Tensor | dict[str, Tensor]
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]


class Wrapper(nn.Module):
    """``hf(**batch).logits`` for a dict (given whole, or as keywords: the Gram engine calls ``model(**batch)``),
    ``hf(x).logits`` for a tensor (passed as keyword ``key`` when given)."""

    def __init__(self, hf: nn.Module, key: str | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.key = key

    def forward(self, batch: Any = None, **kwargs: Tensor) -> Tensor:
        if kwargs:
            batch = kwargs if batch is None else {self.key: batch, **kwargs}
        if isinstance(batch, dict):
            return self.hf(**batch).logits
        if self.key is not None:
            return self.hf(**{self.key: batch}).logits
        return self.hf(batch).logits


def class_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per example: outputs [N, C], targets [N]."""
    return F.cross_entropy(outputs, targets, reduction="none")


def token_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example mean cross-entropy over the tokens with a target (-100: none): outputs [N, T, V], targets [N, T]."""
    losses = F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none", ignore_index=-100)  # [N, T]
    kept = (targets != -100).to(losses.dtype)
    return (losses * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)


def _lengths(n: int) -> Tensor:
    """Row lengths: full rows and rows padded at the end (every other row shorter)."""
    cycle = [T, T - 2, T, T - 3, T - 1, T]
    return torch.tensor([cycle[i % len(cycle)] for i in range(n)])


def _text(n: int, pad_id: int = 0, low: int = 2, vocab: int = VOCAB) -> dict[str, Tensor]:
    """``input_ids`` [n, T] in [low, vocab) and an ``attention_mask`` with trailing zeros in some rows (ids = pad)."""
    ids = torch.randint(low, vocab, (n, T))
    mask = (torch.arange(T)[None, :] < _lengths(n)[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def _labels(n: int, classes: int = CLASSES) -> Tensor:
    return torch.arange(n) % classes


def _next_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Causal LM targets [N, T]: the next token where both positions are real, else -100."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return targets


def _finish(hf: nn.Module, inputs, targets, loss_fn, key: str | None = None) -> Case:
    model = Wrapper(hf, key).float().eval()
    return Case(model, inputs, targets, loss_fn)


def _classify_text(cls, config, n: int, pad_id: int = 0) -> Case:
    torch.manual_seed(SEED)
    hf = cls(config)
    torch.manual_seed(SEED + 1)
    return _finish(hf, _text(n, pad_id), _labels(n), class_loss)


def _causal_lm(cls, config, n: int) -> Case:
    torch.manual_seed(SEED)
    hf = cls(config)
    torch.manual_seed(SEED + 1)
    batch = _text(n, config.pad_token_id if config.pad_token_id is not None else 0)
    return _finish(hf, batch, _next_tokens(batch), token_loss)


def _bert_like(**extra) -> dict:
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=CLASSES,
        attn_implementation="eager",
        **NO_DROPOUT,
    )
    sizes.update(extra)
    return sizes


def bert(n: int = 6) -> Case:
    config = transformers.BertConfig(**_bert_like(type_vocab_size=2, pad_token_id=0))
    return _classify_text(transformers.BertForSequenceClassification, config, n)


def roberta(n: int = 6) -> Case:
    # RoBERTa numbers positions from padding_idx + 1 and skips the pads: pad 1, real ids >= 2.
    config = transformers.RobertaConfig(
        **_bert_like(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=T + 4)
    )
    return _classify_text(transformers.RobertaForSequenceClassification, config, n, pad_id=1)


def distilbert(n: int = 6) -> Case:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        pad_token_id=0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return _classify_text(transformers.DistilBertForSequenceClassification, config, n)


def albert(n: int = 6) -> Case:
    config = transformers.AlbertConfig(
        **_bert_like(embedding_size=8, num_hidden_groups=1, inner_group_num=1, type_vocab_size=2, pad_token_id=0)
    )
    return _classify_text(transformers.AlbertForSequenceClassification, config, n)


def electra(n: int = 6) -> Case:
    config = transformers.ElectraConfig(**_bert_like(embedding_size=8, type_vocab_size=2, pad_token_id=0))
    return _classify_text(transformers.ElectraForSequenceClassification, config, n)


def deberta_v2(n: int = 6) -> Case:
    config = transformers.DebertaV2Config(
        **_bert_like(
            type_vocab_size=0,
            pad_token_id=0,
            relative_attention=True,
            max_relative_positions=8,
            position_buckets=4,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pooler_dropout=0.0,
            pooler_hidden_size=16,
        )
    )
    return _classify_text(transformers.DebertaV2ForSequenceClassification, config, n)


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_inner=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        num_labels=CLASSES,
        attn_implementation="eager",
    )


def gpt2(n: int = 6) -> Case:
    # Pools the last non-pad token (found from pad_token_id in input_ids).
    return _classify_text(transformers.GPT2ForSequenceClassification, _gpt2_config(), n)


def gpt2_lm(n: int = 6) -> Case:
    # Tied: lm_head.weight is transformer.wte.weight.
    return _causal_lm(transformers.GPT2LMHeadModel, _gpt2_config(), n)


def _decoder_config(cls, **extra):
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=32,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        num_labels=CLASSES,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="eager",
    )
    sizes.update(extra)
    return cls(**sizes)


def llama(n: int = 6) -> Case:
    return _classify_text(transformers.LlamaForSequenceClassification, _decoder_config(transformers.LlamaConfig), n)


def llama_lm(n: int = 6) -> Case:
    return _causal_lm(transformers.LlamaForCausalLM, _decoder_config(transformers.LlamaConfig), n)


def mistral(n: int = 6) -> Case:
    # A sliding window shorter than T, so the window shows in the mask.
    config = _decoder_config(transformers.MistralConfig, sliding_window=4)
    return _classify_text(transformers.MistralForSequenceClassification, config, n)


def qwen2(n: int = 6) -> Case:
    # Qwen2 has biases on q, k, v.
    config = _decoder_config(transformers.Qwen2Config, use_sliding_window=False)
    return _classify_text(transformers.Qwen2ForSequenceClassification, config, n)


def qwen3(n: int = 6) -> Case:
    # Qwen3 normalises q and k per head (RMSNorm over head_dim).
    config = _decoder_config(transformers.Qwen3Config, head_dim=8, use_sliding_window=False)
    return _classify_text(transformers.Qwen3ForSequenceClassification, config, n)


def t5(n: int = 6) -> Case:
    """Encoder-decoder with an LM head tied to the shared embedding; per-example token-mean loss on the decoder."""
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        classifier_dropout=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    hf = transformers.T5ForConditionalGeneration(config)
    torch.manual_seed(SEED + 1)
    batch = _text(n)
    labels = torch.randint(2, VOCAB, (n, T))
    decoder_ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), labels[:, :-1]], dim=1)  # shifted right
    batch["decoder_input_ids"] = decoder_ids
    return _finish(hf, batch, labels, token_loss)


def modernbert(n: int = 6) -> Case:
    # Layer 0 global attention, layer 1 local: each token sees +-3 positions (local_attention 6, < T). A narrower
    # window leaves the padded queries of a row with 3 pads no real key, and ModernBERT then gives NaN logits for that
    # row alone (batch of 1; finite inside the batch). GLU MLP, no biases, mean pooling over the mask.
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        layer_types=["full_attention", "sliding_attention"],
        local_attention=6,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        classifier_dropout=0.0,
        classifier_pooling="mean",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        cls_token_id=1,
        sep_token_id=1,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return _classify_text(transformers.ModernBertForSequenceClassification, config, n)


def _images(n: int, size: int = IMAGE, channels: int = 3) -> Tensor:
    return torch.randn(n, channels, size, size)


def _classify_image(cls, config, n: int, size: int = IMAGE) -> Case:
    torch.manual_seed(SEED)
    hf = cls(config)
    torch.manual_seed(SEED + 1)
    return _finish(hf, _images(n, size), _labels(n), class_loss, key="pixel_values")


def vit(n: int = 6) -> Case:
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return _classify_image(transformers.ViTForImageClassification, config, n)


def swin(n: int = 6) -> Case:
    # 16x16 image, patch 2 -> 8x8 tokens, window 2 (shifted in the second block), patch merging to 4x4.
    config = transformers.SwinConfig(
        image_size=IMAGE,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=2,
        mlp_ratio=2.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return _classify_image(transformers.SwinForImageClassification, config, n)


def convnext(n: int = 6) -> Case:
    # 32x32 image, stem 4x4 stride 4 -> 8x8, depthwise 7x7, channels-last LayerNorm, layer scale.
    config = transformers.ConvNextConfig(
        num_channels=3,
        patch_size=4,
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        drop_path_rate=0.0,
        layer_scale_init_value=0.5,
        image_size=32,
        num_labels=CLASSES,
    )
    return _classify_image(transformers.ConvNextForImageClassification, config, n, size=32)


def resnet(n: int = 6) -> Case:
    # BatchNorm in eval mode, running statistics made non-trivial.
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
        num_labels=CLASSES,
    )
    torch.manual_seed(SEED)
    hf = transformers.ResNetForImageClassification(config)
    for module in hf.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    torch.manual_seed(SEED + 1)
    return _finish(hf, _images(n, 32), _labels(n), class_loss, key="pixel_values")


def wav2vec2(n: int = 6) -> Case:
    """Raw waveform [N, 400]: conv feature extractor (GroupNorm on the first conv), weight-normed grouped positional
    conv, 2 post-norm encoder layers, mean pooling."""
    config = transformers.Wav2Vec2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        feat_extract_norm="group",
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        conv_bias=False,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=False,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        use_weighted_layer_sum=False,
        classifier_proj_size=16,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    hf = transformers.Wav2Vec2ForSequenceClassification(config)
    torch.manual_seed(SEED + 1)
    return _finish(hf, torch.randn(n, 400), _labels(n), class_loss, key="input_values")


def whisper_encoder(n: int = 6) -> Case:
    """Whisper encoder + projector + classifier: input_features [N, 8 mel bins, 16 frames] -> conv stride 2 -> 8
    positions (sinusoidal, frozen)."""
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        d_model=16,
        max_source_positions=8,
        max_target_positions=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        use_weighted_layer_sum=False,
        classifier_proj_size=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=1,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    hf = transformers.WhisperForAudioClassification(config)
    torch.manual_seed(SEED + 1)
    features = torch.randn(n, config.num_mel_bins, 2 * config.max_source_positions)
    return _finish(hf, features, _labels(n), class_loss, key="input_features")


#: Family name -> builder ``(n=6) -> Case``.
FAMILIES: dict[str, Callable[[], Case]] = {
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "albert": albert,
    "electra": electra,
    "deberta_v2": deberta_v2,
    "gpt2": gpt2,
    "gpt2_lm": gpt2_lm,
    "llama": llama,
    "llama_lm": llama_lm,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "t5": t5,
    "modernbert": modernbert,
    "vit": vit,
    "swin": swin,
    "convnext": convnext,
    "wav2vec2": wav2vec2,
    "whisper_encoder": whisper_encoder,
    "resnet": resnet,
}
