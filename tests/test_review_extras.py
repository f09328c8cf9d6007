"""Review of issue 13 (intervals, coherence/diversity, class groups, the whole training set), checked against
brute-force float64 references of our own: one ``torch.autograd.grad`` per example on a float64 copy of the model,
and plain per-draw / per-pair loops for the bootstrap, groups and dataset means."""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import (
    dataset_class_stiffness,
    distance_bin_edges,
    gradient_coherence,
    gradient_diversity,
    gradient_gram,
)
from lightning_stiffness.measures.intervals import bootstrap_intervals, curve_bands, draw_weights
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, SIDES, class_tag, critical_distance_tag
from tests.helpers import digits_tensors, events, raw_results, trainer

PAIRS = {"train-train": ("train", "train"), "train-val": ("train", "val"), "val-val": ("val", "val")}


def _input_space(by_pair):
    """Pair -> a value of input space, as pair -> space -> value (the layout of curve_bands and bootstrap_intervals)."""
    return {pair: {INPUT: value} for pair, value in by_pair.items()}


# --------------------------------------------------------------------------------------------- float64 references


def _to64(x):
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to64(v) for v in x)
    return x.double() if x.is_floating_point() else x


def _take(x, i):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def grads64(model, x, y, forward=None, loss_fn=None):
    """[N, P] float64 per-example gradients: a float64 copy of the model in eval mode, one autograd.grad each."""
    m = copy.deepcopy(model).double().eval()
    params = [p for p in m.parameters() if p.requires_grad]
    forward = forward or (lambda model, inputs: model(inputs))
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t, reduction="none"))
    rows = []
    for i in range(len(y)):
        loss = loss_fn(forward(m, _to64(_take(x, i))), y[i : i + 1]).sum()
        g = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params, strict=True)]
            )
        )
    return torch.stack(rows)


def cos64(a, b):
    na, nb = a.norm(dim=1), b.norm(dim=1)
    out = (a @ b.T) / (na[:, None] * nb[None, :])
    out[na == 0] = math.nan
    out[:, nb == 0] = math.nan
    return out.clamp(-1, 1)


def input_distance64(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return 1 - (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])


def class_matrix_loop(s, la, lb, num_classes, same_set, w_a=None, w_b=None):
    """Mean (optionally weighted by w_i w'_j) of finite s[i, j] over i in a, j in b, i != j within a set."""
    s = s.double()
    w_a = torch.ones(len(la), dtype=torch.float64) if w_a is None else w_a.double()
    w_b = torch.ones(len(lb), dtype=torch.float64) if w_b is None else w_b.double()
    weight = w_a[:, None] * w_b[None, :]
    valid = torch.isfinite(s)
    if same_set:
        valid &= ~torch.eye(len(la), dtype=torch.bool)
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    s0 = torch.where(valid, s, torch.zeros_like(s))
    out = torch.full((num_classes, num_classes), math.nan, dtype=torch.float64)
    for a in range(num_classes):
        for b in range(num_classes):
            block = (la == a)[:, None] & (lb == b)[None, :]
            den = weight[block].sum()
            if den > 0:
                out[a, b] = (weight * s0)[block].sum() / den
    return out


def within_between64(matrix):
    diag = torch.eye(matrix.shape[0], dtype=torch.bool)
    return float(matrix[diag].nanmean()), float(matrix[~diag].nanmean())


def xi64(s, d, la, lb, same_set, w_a=None, w_b=None):
    """The weighted least-squares line through same-class (distance, stiffness) pairs; -intercept/slope, or inf."""
    s, d = s.double(), d.double()
    w_a = torch.ones(len(la), dtype=torch.float64) if w_a is None else w_a.double()
    w_b = torch.ones(len(lb), dtype=torch.float64) if w_b is None else w_b.double()
    valid = (la[:, None] == lb[None, :]) & torch.isfinite(s) & torch.isfinite(d)
    if same_set:
        valid &= ~torch.eye(len(la), dtype=torch.bool)
    w = (w_a[:, None] * w_b[None, :])[valid]
    x, yv = d[valid], s[valid]
    n, sx, sy, sxx, sxy = w.sum(), (w * x).sum(), (w * yv).sum(), (w * x * x).sum(), (w * x * yv).sum()
    spread = n * sxx - sx * sx
    if n < 2 or spread <= 1e-12 * n * sxx:
        return math.nan
    slope = (n * sxy - sx * sy) / spread
    intercept = (sy - slope * sx) / n
    return float(-intercept / slope) if slope < 0 else math.inf


def percentile64(draws):
    kept = np.asarray([v for v in draws if not math.isnan(v)], dtype=np.float64)
    if kept.size == 0:
        return math.nan, math.nan
    return float(np.quantile(kept, 0.025, method="lower")), float(np.quantile(kept, 0.975, method="higher"))


def bin_means64(s, d, edges, la, lb, same_set, w_a, w_b):
    """[2, bins] weighted bin means (side 0 same class, 1 different) of finite pairs, bins [e_k, e_k+1), last closed."""
    s, d, edges = s.double(), d.double(), edges.double()
    nb = len(edges) - 1
    valid = torch.isfinite(s) & (d >= edges[0]) & (d <= edges[-1])
    if same_set:
        valid &= ~torch.eye(len(la), dtype=torch.bool)
    k = torch.bucketize(d, edges[1:-1], right=True).clamp_max(nb - 1)
    side = (la[:, None] != lb[None, :]).long()
    w = w_a.double()[:, None] * w_b.double()[None, :]
    out = torch.full((2, nb), math.nan, dtype=torch.float64)
    for sd in range(2):
        for b in range(nb):
            sel = valid & (side == sd) & (k == b)
            den = w[sel].sum()
            if den > 0:
                out[sd, b] = (w[sel] * s[sel]).sum() / den
    return out


