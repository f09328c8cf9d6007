"""The callback under DDP (2 CPU processes, gloo): same results as one process, every tag once, no hang on failure."""

import math

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.callback.distributed import Communicator, row_span
from lightning_stiffness.exceptions import FailedElsewhere, ProbeSkipped, is_expected
from lightning_stiffness.measures.result import StiffnessResult
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer
from tests.test_callback import IMAGE_TAGS, SCALAR_TAGS


class FailsOnRankOne(TinyNet):
    """Raises in the probe at initialisation on process 1 only (the probe is the only caller of forward)."""

    def forward(self, x):
        if self.global_rank == 1 and self.trainer.global_step == 0:
            raise RuntimeError("boom on rank 1")
        return super().forward(x)


class FailsInGramOnRankOne(TinyNet):
    """Raises on process 1 while the factored engine captures its rows (with gradients), not in the loss check."""

    def forward(self, x):
        if self.global_rank == 1 and torch.is_grad_enabled() and not self.training:
            raise RuntimeError("out of memory (simulated) on rank 1")
        return super().forward(x)


class FailsInFallbackOnRankOne(TinyNet):
    """A raw parameter goes to the exact fallback, which runs after the gathers; it fails there on process 1.

    The fallback differentiates only ``scale``, so the layers' weights reach the forward as constants (no gradient):
    that happens nowhere else (not in the per-example check, nor in the capture), and on process 1 both fallback
    engines (torch.func, then the loop) raise.
    """

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        if self.global_rank == 1 and not self.net[0].weight.requires_grad:
            raise RuntimeError("failure in the fallback engine on rank 1")
        # Used by batches larger than the check's only (data-dependent control flow): no factored term covers it.
        scale = self.scale if x.shape[0] > 3 else self.scale.detach()
        return super().forward(x) * scale.exp()


def _run(tmp_path, model_class=TinyNet, strict=None, **kwargs):
    seed_everything(0)
    callback = StiffnessCallback(samples_per_class=3, seed=1, layers=["net.1"], per_layer=True, strict=strict)
    fit = trainer(tmp_path, [callback], max_epochs=1, **kwargs)
    fit.fit(model_class(), datamodule=DigitsData())
    # The parent of ddp_spawn workers does not learn the logger's version they used: find the one run directory.
    (run_dir,) = sorted(tmp_path.glob("lightning_logs/version_*"))
    return run_dir


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    single = _run(tmp_path_factory.mktemp("single"))
    ddp = _run(tmp_path_factory.mktemp("ddp"), strategy="ddp_spawn", accelerator="cpu", devices=2)
    return single, ddp


def test_ddp_logs_every_tag_once_per_probe(single_and_ddp):
    _, ddp = single_and_ddp
    raw = raw_results(ddp)
    assert sorted(raw) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt"]
    acc = events(ddp)
    for tag in [*SCALAR_TAGS, "stiffness/train-train/critical_distance/net.1"]:
        assert [e.step for e in acc.Scalars(tag)] == [0, 4], tag
    for tag in IMAGE_TAGS:
        assert [e.step for e in acc.Images(tag)] == [0, 4], tag


def _close(a, b):
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-5, rel=1e-5)
    return torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_probe_at_initialisation_equals_single_process(single_and_ddp):
    single, ddp = single_and_ddp
    one = StiffnessResult.from_dict(raw_results(single)["epoch=0-step=0.pt"])
    two = StiffnessResult.from_dict(raw_results(ddp)["epoch=0-step=0.pt"])
    for name in ("train", "val"):
        assert torch.equal(one.indices[name], two.indices[name])
    # Every measure, by structure: each pair, kind and layer's class measures (all parameters' with the stiffness
    # matrix, each layer's own), each pair and space's distances, curves and xi (input space and each layer).
    assert {p: {k: list(m) for k, m in by_kind.items()} for p, by_kind in one.classes.items()} == {
        p: {k: list(m) for k, m in by_kind.items()} for p, by_kind in two.classes.items()
    }
    for pair, by_kind in one.classes.items():
        for kind, by_layer in by_kind.items():
            for layer, mine in by_layer.items():
                theirs = two.classes[pair][kind][layer]
                for name in ("matrix", "stiffness", "within", "between"):
                    if getattr(mine, name) is not None:
                        assert _close(getattr(mine, name), getattr(theirs, name)), (pair, kind, layer, name)
    assert {p: list(s) for p, s in one.spaces.items()} == {p: list(s) for p, s in two.spaces.items()}
    for pair, by_space in one.spaces.items():
        for space, mine in by_space.items():
            theirs = two.spaces[pair][space]
            for name in ("distances", "critical_distance"):
                assert _close(getattr(mine, name), getattr(theirs, name)), (pair, space, name)
            for side, curve in mine.curves.items():
                assert curve.count.tolist() == theirs.curves[side].count.tolist()
                assert _close(curve.mean, theirs.curves[side].mean)


