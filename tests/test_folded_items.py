"""Examples folded with other items into the batch dimension of an operation that computes each item alone: the
frames of videos through a convolution ([N * T, C, H, W]), tokens through BatchNorm1d ([N * T, C], as LeViT
flattens them), either order; every parameter factored and exact against the float64 loop."""

import pytest
import torch
from torch import nn

from lightning_stiffness.gram import gradient_gram, gram_plan
from tests.reference import reference_gram

T = 3


class FramesConv(nn.Module):
    """A convolution over every frame of a clip, the frames folded into the batch, then a linear head."""

    def __init__(self, conv: nn.Module, channels: int, inner: bool = False, norm: nn.Module | None = None):
        super().__init__()
        self.conv, self.norm, self.inner = conv, norm, inner
        self.head = nn.Linear(channels, 3)

    def forward(self, x):  # x [N, T, C, *spatial]
        n, t = x.shape[:2]
        frames = x.transpose(0, 1).flatten(0, 1) if self.inner else x.flatten(0, 1)
        z = self.conv(frames)
        if self.norm is not None:
            z = self.norm(z)
        z = z.flatten(2).mean(2)  # [N * T, C_out]
        z = z.unflatten(0, (t, n)).transpose(0, 1) if self.inner else z.unflatten(0, (n, t))
        return self.head(torch.tanh(z).mean(1))


class TokensBatchNorm(nn.Module):
    """LeViT's BatchNorm1d over tokens flattened into [N * T, C]."""

    def __init__(self, inner: bool = False):
        super().__init__()
        self.proj, self.norm, self.head, self.inner = (
            nn.Linear(4, 6, bias=False),
            nn.BatchNorm1d(6),
            nn.Linear(6, 3),
            inner,
        )

    def forward(self, x):  # x [N, T, 4]
        n, t, _ = x.shape
        z = self.proj(x)
        flat = z.transpose(0, 1).flatten(0, 1) if self.inner else z.flatten(0, 1)
        z = self.norm(flat)
        z = z.unflatten(0, (t, n)).transpose(0, 1) if self.inner else z.unflatten(0, (n, t))
        return self.head(z.mean(1))


def _eval_norms(model):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


MODELS = {
    # The output gradients times unfolded patches (many channels at few positions).
    "conv2d patches": lambda inner: (FramesConv(nn.Conv2d(40, 5, 3, padding=1), 5, inner), (40, 4, 4)),
    # The convolution's own weight backward (few input channels, many positions).
    "conv2d backward": lambda inner: (FramesConv(nn.Conv2d(2, 4, 3, stride=2), 4, inner), (2, 17, 17)),
    "conv1d dilated": lambda inner: (FramesConv(nn.Conv1d(3, 4, 3, dilation=2), 4, inner), (3, 12)),
    "conv3d": lambda inner: (FramesConv(nn.Conv3d(2, 3, 2), 3, inner), (2, 3, 4, 4)),
    "depthwise": lambda inner: (FramesConv(nn.Conv2d(4, 4, 3, groups=4, padding=1), 4, inner), (4, 5, 5)),
    "grouped + BatchNorm2d": lambda inner: (
        FramesConv(nn.Conv2d(4, 6, 3, groups=2), 6, inner, norm=nn.BatchNorm2d(6)),
        (4, 6, 6),
    ),
    "GroupNorm": lambda inner: (FramesConv(nn.Conv2d(2, 4, 3), 4, inner, norm=nn.GroupNorm(2, 4)), (2, 6, 6)),
}


@pytest.mark.parametrize("inner", [False, True], ids=["example-major", "frame-major"])
@pytest.mark.parametrize("name", list(MODELS))
def test_frames_folded_into_the_batch_stay_factored_and_exact(name, inner):
    torch.manual_seed(0)
    model, shape = MODELS[name](inner)
    model = _eval_norms(model)
    x, y = torch.randn(7, T, *shape, dtype=torch.float64), torch.randint(0, 3, (7,))
    plan = gram_plan(model, x, y)
    assert set(plan.forms.values()).isdisjoint({"torch.func", "loop"}), plan.fallback
    expected = reference_gram(model, x, y)
    for chunk_size in (None, 2, 3):
        torch.testing.assert_close(gradient_gram(model, x, y, chunk_size=chunk_size), expected)
    x2, y2 = torch.randn(5, T, *shape, dtype=torch.float64), torch.randint(0, 3, (5,))
    torch.testing.assert_close(gradient_gram(model, x, y, x2, y2), reference_gram(model, x, y, x2, y2))


@pytest.mark.parametrize("inner", [False, True], ids=["example-major", "token-major"])
def test_tokens_flattened_through_batchnorm1d_stay_factored_and_exact(inner):
    torch.manual_seed(1)
    model = _eval_norms(TokensBatchNorm(inner))
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    plan = gram_plan(model, x, y)
    assert plan.forms["norm.weight"] == plan.forms["norm.bias"] == "flat", plan.fallback
    assert plan.calls["norm.weight"] == ["F.batch_norm"]
    torch.testing.assert_close(gradient_gram(model, x, y), reference_gram(model, x, y))
    torch.testing.assert_close(gradient_gram(model, x, y, chunk_size=2), reference_gram(model, x, y))