# --------------------------------------------------------------------------------------------------- lightning bits


class Data(LightningDataModule):
    def __init__(self, train, val=None, batch_size=16, shuffle=True):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.shuffle = batch_size, shuffle

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=self.batch_size)


class Net(LightningModule):
    """Digits MLP; ``kind="bn"`` adds BatchNorm1d, ``"gru"`` reads the 8x8 image as 8 steps of 8 pixels;
    ``dead_pixel``: examples whose pixel 36 is below 0.3 get constant outputs (zero gradient, NaN stiffness)."""

    def __init__(self, kind="mlp", dead_pixel=False, dropout=0.0, lr=0.1):
        super().__init__()
        self.kind, self.dead_pixel, self.lr = kind, dead_pixel, lr
        if kind == "gru":
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 10)
        else:
            hidden = [nn.Linear(64, 12)] + ([nn.BatchNorm1d(12)] if kind == "bn" else [])
            self.net = nn.Sequential(*hidden, nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 10))

    def forward(self, x):
        if self.kind == "gru":
            out = self.head(self.gru(x.reshape(-1, 8, 8))[0][:, -1])
        else:
            out = self.net(x.flatten(1))
        if self.dead_pixel:
            out = out * (x.flatten(1)[:, 36:37] >= 0.3).to(out.dtype)
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Snapshots(Callback):
    """The module's state at the start of training and at each epoch's end (put it before the stiffness callback)."""

    def __init__(self):
        self.states = {}

    def on_train_start(self, trainer, pl_module):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def _digits_sets(per_class_train=None, per_class_val=None, n=600):
    x, y = digits_tensors(n)
    xt, yt, xv, yv = x[:400], y[:400], x[400:], y[400:]

    def cut(xs, ys, counts):
        if counts is None:
            return xs, ys
        keep = torch.cat([torch.nonzero(ys == c).flatten()[: counts.get(c, 10**6)] for c in range(10)])
        keep = keep.sort().values
        return xs[keep], ys[keep]

    xt, yt = cut(xt, yt, per_class_train)
    xv, yv = cut(xv, yv, per_class_val)
    return TensorDataset(xt, yt), TensorDataset(xv, yv)


def _fit(tmp_path, model, data, stiffness, **kwargs):
    snaps = Snapshots()
    options = dict(max_epochs=1, limit_train_batches=2)
    options.update(kwargs)
    t = trainer(tmp_path, [snaps, stiffness], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=data)
    return t, snaps


def _results(t):
    return {
        name: StiffnessResult.from_dict(d)
        for name, d in raw_results(t.log_dir).items()
        if not name.startswith("dataset")
    }


def _probe_reference(model_cls_kwargs, state, result, data, layer=None):
    """Float64 per-example gradients of the probe examples (model rebuilt from ``state``), their cosines, input
    distances (and a layer's cosine distances) per pair."""
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = Net(**model_cls_kwargs).to(dtype)
    model.load_state_dict(state)
    sets = {"train": data.train_set, "val": data.val_set}
    xs, g = {}, {}
    for name, idx in result.indices.items():
        x, y = sets[name].tensors[0][idx], sets[name].tensors[1][idx]
        assert torch.equal(y, result.labels[name])
        xs[name] = x
        g[name] = grads64(model, x, y)
    cos, dist, ldist = {}, {}, {}
    m64 = copy.deepcopy(model).double().eval()
    for pair, (r, c) in PAIRS.items():
        if r in g and c in g:
            cos[pair] = cos64(g[r], g[c])
            dist[pair] = input_distance64(xs[r], xs[c])
            if layer is not None:
                module = dict(m64.named_modules())[layer]
                outs = {}
                for name in (r, c):
                    captured = []
                    handle = module.register_forward_hook(lambda mod, i, o, out=captured: out.append(o))
                    with torch.no_grad():
                        m64(xs[name].double())
                    handle.remove()
                    outs[name] = captured[0]
                ldist[pair] = input_distance64(outs[r], outs[c])
    return g, cos, dist, ldist


def _weights_are_within_class_resamples(weights, labels):
    for name, w in weights.items():
        assert (w >= 0).all() and torch.equal(w, w.round())
        for c in torch.unique(labels[name]).tolist():
            members = labels[name] == c
            assert torch.all(w[:, members].sum(1) == members.sum())


# ------------------------------------------------------------------------------------------------------ intervals