@pytest.mark.parametrize("model_class", [FailsOnRankOne, FailsInGramOnRankOne, FailsInFallbackOnRankOne])
def test_failure_on_one_process_is_an_agreed_skip(tmp_path, model_class):
    # (`scale` of the last model is used by the probe only, hence find_unused_parameters)
    strategy = "ddp_spawn_find_unused_parameters_true"
    # Failures in the model's own code are unexpected: skipped only when not strict (the test suite is strict).
    fit = _run(tmp_path, model_class, strict=False, strategy=strategy, accelerator="cpu", devices=2)
    expected = ["epoch=0-step=4.pt"] if model_class is FailsOnRankOne else []  # the others fail at every probe
    assert sorted(raw_results(fit)) == expected  # skipped probes write nothing, and training finished


@pytest.mark.parametrize("total, world", [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_row_spans_cover_every_row_once(total, world):
    spans = [row_span(total, world, r) for r in range(world)]
    covered = [i for s in spans for i in range(s.start, s.stop)]
    assert covered == list(range(total))
    assert max(s.stop - s.start for s in spans) - min(s.stop - s.start for s in spans) <= 1


def test_unexpected_failure_on_one_process_raises_on_all_in_strict_mode(tmp_path):
    with pytest.raises(Exception, match="boom on rank 1"):  # and no process is left waiting
        _run(tmp_path, FailsOnRankOne, strict=True, strategy="ddp_spawn", accelerator="cpu", devices=2)


class _FakeStrategy:
    """The collective calls a Communicator makes, for two processes that hold the same tensors."""

    def __init__(self, peer_failed: bool):
        self.peer_failed = peer_failed

    def reduce_boolean_decision(self, decision, all=True):
        return decision or self.peer_failed

    def reduce(self, tensor, reduce_op="sum"):
        return 2 * tensor

    def all_gather(self, tensor):
        return torch.stack([tensor, tensor])

    def broadcast(self, tensor, src=0):
        return tensor


class _Peer(Communicator):
    """Process 0 of two; process 1 reports ``theirs`` when failures are gathered."""

    def __init__(self, theirs=None):
        super().__init__(_FakeStrategy(peer_failed=theirs is not None), world_size=2, rank=0)
        self.theirs = theirs

    def _gather_objects(self, mine):
        return [mine, self.theirs]


def test_communicator_agrees_on_failures_without_a_trainer():
    assert _Peer().agree(None) is None
    assert _Peer().agreed(lambda: 3) == 3
    mine = ProbeSkipped("not finite")
    assert _Peer().agree(mine) is mine
    expected = _Peer(("on process 1: ProbeSkipped: not finite", True)).agree(None)
    assert isinstance(expected, FailedElsewhere) and is_expected(expected)
    assert str(expected) == "on process 1: ProbeSkipped: not finite"
    with pytest.raises(FailedElsewhere, match="on process 1: TypeError: a bug") as raised:
        _Peer(("on process 1: TypeError: a bug", False)).agreed(lambda: 3)
    assert not is_expected(raised.value)


def test_communicator_splits_rows_and_is_an_identity_alone():
    single = Communicator()
    rows = torch.arange(12.0).reshape(3, 4)
    assert single.span(3) == slice(0, 3)
    assert single.gather_rows(rows, 3) is rows
    assert torch.equal(single.all_norms(torch.eye(3), slice(0, 3), 3), torch.ones(3))
    peer = _Peer()
    assert peer.span(5) == slice(0, 3)
    assert torch.equal(peer.all_norms(torch.eye(5)[:3], slice(0, 3), 5), torch.tensor([2.0, 2, 2, 0, 0]))
    assert peer.gather_rows(torch.ones(3, 2), 5).shape == (5, 2)
    with pytest.raises(ValueError, match="a `strategy` is needed"):
        Communicator(world_size=2)
