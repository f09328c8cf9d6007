"""The Gram engines against the brute-force per-example loop (float64)."""

import copy

import pytest
import torch
from torch import nn

from lightning_stiffness.functional import METHODS, gradient_gram
from tests.models.basic import MODELS, build, make_inputs
from tests.reference import reference_gram

ENGINES = [m for m in METHODS]


def _data(name, n, seed=1):
    return make_inputs(name, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_square_gram_matches_loop(name, method):
    model = build(name)
    x, y = _data(name, 9)
    expected = reference_gram(model, x, y)
    got = gradient_gram(model, x, y, method=method)
    assert got.dtype == torch.float64 and got.shape == (9, 9)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cross_gram_matches_loop(name, method):
    model = build(name)
    x, y = _data(name, 7, seed=1)
    x2, y2 = _data(name, 4, seed=2)
    expected = reference_gram(model, x, y, x2, y2)
    got = gradient_gram(model, x, y, x2, y2, method=method)
    assert got.shape == (7, 4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_chunked_equals_unchunked(chunk_size, method):
    model = build("cnn")
    x, y = _data("cnn", 13)
    x2, y2 = _data("cnn", 6, seed=3)
    whole = gradient_gram(model, x, y, method=method, chunk_size=100)
    torch.testing.assert_close(gradient_gram(model, x, y, method=method, chunk_size=chunk_size), whole)
    cross = gradient_gram(model, x, y, x2, y2, method=method, chunk_size=100)
    torch.testing.assert_close(gradient_gram(model, x, y, x2, y2, method=method, chunk_size=chunk_size), cross)


def test_float32_model_gives_float32_close_to_float64_loop():
    model = build("mlp")
    x, y = _data("mlp", 8)
    expected = reference_gram(model, x, y)
    model32 = model.float()
    got = gradient_gram(model32, x.float(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_params_restricts_differentiation():
    model = build("mlp")
    x, y = _data("mlp", 6)
    names = ["2.weight", "4.bias"]
    expected = reference_gram(model, x, y, params=names)
    torch.testing.assert_close(gradient_gram(model, x, y, params=names), expected)


def test_custom_loss_fn():
    model = build("mlp")
    x, _ = _data("mlp", 6)
    targets = torch.randn(6, 3, dtype=torch.float64)

    def mse(out, t):
        return ((out - t) ** 2).sum(dim=1)

    expected = reference_gram(model, x, targets, loss_fn=mse)
    torch.testing.assert_close(gradient_gram(model, x, targets, loss_fn=mse), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_untouched(name):
    model = build(name)
    x, y = _data(name, 5)
    # Give the model a .grad to keep, and remember every flag and value.
    model(x).sum().backward() if name != "frozen" else None
    before = copy.deepcopy(model.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    gradient_gram(model, x, y, chunk_size=2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_batchnorm_eval_is_exact_and_buffers_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    model.train()
    model(torch.randn(32, 6, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    x, y = _data("mlp", 6)
    running = model[1].running_mean.clone()
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))
    assert torch.equal(model[1].running_mean, running)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(8), nn.Dropout(0.1)])
def test_train_mode_batchnorm_or_dropout_asks_for_eval(layer):
    model = nn.Sequential(nn.Linear(6, 8), layer, nn.Linear(8, 3)).train()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        gradient_gram(model, x, y)


def test_result_on_model_device_from_inputs_elsewhere():
    model = build("mlp")
    x, y = _data("mlp", 4)
    got = gradient_gram(model, x, y)
    assert got.device == next(model.parameters()).device


def test_progress_reports_every_block():
    model = build("mlp")
    x, y = _data("mlp", 10)
    calls = []
    gradient_gram(model, x, y, chunk_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] == len(calls)


class TestBadInput:
    def setup_method(self):
        self.model = build("mlp")
        self.x, self.y = _data("mlp", 4)

    def test_unknown_method_lists_valid(self):
        with pytest.raises(ValueError, match=r"`method` must be one of .*'torch.func'"):
            gradient_gram(self.model, self.x, self.y, method="backpack")

    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="`targets` must have one entry per example"):
            gradient_gram(self.model, self.x, self.y[:3])
        with pytest.raises(ValueError, match="`targets2` must have one entry per example"):
            gradient_gram(self.model, self.x, self.y, self.x, self.y[:2])

    def test_empty_inputs(self):
        with pytest.raises(ValueError, match="`inputs` must hold at least one example"):
            gradient_gram(self.model, self.x[:0], self.y[:0])
        with pytest.raises(ValueError, match="`inputs2` must hold at least one example"):
            gradient_gram(self.model, self.x, self.y, self.x[:0], self.y[:0])

    def test_half_a_second_set(self):
        with pytest.raises(ValueError, match="`inputs2` and `targets2` must be given together"):
            gradient_gram(self.model, self.x, self.y, self.x)

    def test_scalar_loss(self):
        with pytest.raises(ValueError, match=r"`loss_fn` must return per-example losses of shape \[N\]"):
            gradient_gram(self.model, self.x, self.y, loss_fn=nn.CrossEntropyLoss())

    def test_unknown_param_name(self):
        with pytest.raises(ValueError, match=r"`params` names parameters the model does not have: \['nope'\]"):
            gradient_gram(self.model, self.x, self.y, params=["nope"])

    def test_no_trainable_parameters(self):
        self.model.requires_grad_(False)
        with pytest.raises(ValueError, match="`model` has no trainable parameters"):
            gradient_gram(self.model, self.x, self.y)

    @pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
    def test_bad_chunk_size(self, chunk_size):
        with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
            gradient_gram(self.model, self.x, self.y, chunk_size=chunk_size)

    def test_not_a_tensor(self):
        with pytest.raises(ValueError, match=r"`inputs\[0\]` must be a tensor .* got list"):
            gradient_gram(self.model, [[0.0] * 6], self.y)
        with pytest.raises(ValueError, match=r"`inputs` must be a tensor .* got str"):
            gradient_gram(self.model, "features", self.y)

    def test_dict_entry_with_other_rows(self):
        x = {"features": self.x, "mask": torch.ones(self.x.shape[0] + 1, 2)}
        with pytest.raises(
            ValueError, match=r"`inputs\['mask'\]` has 5 rows along dim 0 but `inputs\['features'\]` has 4"
        ):
            gradient_gram(self.model, x, self.y)


def test_tf32_is_off_during_the_gram_and_restored():
    model = build("mlp")
    x, y = _data("mlp", 4)
    seen = []

    def loss_fn(out, t):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return nn.functional.cross_entropy(out, t, reduction="none")

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    try:
        gradient_gram(model, x, y, loss_fn=loss_fn)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
    assert ("highest", False) in seen


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match=r"without running statistics .* track_running_stats=True"):
        gradient_gram(model, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