def _check_intervals_against_brute_force(result, cos, dist, seed, ldist=None, layer=None, num_draws=200, sign=None):
    """Every interval and band of ``result`` against per-draw loops, with the draws the documented seed makes.
    ``cos``/``sign``: pair -> float64 stiffness of that kind (``sign`` only when measured)."""
    by_kind = {k: v for k, v in (("cosine", cos), ("sign", sign)) if k in result.kinds}
    assert by_kind.keys() == set(result.kinds)
    line = by_kind[result.xi_kind]
    generator = torch.Generator().manual_seed((seed * 1_000_003 + result.step) % 2**63)
    weights = draw_weights(result.labels, num_draws, generator)
    _weights_are_within_class_resamples(weights, result.labels)
    C = result.num_classes
    expected = {}
    for pair, (r, c) in PAIRS.items():
        if pair not in cos:
            continue
        la, lb, same = result.labels[r], result.labels[c], r == c
        per_draw = {"xi": [], "xi_layer": []}
        for b in range(num_draws):
            for kind, values in by_kind.items():
                m = class_matrix_loop(values[pair], la, lb, C, same, weights[r][b], weights[c][b])
                wi, be = within_between64(m)
                per_draw.setdefault((kind, "within"), []).append(wi)
                per_draw.setdefault((kind, "between"), []).append(be)
            per_draw["xi"].append(xi64(line[pair], dist[pair], la, lb, same, weights[r][b], weights[c][b]))
            if layer is not None:
                per_draw["xi_layer"].append(xi64(line[pair], ldist[pair], la, lb, same, weights[r][b], weights[c][b]))
        for kind in by_kind:
            for side in ("within", "between"):
                expected[f"stiffness/{pair}/{kind}/{side}_class"] = percentile64(per_draw[(kind, side)])
        expected[f"stiffness/{pair}/critical_distance/input"] = percentile64(per_draw["xi"])
        if layer is not None:
            expected[f"stiffness/{pair}/critical_distance/{layer}"] = percentile64(per_draw["xi_layer"])
        # Bands: per bin, percentiles of the draws' bin means, on the curve's own edges.
        for key, space in [(pair, dist[pair])] + ([(f"{pair}/{layer}", ldist[pair])] if layer else []):
            curves = result.curves if key == pair else result.layer_curves
            stored = (result.distances if key == pair else result.layer_distances)[key].double()
            assert torch.allclose(stored, space, atol=1e-6), key
            # Bin by the stored distances: the edges come from them, and the extreme pairs lie exactly on the
            # outer edges (float64 distances of ours may fall a rounding error outside).
            space = stored
            edges = curves[key]["within"].edges
            means = torch.stack(
                [
                    bin_means64(line[pair], space, edges, la, lb, same, weights[r][b], weights[c][b])
                    for b in range(num_draws)
                ]
            )
            for side_index, side in enumerate(("within", "between")):
                low, high = result.curve_intervals[key][side]
                for k in range(len(edges) - 1):
                    e_low, e_high = percentile64(means[:, side_index, k].tolist())
                    for got, want in ((low[k], e_low), (high[k], e_high)):
                        if math.isnan(want):
                            assert math.isnan(float(got)), (key, side, k, got)
                        else:
                            assert float(got) == pytest.approx(want, abs=2e-5), (key, side, k, got, want)
    assert set(result.intervals) == set(expected)
    for tag, (low, high) in expected.items():
        got = result.intervals[tag]
        for g_, w_ in zip(got, (low, high), strict=True):
            if math.isnan(w_) or math.isinf(w_):
                assert (math.isnan(g_) and math.isnan(w_)) or g_ == w_, (tag, got, (low, high))
            else:
                assert g_ == pytest.approx(w_, abs=2e-5, rel=1e-5), (tag, got, (low, high))
    return expected


def test_intervals_and_bands_equal_per_draw_loops_with_tiny_classes_missing_val_class_and_nan(tmp_path):
    """Class 9 has one training example, class 8 two; class 7 is missing from val; some examples have a zero
    gradient (NaN stiffness). Point estimates, every interval and every band against float64 loops."""
    train, val = _digits_sets({9: 1, 8: 2}, {7: 0})
    data = Data(train, val)
    seed_everything(0)
    model = Net(dead_pixel=True)
    cb = StiffnessCallback(samples_per_class=4, kinds=["cosine"], seed=3, every_n_epochs=1, log_images=False)
    t, snaps = _fit(tmp_path, model, data, cb)
    results = _results(t)
    assert len(results) == 2
    for result in results.values():
        _, cos, dist, _ = _probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
        assert any(torch.isnan(c).any() for c in cos.values()), "the case must have NaN stiffness"
        for pair, (r, c) in PAIRS.items():
            assert torch.allclose(result.stiffness[f"{pair}/cosine"].double(), cos[pair], atol=1e-5, equal_nan=True)
            m = class_matrix_loop(cos[pair], result.labels[r], result.labels[c], 10, r == c)
            wi, be = within_between64(m)
            assert result.within_class[f"{pair}/cosine"] == pytest.approx(wi, abs=1e-5)
            assert result.between_class[f"{pair}/cosine"] == pytest.approx(be, abs=1e-5)
            assert result.critical_distance[pair] == pytest.approx(
                xi64(cos[pair], dist[pair], result.labels[r], result.labels[c], r == c), rel=1e-4, abs=1e-5
            )
        _check_intervals_against_brute_force(result, cos, dist, seed=3)


def test_intervals_with_layers_two_draws_and_zero_draws(tmp_path):
    train, val = _digits_sets()
    data = Data(train, val)
    seed_everything(1)
    cb = StiffnessCallback(
        samples_per_class=3, kinds=["cosine"], layers=["net.1"], num_bootstrap=2, every_n_epochs=0, log_images=False
    )
    t, snaps = _fit(tmp_path / "two", Net(), data, cb)
    (result,) = _results(t).values()
    assert "train-val/net.1" in result.curve_intervals
    assert "stiffness/train-val/critical_distance/net.1" in result.intervals
    _, cos, dist, ldist = _probe_reference({}, snaps.states[result.step], result, data, layer="net.1")
    _check_intervals_against_brute_force(result, cos, dist, seed=0, ldist=ldist, layer="net.1", num_draws=2)

    seed_everything(1)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], num_bootstrap=0, every_n_epochs=0)
    t, _ = _fit(tmp_path / "zero", Net(), data, cb)
    (result,) = _results(t).values()
    assert result.intervals == {} and result.curve_intervals == {}
    assert "stiffness/train-val/distance_curve" in events(t.log_dir).Tags()["images"]


def test_num_bootstrap_one_or_negative_is_refused_naming_the_argument():
    for bad in (1, -1):
        with pytest.raises(MisconfigurationException, match="num_bootstrap"):
            StiffnessCallback(num_bootstrap=bad)


