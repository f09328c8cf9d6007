"""The Gram engines on transformers and real batches (issue 11): every value against a brute-force float64 loop.

The reference here slices structured inputs (a tuple of positional arguments, a dict of keyword arguments) per
example and calls the model the way the engines do: ``model(x)``, ``model(*x)``, ``model(**x)`` or
``forward_fn(model, x)``; it shares nothing with the engines. Models are tiny (vocabulary 13, width 8, 2 heads).
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_stiffness.functional import gradient_gram, layer_outputs
from lightning_stiffness.gram import gram_plan
from tests.models import transformer as tm
from tests.models.basic import MeanPool
from tests.reference import call, cross_entropy, reference_gram

RTOL = 1e-7
EXACT_ENGINES = ("torch.func", "loop")


# ---- a reference for structured inputs ----


def ref_losses(model, x, y, loss_fn=None, forward_fn=None):
    return (loss_fn or cross_entropy)(call(model, x, forward_fn), y)


def _state(model):
    return {
        "params": [(name, p, p.detach().clone(), p.requires_grad, p.grad) for name, p in model.named_parameters()],
        "buffers": [(name, b.detach().clone()) for name, b in model.named_buffers()],
    }


def assert_unchanged(model, before):
    """Parameters (the same objects, bitwise, flags and .grad), buffers bitwise."""
    after = dict(model.named_parameters())
    for name, p, value, flag, grad in before["params"]:
        assert after[name] is p, f"{name} was replaced"
        assert torch.equal(p.detach(), value), f"{name} changed"
        assert p.requires_grad == flag and p.grad is grad, f"{name}: requires_grad or .grad changed"
    buffers = dict(model.named_buffers())
    for name, value in before["buffers"]:
        assert torch.equal(buffers[name], value), f"buffer {name} changed"
    assert not any(isinstance(p, torch.Tensor) and type(p).__name__ != "Parameter" for p in model.parameters())


def assert_gram_close(got, want, rtol=RTOL):
    assert got.shape == want.shape
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def check_engines(
    model,
    x,
    y,
    x2,
    y2,
    *,
    engines=("auto", "loop"),
    chunk_size=None,
    loss_fn=None,
    forward_fn=None,
):
    """Square (with ``chunk_size``) and cross Gram matrices of every engine against the reference."""
    want = reference_gram(model, x, y, loss_fn=loss_fn, forward_fn=forward_fn)
    want_cross = reference_gram(model, x, y, x2, y2, loss_fn=loss_fn, forward_fn=forward_fn)
    before = _state(model)
    for method in engines:
        kwargs = {"loss_fn": loss_fn, "forward_fn": forward_fn, "method": method}
        got = gradient_gram(model, x, y, chunk_size=chunk_size, **kwargs)
        assert_unchanged(model, before)
        assert_gram_close(got, want)
        got_cross = gradient_gram(model, x, y, x2, y2, **kwargs)
        assert_unchanged(model, before)
        assert_gram_close(got_cross, want_cross)


def _prepared(model, seed=0):
    torch.manual_seed(seed)
    return model.double().eval()


def _ids(n, t, seed, low=0, high=tm.VOCAB):
    return torch.randint(low, high, (n, t), generator=torch.Generator().manual_seed(seed))


def _labels(n, seed, classes=tm.CLASSES):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _float(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_all_factored(model, x, y, forward_fn=None):
    plan = gram_plan(model, x, y, forward_fn=forward_fn)
    assert not plan.fallback, str(plan)
    assert not {form for form in plan.forms.values() if form in ("torch.func", "loop")}, str(plan)
    assert set(plan.forms) == {name for name, _ in model.named_parameters()}


# ---- 1. nn.TransformerEncoder classifiers, batch-first and sequence-first ----


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("n,t", [(4, 5), (5, 5), (3, 3)], ids=["N!=T", "N==T", "N==T==3"])
def test_encoder_classifier(batch_first, n, t):
    torch.manual_seed(0)
    model = _prepared(tm.EncoderClassifier(t, batch_first=batch_first))
    x, y = _ids(n, t, 1), _labels(n, 2)
    x2, y2 = _ids(n + 2, t, 3), _labels(n + 2, 4)
    check_engines(model, x, y, x2, y2, engines=("auto", "torch.func"), chunk_size=2)
    assert_all_factored(model, x, y)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_norm_first_without_bias(batch_first):
    torch.manual_seed(1)
    model = _prepared(tm.EncoderClassifier(4, batch_first=batch_first, norm_first=True, bias=False))
    x, y, x2, y2 = _ids(6, 4, 5), _labels(6, 6), _ids(4, 4, 7), _labels(4, 8)
    check_engines(model, x, y, x2, y2, chunk_size=4)
    assert_all_factored(model, x, y)


# ---- 2. nn.MultiheadAttention: kdim/vdim, add_bias_kv, add_zero_attn, key_padding_mask ----

ATTENTION_CASES = {
    "kdim_vdim": dict(kdim=5, vdim=6),
    "kdim_vdim_bias_kv": dict(kdim=5, vdim=6, add_bias_kv=True),
    "kdim_vdim_zero_attn": dict(kdim=5, vdim=6, add_zero_attn=True),
    "same_dims_cross": dict(),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
}


def _key_padding_mask(n, t):
    lengths = torch.arange(n) % t + 1  # 1..t keys kept, the rest masked
    return torch.arange(t) >= lengths[:, None]


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_cross_attention(case, batch_first, masked):
    settings = ATTENTION_CASES[case]
    torch.manual_seed(2)
    model = _prepared(tm.CrossAttention(batch_first=batch_first, **settings))
    kdim, vdim = settings.get("kdim", tm.WIDTH), settings.get("vdim", tm.WIDTH)

    def inputs(n, seed):
        x = (_float(n, 2, tm.WIDTH, seed=seed), _float(n, 4, kdim, seed=seed + 1), _float(n, 4, vdim, seed=seed + 2))
        return (*x, _key_padding_mask(n, 4)) if masked else x

    x, x2 = inputs(5, 10), inputs(4, 20)
    y, y2 = _labels(5, 11), _labels(4, 21)
    plan = gram_plan(model, x, y)
    fallback = set(plan.fallback)
    allowed = {"attn.bias_k", "attn.bias_v"} if settings.get("add_bias_kv") else set()
    assert fallback <= allowed, str(plan)
    check_engines(model, x, y, x2, y2, engines=("auto", "torch.func"), chunk_size=2)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize(
    "settings", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True)], ids=["plain", "bias_kv", "zero_attn"]
)
def test_self_attention_with_key_padding_mask(settings, batch_first):
    torch.manual_seed(3)
    model = _prepared(tm.SelfAttention(batch_first=batch_first, **settings))
    x = (_float(6, 4, tm.WIDTH, seed=30), _key_padding_mask(6, 4))
    x2 = (_float(3, 4, tm.WIDTH, seed=31), _key_padding_mask(3, 4))
    check_engines(model, x, y := _labels(6, 32), x2, _labels(3, 33), chunk_size=4)
    if not settings:
        assert_all_factored(model, x, y)


# ---- 3. tied embedding and output layer, with padding_idx ----


@pytest.mark.parametrize("padding_idx", [0, 4, -1], ids=["pad0", "pad4", "pad_last"])
@pytest.mark.parametrize("functional", [False, True], ids=["module_tie", "F.linear"])
def test_tied_embedding_with_padding(functional, padding_idx):
    torch.manual_seed(4)
    model = _prepared(tm.TiedClassifier(padding_idx=padding_idx, functional=functional))
    pad = padding_idx % tm.VOCAB
    x = _ids(5, 4, 40)
    x[:, -1] = pad  # every example ends with padding, some have more
    x[1, 1:] = pad
    x2 = _ids(4, 4, 41)
    x2[0, 2:] = pad
    y, y2 = _ids(5, 4, 42), _ids(4, 4, 43)
    y[0, 0] = pad  # a target on the padding index is ignored by the loss
    loss_fn = tm.token_loss(pad)
    check_engines(model, x, y, x2, y2, engines=("auto", "torch.func"), chunk_size=2, loss_fn=loss_fn)
    # the padding row of the table gets its gradient from the output layer only
    assert_all_factored_with_loss(model, x, y, loss_fn)
    layers = gradient_gram(model, x, y, loss_fn=loss_fn, per_layer=True)
    assert list(layers) == ["embed", "mix"]
    assert_gram_close(sum(layers.values()), reference_gram(model, x, y, loss_fn=loss_fn))


def assert_all_factored_with_loss(model, x, y, loss_fn):
    plan = gram_plan(model, x, y, loss_fn=loss_fn)
    assert not plan.fallback, str(plan)


# ---- 4. weight sharing: a block applied twice; nn.TransformerDecoderLayer ----


def test_mlp_block_applied_twice():
    torch.manual_seed(5)
    model = _prepared(tm.TwiceMLP())
    x, x2 = _float(7, tm.WIDTH, seed=50), _float(3, tm.WIDTH, seed=51)
    check_engines(model, x, _labels(7, 52), x2, _labels(3, 53), engines=("auto", "torch.func"), chunk_size=3)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_layer_applied_twice(batch_first):
    torch.manual_seed(6)
    model = _prepared(tm.TwiceEncoderLayer(4, batch_first=batch_first))
    x, x2 = _ids(5, 4, 60), _ids(4, 4, 61)
    check_engines(model, x, _labels(5, 62), x2, _labels(4, 63), chunk_size=2)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_decoder_layer(batch_first):
    torch.manual_seed(7)
    model = _prepared(tm.DecoderClassifier(batch_first=batch_first))
    x, x2 = (_ids(5, 4, 70), _ids(5, 5, 71)), (_ids(3, 4, 72), _ids(3, 5, 73))
    y = _labels(5, 74)
    check_engines(model, x, y, x2, _labels(3, 75), engines=("auto", "torch.func"), chunk_size=2)
    assert_all_factored(model, x, y)


# ---- 5. dict inputs with an attention mask and padding of different lengths ----

LENGTHS = [5, 3, 6, 2, 4, 6]


def _padded(lengths, seed, total=None):
    total = total or max(lengths)
    ids = _ids(len(lengths), total, seed, low=1)
    mask = (torch.arange(total) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_dict_inputs_with_padding():
    torch.manual_seed(8)
    model = _prepared(tm.MaskedEncoder())
    x, x2 = _padded(LENGTHS, 80), _padded([2, 6, 4], 81)
    y, y2 = _labels(len(LENGTHS), 82), _labels(3, 83)
    check_engines(model, x, y, x2, y2, engines=("auto", "torch.func"), chunk_size=4)

    # a masking model: the loss of a padded example is that of the example alone, without its padding
    with torch.no_grad():
        padded_losses = ref_losses(model, x, y)
    alone = []
    for i, length in enumerate(LENGTHS):
        single = {key: value[i : i + 1, :length] for key, value in x.items()}
        with torch.no_grad():
            alone.append(ref_losses(model, single, y[i : i + 1]))
        # and so is its gradient: the diagonal of the padded Gram matrix
        own = gradient_gram(model, single, y[i : i + 1])
        torch.testing.assert_close(own[0, 0], reference_gram(model, x, y)[i, i], rtol=1e-9, atol=0)
    torch.testing.assert_close(padded_losses, torch.cat(alone), rtol=1e-10, atol=1e-12)


def test_same_model_with_positional_inputs():
    torch.manual_seed(8)
    model = _prepared(tm.MaskedEncoder())
    padded, padded2 = _padded(LENGTHS, 84), _padded([3, 1, 5, 2], 85, total=6)
    x = (padded["input_ids"], padded["attention_mask"])
    x2 = (padded2["input_ids"], padded2["attention_mask"])
    y, y2 = _labels(len(LENGTHS), 86), _labels(4, 87)
    check_engines(model, x, y, x2, y2, chunk_size=5)
    assert_gram_close(gradient_gram(model, padded, y), gradient_gram(model, x, y), rtol=1e-12)


def test_padding_with_the_full_length_uses_every_position():
    """Padded to more than the longest example (``pos`` sliced to a shorter length than its own)."""
    torch.manual_seed(9)
    model = _prepared(tm.MaskedEncoder(max_len=8))
    x, x2 = _padded([2, 5, 3, 4], 90, total=7), _padded([1, 6, 2], 91, total=7)
    check_engines(model, x, _labels(4, 92), x2, _labels(3, 93), chunk_size=3)


# ---- 6. forward_fn ----


def test_forward_fn_on_a_wrapper_without_forward():
    torch.manual_seed(10)
    model = _prepared(tm.Wrapper(tm.EncoderClassifier(4)))
    with pytest.raises(NotImplementedError):
        model(_ids(2, 4, 0))

    def forward_fn(module, x):
        return module.model(x)

    x, x2 = _ids(5, 4, 100), _ids(3, 4, 101)
    y = _labels(5, 102)
    check_engines(model, x, y, x2, _labels(3, 103), engines=("auto", "loop"), chunk_size=2, forward_fn=forward_fn)
    assert_all_factored(model, x, y, forward_fn=forward_fn)
    outputs = layer_outputs(model, x, ["model.encoder", "model.head"], forward_fn=forward_fn)
    assert outputs["model.head"].shape == (5, tm.CLASSES)


def test_forward_fn_with_dict_inputs_on_a_wrapper():
    torch.manual_seed(11)
    model = _prepared(tm.Wrapper(tm.MaskedEncoder()))

    def forward_fn(module, x):
        return module.model(**x)

    x, x2 = _padded(LENGTHS[:5], 110), _padded([4, 2], 111, total=6)
    check_engines(model, x, _labels(5, 112), x2, _labels(2, 113), chunk_size=3, forward_fn=forward_fn)
    outputs = layer_outputs(model, x, ["model.head"], chunk_size=2, forward_fn=forward_fn)
    torch.testing.assert_close(outputs["model.head"], forward_fn(model, x).detach())


def test_forward_fn_supplying_an_extra_argument():
    torch.manual_seed(12)
    model = _prepared(tm.Tempered(4))

    def forward_fn(module, x):
        return module(x, 2.0)

    x, x2 = _ids(6, 4, 120), _ids(3, 4, 121)
    y = _labels(6, 122)
    check_engines(model, x, y, x2, _labels(3, 123), engines=("auto", "torch.func"), chunk_size=4, forward_fn=forward_fn)
    assert_all_factored(model, x, y, forward_fn=forward_fn)


# ---- 7. mixed precision: a bfloat16 copy of an encoder ----


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_bfloat16_encoder(batch_first):
    torch.manual_seed(13)
    low = tm.EncoderClassifier(5, batch_first=batch_first).eval().to(torch.bfloat16)
    high = copy.deepcopy(low).double()  # the same (rounded) weights in float64
    x, x2 = _ids(6, 5, 130), _ids(4, 5, 131)
    y, y2 = _labels(6, 132), _labels(4, 133)
    want, want_cross = reference_gram(high, x, y), reference_gram(high, x, y, x2, y2)
    before = _state(low)

    def bf16_loss(outputs, targets):
        return F.cross_entropy(outputs.float(), targets, reduction="none")

    for method in ("auto", "torch.func"):
        got = gradient_gram(low, x, y, method=method, chunk_size=4)
        got_cross = gradient_gram(low, x, y, x2, y2, method=method)
        assert_unchanged(low, before)
        for value, reference in ((got, want), (got_cross, want_cross)):
            assert value.dtype == torch.float32
            error = (value.double() - reference).norm() / reference.norm()
            assert error < 3e-2, (method, float(error))
    got = gradient_gram(low, x, y, loss_fn=bf16_loss)
    assert got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 3e-2


# ---- 8. bad input ----


def test_dict_entry_with_another_number_of_examples():
    model = _prepared(tm.MaskedEncoder())
    x = _padded([2, 3, 4], 140)
    x["attention_mask"] = x["attention_mask"][:2]
    with pytest.raises(ValueError, match="attention_mask"):
        gradient_gram(model, x, _labels(3, 141))
    with pytest.raises(ValueError, match="attention_mask"):
        gram_plan(model, x, _labels(3, 141))
    good = _padded([2, 3, 4], 142)
    with pytest.raises(ValueError, match="attention_mask"):
        gradient_gram(model, good, _labels(3, 143), x, _labels(3, 143))


def test_dict_entry_that_is_not_a_tensor():
    model = _prepared(tm.MaskedEncoder())
    x = {**_padded([2, 3, 4], 144), "source": "wikipedia"}
    with pytest.raises(ValueError, match="source"):
        gradient_gram(model, x, _labels(3, 145))
    with pytest.raises(ValueError, match=r"\[1\]"):
        gradient_gram(model, (x["input_ids"], ["a", "b", "c"]), _labels(3, 145))


# ---- 9. other layer kinds ----

OTHER_LAYERS = {
    "text_cnn": (lambda: tm.TextCNN(), lambda n, s: _ids(n, 6, s)),
    "layernorm_no_bias": (lambda: tm.NoBiasLayerNormMLP(5), lambda n, s: _ids(n, 5, s)),
    "vit_class_token": (lambda: tm.TinyViT(), lambda n, s: _float(n, 1, 4, 4, seed=s)),
}


@pytest.mark.parametrize("name", list(OTHER_LAYERS), ids=list(OTHER_LAYERS))
def test_other_layer_kinds(name):
    build, make = OTHER_LAYERS[name]
    torch.manual_seed(15)
    model = _prepared(build())
    x, x2 = make(7, 150), make(4, 151)
    y = _labels(7, 152)
    check_engines(model, x, y, x2, _labels(4, 153), chunk_size=3)
    assert_all_factored(model, x, y)


# ---- layouts written by hand, and other attempts to break the engine (method="auto" against the reference) ----

HAND_WRITTEN = {
    "einsum_attention": (lambda: tm.HandAttention(4), lambda n, s: _ids(n, 4, s)),
    "rotary_rmsnorm_swiglu": (lambda: tm.Rotary(5), lambda n, s: _ids(n, 5, s)),
    "nn_transformer": (lambda: tm.FullTransformer(), lambda n, s: (_ids(n, 4, s), _ids(n, 3, s + 1))),
    "odd_parameter_uses": (lambda: tm.OddUses(), lambda n, s: _ids(n, 4, s, high=tm.VOCAB - 1)),
    "in_place_after_linear": (lambda: tm.InPlaceAfterLinear(), lambda n, s: _ids(n, 4, s)),
    "weight_norm": (lambda: tm.WeightNormed(), lambda n, s: _ids(n, 4, s)),
    "checkpoint": (lambda: tm.Checkpointed(4), lambda n, s: _ids(n, 4, s)),
    "lora": (lambda: tm.LoRA(), lambda n, s: _ids(n, 4, s)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(HAND_WRITTEN), ids=list(HAND_WRITTEN))
def test_hand_written_layouts(name):
    build, make = HAND_WRITTEN[name]
    torch.manual_seed(16)
    model = _prepared(build())
    x, x2 = make(7, 160), make(3, 161)
    check_engines(model, x, _labels(7, 162), x2, _labels(3, 163), engines=("auto",), chunk_size=3)


def test_batch_sorted_inside_the_forward():
    """The model permutes the examples (sorted by length) before its layers and back after: the first three happen
    to be sorted already, the rest are not."""
    torch.manual_seed(17)
    model = _prepared(tm.SortsByLength())
    lengths = torch.tensor([5, 4, 3, 1, 5, 2, 4])
    ids = _ids(7, 5, 170, low=1) * (torch.arange(5) < lengths[:, None])
    lengths2 = torch.tensor([2, 5, 3])
    ids2 = _ids(3, 5, 171, low=1) * (torch.arange(5) < lengths2[:, None])
    check_engines(model, (ids, lengths), _labels(7, 172), (ids2, lengths2), _labels(3, 173), engines=("auto",))


@pytest.mark.parametrize("t2", [1, 3, 6], ids=["T2=1", "T2=3", "T2=6"])
def test_cross_gram_with_another_sequence_length(t2):
    """The columns padded to another length than the rows (a validation batch against a training batch)."""
    torch.manual_seed(18)
    model = _prepared(MeanPool(tm.VOCAB, tm.WIDTH, tm.CLASSES))
    x, x2 = _ids(4, 3, 180), _ids(4, t2, 181)
    y, y2 = _labels(4, 182), _labels(4, 183)
    want = reference_gram(model, x, y, x2, y2)
    assert_gram_close(gradient_gram(model, x, y, x2, y2), want)


def test_cross_gram_padded_against_unpadded():
    """A masking model: the Gram matrix of padded examples against one unpadded example is a column of the
    padded Gram matrix."""
    torch.manual_seed(19)
    model = _prepared(tm.MaskedEncoder())
    x, y = _padded(LENGTHS, 190), _labels(len(LENGTHS), 191)
    square = reference_gram(model, x, y)
    single = {key: value[1:2, : LENGTHS[1]] for key, value in x.items()}
    got = gradient_gram(model, x, y, single, y[1:2])
    assert_gram_close(got, square[:, 1:2], rtol=1e-9)


class _Trimming(tm.MaskedEncoder):
    """Trims the padding columns no example of the batch uses (the batch's own longest length)."""

    def forward(self, input_ids, attention_mask):
        longest = int(attention_mask.sum(dim=1).max())
        return super().forward(input_ids[:, :longest], attention_mask[:, :longest])


def test_chunks_of_different_lengths():
    """Chunks whose longest example differs, so each chunk runs at its own sequence length."""
    torch.manual_seed(20)
    model = _prepared(_Trimming())
    x, y = _padded([2, 2, 6, 5, 3, 1], 200), _labels(6, 201)
    assert_gram_close(gradient_gram(model, x, y, chunk_size=2), reference_gram(model, x, y))


def test_checkpointed_encoder_with_some_parameters():
    """Activation checkpointing and a Gram matrix of some of the parameters: the others are constants."""
    torch.manual_seed(21)
    model = _prepared(tm.Checkpointed(4))
    x, y = _ids(5, 4, 210), _labels(5, 211)
    for params in (["pos"], ["pos", "layers.0.linear1.weight", "head.bias"]):
        want = reference_gram(model, x, y, params=params)
        for method in ("auto", "loop"):
            assert_gram_close(gradient_gram(model, x, y, params=params, method=method), want)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_sequences_of_three_steps_stay_factored(batch_first):
    """T equal to the number of check examples (3), with projections used through slices (cross-attention's
    packed in-projection split into q and kv) and an embedding used twice (source and target)."""
    torch.manual_seed(22)
    model = _prepared(tm.DecoderClassifier(batch_first=batch_first))
    x, y = (_ids(5, 4, 220), _ids(5, 3, 221)), _labels(5, 222)
    check_engines(model, x, y, (_ids(2, 4, 223), _ids(2, 3, 224)), _labels(2, 225), engines=("auto",), chunk_size=2)
    assert_all_factored(model, x, y)
    cross = _prepared(tm.CrossAttention(kdim=5, vdim=6, batch_first=batch_first))
    x = (_float(5, 3, tm.WIDTH, seed=226), _float(5, 4, 5, seed=227), _float(5, 4, 6, seed=228))
    assert_all_factored(cross, x, y)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_one_row_example_against_many_columns(batch_first):
    """A cross Gram matrix with a single row example: one example cannot tell the flattened [T * N] layouts of the
    attention's output projection apart, yet the columns have several."""
    torch.manual_seed(23)
    model = _prepared(tm.SelfAttention(batch_first=batch_first))
    x, x2 = _float(1, 4, tm.WIDTH, seed=230), _float(3, 4, tm.WIDTH, seed=231)
    y, y2 = _labels(1, 232), _labels(3, 233)
    assert_gram_close(gradient_gram(model, x, y, x2, y2), reference_gram(model, x, y, x2, y2))


def test_an_embedding_with_max_norm_leaves_its_table_as_it_was():
    """F.embedding(max_norm=...) renormalises the rows it looks up in place: every engine must write them back."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Flatten(), nn.Linear(40, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(3)
    x, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("auto", "loop"):
        gradient_gram(model, x, y, method=method)
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), method
    with pytest.raises(RuntimeError, match="method='loop' can"):
        gradient_gram(model, x, y, method="torch.func")
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