def test_intervals_are_reproducible_seeded_contain_the_estimate_and_bands_bracket_bin_means(tmp_path):
    train, val = _digits_sets()
    data = Data(train, val)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        seed_everything(0)
        cb = StiffnessCallback(samples_per_class=6, seed=seed, every_n_epochs=0, log_images=False)
        t, _ = _fit(tmp_path / name, Net(), data, cb)
        (runs[name],) = _results(t).values()
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.intervals == b.intervals
    for key in a.curve_intervals:
        for side in ("within", "between"):
            for x, y in zip(a.curve_intervals[key][side], b.curve_intervals[key][side], strict=True):
                assert torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0))
    assert a.intervals != c.intervals  # another seed: other probe examples and other draws
    # Typical case: each interval contains its estimate; band ends bracket well-filled bins' means.
    for pair in a.pairs:
        for kind in a.kinds:
            for side, values in (("within_class", a.within_class), ("between_class", a.between_class)):
                low, high = a.intervals[f"stiffness/{pair}/{kind}/{side}"]
                assert low <= values[f"{pair}/{kind}"] <= high, (pair, kind, side)
        low, high = a.intervals[f"stiffness/{pair}/critical_distance/input"]
        assert low <= a.critical_distance[pair] <= high
        for side in ("within", "between"):
            curve = a.curves[pair][side]
            band_low, band_high = a.curve_intervals[pair][side]
            for k in range(len(curve.count)):
                if curve.count[k] >= 100:
                    assert band_low[k] <= curve.mean[k] <= band_high[k], (pair, side, k)


def test_quantile_edges_bands_against_a_loop():
    """curve_bands with unequal-width (quantile) edges, NaN stiffness and a class of one example."""
    g = torch.Generator().manual_seed(0)
    labels = {"train": torch.tensor([0] * 6 + [1] * 5 + [2] * 1), "val": torch.tensor([0] * 4 + [1] * 5)}
    feats = {k: torch.randn(len(v), 5, generator=g, dtype=torch.float64) + v[:, None] for k, v in labels.items()}
    grads = {k: torch.randn(len(v), 7, generator=g, dtype=torch.float64) + v[:, None] for k, v in labels.items()}
    grads["train"][2] = 0
    stiffness, distances, edges = {}, {}, {}
    for pair, (r, c) in PAIRS.items():
        stiffness[f"{pair}/cosine"] = cos64(grads[r], grads[c])
        distances[pair] = input_distance64(feats[r], feats[c])
        mask = ~torch.eye(len(labels[r]), dtype=torch.bool) if r == c else None
        edges[pair] = distance_bin_edges(distances[pair], mask, 4, binning="quantile")
    weights = draw_weights(labels, 60, torch.Generator().manual_seed(1))
    _weights_are_within_class_resamples(weights, labels)
    nested = {pair: {"cosine": stiffness[f"{pair}/cosine"]} for pair in PAIRS}
    bands = curve_bands(nested, _input_space(distances), _input_space(edges), labels, "cosine", weights)
    bands = {pair: by_space[INPUT] for pair, by_space in bands.items()}
    for pair, (r, c) in PAIRS.items():
        means = torch.stack(
            [
                bin_means64(
                    stiffness[f"{pair}/cosine"],
                    distances[pair],
                    edges[pair],
                    labels[r],
                    labels[c],
                    r == c,
                    weights[r][b],
                    weights[c][b],
                )
                for b in range(60)
            ]
        )
        for si, side in enumerate(("within", "between")):
            for k in range(4):
                want = percentile64(means[:, si, k].tolist())
                got = (float(bands[pair][side][0][k]), float(bands[pair][side][1][k]))
                assert got == pytest.approx(want, abs=1e-6, nan_ok=True), (pair, side, k)


# ------------------------------------------------------------------------------------- coherence and diversity


def _coherence64(g):
    mean = g.mean(0)
    return float(mean @ mean / (g * g).sum(1).mean()), float((g * g).sum() / (g.sum(0) @ g.sum(0)))


@pytest.mark.parametrize("kind", ["mlp", "gru", "bn"])
def test_functional_coherence_and_diversity_against_per_example_gradients(kind):
    torch.manual_seed(0)
    x, y = digits_tensors(40)
    model = Net(kind=kind).eval()
    if kind == "bn":  # non-trivial running statistics
        with torch.no_grad():
            model.net[1].running_mean.uniform_(-0.5, 0.5)
            model.net[1].running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gram = gradient_gram(model, x, y)
    g = grads64(model, x, y)
    coherence, diversity = _coherence64(g)
    assert gradient_coherence(gram) == pytest.approx(coherence, rel=1e-5)
    assert gradient_diversity(gram) == pytest.approx(diversity, rel=1e-5)
    assert len(y) * coherence == pytest.approx(1 / diversity, rel=1e-9)


@pytest.mark.parametrize("kind", ["gru", "bn"])
def test_logged_coherence_and_diversity_against_per_example_gradients(tmp_path, kind):
    train, val = _digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], num_bootstrap=0, log_images=False)
    t, snaps = _fit(tmp_path, Net(kind=kind), data, cb)
    results = _results(t)
    acc = events(t.log_dir)
    for result in results.values():
        g, _, _, _ = _probe_reference({"kind": kind}, snaps.states[result.step], result, data)
        for name in ("train", "val"):
            coherence, diversity = _coherence64(g[name])
            assert result.gradient_coherence[name] == pytest.approx(coherence, rel=1e-5)
            assert result.gradient_diversity[name] == pytest.approx(diversity, rel=1e-5)
            logged = {e.step: e.value for e in acc.Scalars(f"stiffness/{name}/gradient_coherence")}
            assert logged[result.step] == pytest.approx(coherence, rel=1e-5)
            logged = {e.step: e.value for e in acc.Scalars(f"stiffness/{name}/gradient_diversity")}
            assert logged[result.step] == pytest.approx(diversity, rel=1e-5)


def test_coherence_with_zero_gradient_examples(tmp_path):
    """Examples with a zero gradient count in the means (the definitions average over the whole probe set)."""
    train, val = _digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=4, kinds=["cosine"], num_bootstrap=0, log_images=False, every_n_epochs=0)
    t, snaps = _fit(tmp_path, Net(dead_pixel=True), data, cb)
    (result,) = _results(t).values()
    g, _, _, _ = _probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
    assert ((g["train"] == 0).all(1)).any()
    for name in ("train", "val"):
        coherence, diversity = _coherence64(g[name])
        assert result.gradient_coherence[name] == pytest.approx(coherence, rel=1e-5)
        assert result.gradient_diversity[name] == pytest.approx(diversity, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- class groups

GROUPS = {"round": [0, 6, 8, 9], "straight": [1, 4, 7], "curly": [2, 3, 5]}


def test_group_matrix_and_scalars_against_loops(tmp_path):
    train, val = _digits_sets(None, {7: 0})
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, class_groups=GROUPS, num_bootstrap=0, every_n_epochs=0)
    t, snaps = _fit(tmp_path, Net(), data, cb)
    (result,) = _results(t).values()
    _, cos, _, _ = _probe_reference({}, snaps.states[result.step], result, data)
    of_class = torch.zeros(10, dtype=torch.long)
    for gi, classes in enumerate(GROUPS.values()):
        of_class[classes] = gi
    assert result.group_names == list(GROUPS)
    acc = events(t.log_dir)
    for pair, (r, c) in PAIRS.items():
        la, lb = result.labels[r], result.labels[c]
        sign = torch.sign(cos[pair])  # sign of g_i . g_j
        for kind, s in (("cosine", cos[pair]), ("sign", sign)):
            # Group matrix: mean over pairs of examples (i != j), by group, in a plain loop.
            sums, counts = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
            for i in range(len(la)):
                for j in range(len(lb)):
                    if (r == c and i == j) or not math.isfinite(float(s[i, j])):
                        continue
                    gi, gj = of_class[la[i]], of_class[lb[j]]
                    sums[gi, gj] += s[i, j]
                    counts[gi, gj] += 1
            expected = torch.where(counts > 0, sums / counts, torch.full_like(sums, math.nan))
            got = result.group_matrices[f"{pair}/{kind}"].double()
            assert torch.allclose(got, expected, atol=1e-5, equal_nan=True), (pair, kind, got, expected)
            m = class_matrix_loop(s, la, lb, 10, r == c)
            same = of_class[:, None] == of_class[None, :]
            off = ~torch.eye(10, dtype=torch.bool)
            within_group = float(m[same & off].nanmean())
            between_groups = float(m[~same].nanmean())
            assert result.between_class_within_group[f"{pair}/{kind}"] == pytest.approx(within_group, abs=1e-5)
            assert result.between_groups[f"{pair}/{kind}"] == pytest.approx(between_groups, abs=1e-5)
            for tag, want in (("between_class_within_group", within_group), ("between_groups", between_groups)):
                (event,) = acc.Scalars(f"stiffness/{pair}/{kind}/{tag}")
                assert event.step == result.step and event.value == pytest.approx(want, abs=1e-5)
            assert f"stiffness/{pair}/{kind}/group_matrix" in acc.Tags()["images"]


def test_group_list_form_and_groups_of_one_class(tmp_path):
    train, val = _digits_sets()
    data = Data(train, val)
    seed_everything(0)
    groups = ["a", "b", "b", "b", "b", "b", "b", "b", "b", "c"]  # "a" and "c" hold one class each
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], class_groups=groups, num_bootstrap=0,
                           every_n_epochs=0, log_images=False)  # fmt: skip
    t, _ = _fit(tmp_path / "list", Net(), data, cb)
    (result,) = _results(t).values()
    assert result.group_names == ["a", "b", "c"]
    assert math.isfinite(result.between_class_within_group["train-train/cosine"])
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], class_groups=list(range(10)), num_bootstrap=0,
                           every_n_epochs=0, log_images=False)  # fmt: skip
    t, _ = _fit(tmp_path / "singletons", Net(), data, cb)
    (result,) = _results(t).values()
    assert math.isnan(result.between_class_within_group["train-train/cosine"])  # no two classes share a group
    assert math.isfinite(result.between_groups["train-train/cosine"])


@pytest.mark.parametrize(
    "groups",
    [
        {"a": [0, 1, 2, 3, 4], "b": [4, 5, 6, 7, 8, 9]},  # a class in two groups
        {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8]},  # class 9 in no group
        {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9, 10]},  # unknown class 10
        {"a": [-1, 0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},  # negative class
        [0, 0, 1, 1],  # a list with the wrong length
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_bad_class_groups_raise_an_error_naming_the_argument(tmp_path, groups, strict):
    """Errors that only show once the classes are known must still stop the run, naming `class_groups`, not turn
    every probe into a skipped one."""
    train, val = _digits_sets()
    data = Data(train, val)
    cb = StiffnessCallback(samples_per_class=2, class_groups=groups, strict=strict, log_images=False, num_bootstrap=0)
    t = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
    with pytest.raises((MisconfigurationException, ValueError), match="class_groups"):
        t.fit(Net(), datamodule=data)


@pytest.mark.parametrize("groups", ["abc", {"a": "0123"}, {}, [], [0.5] * 10, {"a": [0, 1.0]}, [True] * 10])
def test_malformed_class_groups_are_refused_at_construction(groups):
    with pytest.raises(MisconfigurationException, match="class_groups"):
        StiffnessCallback(class_groups=groups)


# ----------------------------------------------------------------------------------------- the whole training set


def _dataset_loop(g, y, num_classes):
    """Mean cosine over all pairs i != j by class pair; examples with a zero gradient left out."""
    keep = g.norm(dim=1) > 0
    g, y = g[keep], y[keep]
    return class_matrix_loop(cos64(g, g), y, y, num_classes, same_set=True)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 10)
        )

    def forward(self, x):
        return self.body(x.reshape(-1, 1, 8, 8))


class SeqGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        return self.head(self.gru(x.reshape(-1, 8, 8))[0][:, -1])


def _dataset_case(name):
    torch.manual_seed(0)
    x, y = digits_tensors(301)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    elif name == "cnn":
        model = SmallCNN()
        bn = model.body[1]
        with torch.no_grad():
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    else:
        model = SeqGRU()
    return model.eval(), x, y


@pytest.mark.parametrize("name", ["mlp", "cnn", "gru"])
def test_dataset_class_stiffness_against_a_float64_loop(name):
    """301 examples in batches of 30 (the last one holds a single example), shuffled; class 9 reduced to a single
    example (its diagonal entry NaN)."""
    model, x, y = _dataset_case(name)
    y = y.clone()
    nines = torch.nonzero(y == 9).flatten()
    y[nines[1:]] = 8  # one example of class 9 left
    before = copy.deepcopy(model.state_dict())
    expected = _dataset_loop(grads64(model, x, y), y, 10)
    loader = DataLoader(TensorDataset(x, y), batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(x) % 30 == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, num_classes=10)
    assert got.dtype == torch.float64 and got.shape == (10, 10)
    assert math.isnan(got[9, 9]) and math.isnan(expected[9, 9])
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().nan_to_num().max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Tokens(Dataset):
    def __init__(self, n=120, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            label = int(torch.randint(0, 4, (1,), generator=g))
            tokens = torch.randint(1, 20, (length,), generator=g)
            tokens[0] = 1 + label  # a class signal
            self.items.append({"tokens": tokens, "cls": torch.tensor(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(items):
    longest = max(len(it["tokens"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest)
    for k, it in enumerate(items):
        ids[k, : len(it["tokens"])] = it["tokens"]
        mask[k, : len(it["tokens"])] = 1
    return {"ids": ids, "mask": mask, "cls": torch.stack([it["cls"] for it in items])}


class MeanPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def classify(self, ids, mask):
        h = torch.tanh(self.mix(self.emb(ids)))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_dataset_class_stiffness_dict_batches_with_padding():
    torch.manual_seed(0)
    data = Tokens()
    model = MeanPool().eval()
    forward = lambda m, x: m.classify(x["ids"], x["mask"])  # noqa: E731
    to_xy = lambda batch: ({"ids": batch["ids"], "mask": batch["mask"]}, batch["cls"])  # noqa: E731
    # Reference: each example alone, unpadded.
    rows, labels = [], []
    for item in data.items:
        x = {"ids": item["tokens"][None], "mask": torch.ones(1, len(item["tokens"]))}
        rows.append(grads64(model, x, item["cls"][None], forward=forward))
        labels.append(int(item["cls"]))
    y = torch.tensor(labels)
    expected = _dataset_loop(torch.cat(rows), y, 4)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=pad_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, 4, forward_fn=forward, batch_to_xy=to_xy)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().max()


def test_dataset_class_stiffness_with_zero_gradient_examples():
    """Examples with no gradient have no direction: left out (as their NaN stiffness is in a probe)."""
    x, y = digits_tensors(120)
    torch.manual_seed(0)
    model = Net(dead_pixel=True).eval()
    g = grads64(model, x, y)
    assert (g.norm(dim=1) == 0).any() and (g.norm(dim=1) > 0).sum() > 50
    expected = _dataset_loop(g, y, 10)
    got = dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=25), 10)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True)


class BNNet(Net):
    def __init__(self):
        super().__init__(kind="bn", dropout=0.2)


def test_callback_dataset_measure_logs_saves_and_leaves_training_unchanged(tmp_path):
    x, y = digits_tensors(180)
    train = TensorDataset(x[:130], y[:130])
    val = TensorDataset(x[130:], y[130:])
    data = Data(train, val, batch_size=16, shuffle=True)

    def run(path, callbacks):
        seed_everything(0)
        model = BNNet()
        t = trainer(path, callbacks, max_epochs=2, limit_train_batches=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, datamodule=data)
        return t, model

    _, plain = run(tmp_path / "plain", [])
    snaps = Snapshots()
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0)
    t, measured = run(tmp_path / "measured", [snaps, cb])
    for (k, a), (k2, b) in zip(plain.state_dict().items(), measured.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k

    raw = raw_results(t.log_dir)
    files = sorted(name for name in raw if name.startswith("dataset"))
    assert files == ["dataset-epoch=0-step=3.pt", "dataset-epoch=1-step=6.pt"]
    acc = events(t.log_dir)
    within = {e.step: e.value for e in acc.Scalars("stiffness/dataset/cosine/within_class")}
    between = {e.step: e.value for e in acc.Scalars("stiffness/dataset/cosine/between_class")}
    images = {e.step for e in acc.Images("stiffness/dataset/cosine/class_matrix")}
    assert set(within) == set(between) == images == {3, 6}
    for event in acc.Images("stiffness/dataset/cosine/class_matrix"):
        picture = Image.open(io.BytesIO(event.encoded_image_string))
        assert picture.size[0] > 100 and picture.size[1] > 100
    for name in files:
        saved = raw[name]
        assert set(saved) == {"class_matrix", "epoch", "step", "seconds"}
        step = saved["step"]
        model = BNNet()
        model.load_state_dict(snaps.states[step])
        expected = _dataset_loop(grads64(model, x[:130], y[:130]), y[:130], 10)
        assert torch.allclose(saved["class_matrix"].double(), expected, atol=2e-6, equal_nan=True)
        w, b = within_between64(expected)
        assert within[step] == pytest.approx(w, abs=1e-5)
        assert between[step] == pytest.approx(b, abs=1e-5)


# ----------------------------------------------------------------------------------------------- more edge cases


def test_sign_and_cosine_intervals_with_a_class_missing_from_train(tmp_path):
    """Both kinds, class 3 absent from the training data (present in val), zero-gradient examples."""
    train, val = _digits_sets({3: 0, 9: 2}, None)
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, seed=1, every_n_epochs=0, log_images=False, num_bootstrap=50)
    t, snaps = _fit(tmp_path, Net(dead_pixel=True), data, cb)
    (result,) = _results(t).values()
    assert result.num_classes == 10 and 3 not in result.labels["train"].tolist()
    g, cos, dist, _ = _probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
    sign = {}
    for pair, (r, c) in PAIRS.items():
        gram = g[r] @ g[c].T
        sign[pair] = torch.sign(gram)
        stored = result.stiffness[f"{pair}/sign"].double()
        clear = cos[pair].abs().nan_to_num(1.0) > 1e-4  # signs of near-zero products may round either way
        assert torch.equal(stored[clear], sign[pair][clear]), pair
        m = class_matrix_loop(sign[pair], result.labels[r], result.labels[c], 10, r == c)
        assert result.within_class[f"{pair}/sign"] == pytest.approx(within_between64(m)[0], abs=1e-6)
    _check_intervals_against_brute_force(result, cos, dist, seed=1, num_draws=50, sign=sign)


def test_a_sign_only_probe_fits_xi_and_its_interval_on_sign(tmp_path):
    train, val = _digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["sign"], every_n_epochs=0, log_images=False, num_bootstrap=40)
    t, snaps = _fit(tmp_path, Net(), data, cb)
    (result,) = _results(t).values()
    assert result.xi_kind == "sign"
    g, cos, dist, _ = _probe_reference({}, snaps.states[result.step], result, data)
    sign = {pair: torch.sign(g[r] @ g[c].T) for pair, (r, c) in PAIRS.items()}
    _check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=40, sign=sign)


def test_float64_training_probe_and_dataset_measure_agree_with_float64_loops(tmp_path):
    """precision="64-true": the probe and the whole-training-set measure run in float64 (no dtype clash with the
    loader's float32 inputs) and agree with float64 loops to ~1e-10."""
    x, y = digits_tensors(150)
    train, val = TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])
    data = Data(train, val, batch_size=32)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0,
                           log_images=False, probe_at_start=False)  # fmt: skip
    t, snaps = _fit(tmp_path, Net(kind="bn"), data, cb, precision="64-true")
    raw = raw_results(t.log_dir)
    assert "dataset-epoch=0-step=2.pt" in raw, sorted(raw)
    model = Net(kind="bn").double()
    model.load_state_dict(snaps.states[2])
    expected = _dataset_loop(grads64(model, x[:100], y[:100]), y[:100], 10)
    got = raw["dataset-epoch=0-step=2.pt"]["class_matrix"]
    assert torch.allclose(got, expected, atol=1e-10, equal_nan=True), (got - expected).abs().nan_to_num().max()
    (result,) = _results(t).values()
    g, _, _, _ = _probe_reference({"kind": "bn"}, snaps.states[result.step], result, data)
    coherence, diversity = _coherence64(g["train"])
    assert result.gradient_coherence["train"] == pytest.approx(coherence, rel=1e-9)
    assert result.gradient_diversity["train"] == pytest.approx(diversity, rel=1e-9)


def test_a_validation_set_of_one_example(tmp_path):
    """N = 1: coherence |g|^2/|g|^2 = 1 and diversity 1 (both definitions hold); the probe is not lost."""
    x, y = digits_tensors(200)
    train, val = TensorDataset(x[:150], y[:150]), TensorDataset(x[150:151], y[150:151])
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], every_n_epochs=0, log_images=False, num_bootstrap=20)
    t, snaps = _fit(tmp_path, Net(), data, cb)
    results = _results(t)
    assert len(results) == 1
    (result,) = results.values()
    assert len(result.labels["val"]) == 1
    assert result.gradient_coherence["val"] == pytest.approx(1.0)
    assert result.gradient_diversity["val"] == pytest.approx(1.0)
    _, cos, dist, _ = _probe_reference({}, snaps.states[result.step], result, data)
    _check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=20)


def test_dataset_class_stiffness_frozen_layer_custom_loss_and_errors():
    torch.manual_seed(0)
    x, y = digits_tensors(90)
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10)).eval()
    model[0].requires_grad_(False)

    def loss_fn(out, t):  # per-example squared error to the one-hot target
        return ((out - F.one_hot(t, 10).to(out.dtype)) ** 2).sum(1)

    expected = _dataset_loop(grads64(model, x, y, loss_fn=loss_fn), y, 10)
    got = dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 10, loss_fn=loss_fn)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True)
    assert model[0].weight.grad is None and model[2].weight.grad is None
    with pytest.raises(ValueError, match="num_classes"):
        dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 5)
    bn = nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Linear(4, 10)).train()
    with pytest.raises(ValueError, match=r"(?i)batchnorm|train"):
        dataset_class_stiffness(bn, DataLoader(TensorDataset(x, y), batch_size=7), 10)


def test_bf16_true_training_still_gets_the_dataset_measure(tmp_path):
    """The probe converts its inputs as the precision plugin does; the whole-training-set measure must too."""
    x, y = digits_tensors(150)
    data = Data(TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:]), batch_size=32)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0,
                           log_images=False, probe_at_start=False, strict=False)  # fmt: skip
    t, _ = _fit(tmp_path, Net(), data, cb, precision="bf16-true")
    assert "dataset-epoch=0-step=2.pt" in raw_results(t.log_dir)


@pytest.mark.parametrize("n", [900, 1100])
def test_bands_and_intervals_of_large_probe_sets_against_vectorised_definitions(n):
    """Sizes past the int16 sort keys (n * 2 * bins >= 2**15) and past the cached pair list (n > 1024)."""
    g = torch.Generator().manual_seed(n)
    labels = {"train": torch.randint(0, 10, (n,), generator=g)}
    grads = torch.randn(n, 6, generator=g, dtype=torch.float64) + 0.5 * labels["train"][:, None].double()
    feats = torch.randn(n, 5, generator=g, dtype=torch.float64) + labels["train"][:, None].double()
    cos = cos64(grads, grads)
    dist = input_distance64(feats, feats).clamp_min(0)
    distances = {"train-train": dist}
    mask = ~torch.eye(n, dtype=torch.bool)
    edges = {"train-train": distance_bin_edges(dist, mask, 20)}
    weights = draw_weights(labels, 3, torch.Generator().manual_seed(2))
    nested = {"train-train": {"cosine": cos}}
    bands = curve_bands(nested, _input_space(distances), _input_space(edges), labels, "cosine", weights)
    bands = {pair: by_space[INPUT] for pair, by_space in bands.items()}
    found = bootstrap_intervals(
        nested, _input_space(distances), labels, ("cosine",), "cosine", 10, 3, None, weights=weights
    )
    intervals = {
        class_tag("train-train", "cosine", side): found.classes["train-train"]["cosine"][side] for side in SIDES
    }
    intervals[critical_distance_tag("train-train")] = found.critical_distances["train-train"][INPUT]
    y = labels["train"]
    k = torch.bucketize(dist, edges["train-train"][1:-1], right=True).clamp_max(19)
    side = (y[:, None] != y[None, :]).long()
    slot = (side * 20 + k)[mask]
    draws, within, between, xis = [], [], [], []
    for b in range(3):
        w = (weights["train"][b].double()[:, None] * weights["train"][b].double()[None, :])[mask]
        num = torch.bincount(slot, weights=w * cos[mask], minlength=40)
        den = torch.bincount(slot, weights=w, minlength=40)
        draws.append(torch.where(den > 0, num / den, torch.full_like(num, math.nan)))
        m = class_matrix_loop(cos, y, y, 10, True, weights["train"][b], weights["train"][b])
        within.append(within_between64(m)[0])
        between.append(within_between64(m)[1])
        xis.append(xi64(cos, dist, y, y, True, weights["train"][b], weights["train"][b]))
    draws = torch.stack(draws).view(3, 2, 20)
    for si, s in enumerate(("within", "between")):
        for b in range(20):
            want = percentile64(draws[:, si, b].tolist())
            got = (float(bands["train-train"][s][0][b]), float(bands["train-train"][s][1][b]))
            assert got == pytest.approx(want, abs=1e-5, nan_ok=True), (s, b)
    assert intervals["stiffness/train-train/cosine/within_class"] == pytest.approx(percentile64(within), abs=1e-5)
    assert intervals["stiffness/train-train/cosine/between_class"] == pytest.approx(percentile64(between), abs=1e-5)
    assert intervals["stiffness/train-train/critical_distance/input"] == pytest.approx(percentile64(xis), rel=1e-4)


class PackedGRU(nn.Module):
    """A GRU over padded token sequences, packed by their lengths (so padding cannot change the outputs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.gru = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 4)

    def classify(self, ids, mask):
        lengths = mask.sum(1).long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.head(h[-1])


def test_dataset_class_stiffness_packed_gru_dict_batches():
    torch.manual_seed(0)
    data = Tokens(n=90, seed=1)
    model = PackedGRU().eval()
    forward = lambda m, x: m.classify(x["ids"], x["mask"])  # noqa: E731
    to_xy = lambda batch: ({"ids": batch["ids"], "mask": batch["mask"]}, batch["cls"])  # noqa: E731
    rows = [
        grads64(model, {"ids": it["tokens"][None], "mask": torch.ones(1, len(it["tokens"]))}, it["cls"][None], forward)
        for it in data.items
    ]
    y = torch.tensor([int(it["cls"]) for it in data.items])
    expected = _dataset_loop(torch.cat(rows), y, 4)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=pad_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, 4, forward_fn=forward, batch_to_xy=to_xy)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().max()


class TrainOnly(LightningDataModule):
    def __init__(self, train):
        super().__init__()
        self.train_set = train

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)


def test_without_validation_data_everything_is_train_train(tmp_path):
    train, _ = _digits_sets()
    data = TrainOnly(train)
    data.val_set = None
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], every_n_epochs=0, num_bootstrap=30,
                           class_groups=GROUPS, log_images=True)  # fmt: skip
    t, snaps = _fit(tmp_path, Net(), data, cb)
    (result,) = _results(t).values()
    assert result.pairs == ["train-train"]
    assert set(result.gradient_coherence) == {"train"}
    assert set(result.group_matrices) == {"train-train/cosine"}
    _, cos, dist, _ = _probe_reference({}, snaps.states[result.step], result, data)
    _check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=30)
    tags = events(t.log_dir).Tags()
    assert "stiffness/train-train/cosine/group_matrix" in tags["images"]
    assert "stiffness/val/gradient_coherence" not in tags["scalars"]
