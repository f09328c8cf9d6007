"""Brute-force float64 references: one ``torch.autograd.grad`` per example, nothing shared with the engines.

Every test that checks a number against per-example gradients takes them from here, so the suite has one definition
of "example i's own gradient": the model on example ``i`` alone (a tensor, a dict of tensors or a tuple sliced at
``i``), its loss summed, differentiated with respect to the chosen parameters; a parameter the loss does not reach
gets zeros.
"""

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_stiffness.measures.intervals import draw_weights


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """The suite's default per-example loss: cross-entropy with ``reduction="none"``."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def take(inputs: Any, i: int) -> Any:
    """Example ``i`` of ``inputs`` (a tensor, a dict of tensors, or a tuple/list of tensors), batch dim kept."""
    if isinstance(inputs, dict):
        return {key: value[i : i + 1] for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(value[i : i + 1] for value in inputs)
    return inputs[i : i + 1]


def call(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> Any:
    """``forward_fn(model, inputs)``, else the model on ``inputs``: a dict as keywords, a tuple as positionals."""
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def to_float64(inputs: Any) -> Any:
    """``inputs`` with every floating tensor in float64 (integer ids and masks unchanged)."""
    if isinstance(inputs, dict):
        return {key: to_float64(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_float64(value) for value in inputs)
    return inputs.double() if inputs.is_floating_point() else inputs


def per_example_gradients(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable | None = None,
    params: Any = None,
    forward_fn: Callable | None = None,
    before_each: Callable[[], None] | None = None,
    float64_copy: bool = False,
) -> dict[str, Tensor]:
    """Parameter name -> [N, numel] float64 gradients of each example's own loss, one backward pass per example.

    Args:
        params: parameter names to differentiate; ``None`` means every parameter with ``requires_grad``.
        before_each: called before each example (and once after the last), e.g. to restore buffers a forward updates.
        float64_copy: compute on a float64 copy of the model in eval mode, with the inputs' floats in float64, instead
            of on the model as it is (its dtype, its mode) with the gradients cast to float64 after.
    """
    loss_fn = loss_fn or cross_entropy
    if float64_copy:
        model, inputs = copy.deepcopy(model).double().eval(), to_float64(inputs)
    named = dict(model.named_parameters())
    names = [name for name, p in named.items() if (p.requires_grad if params is None else name in params)]
    chosen = [named[name] for name in names]
    flags = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    try:
        for i in range(targets.shape[0]):
            if before_each is not None:
                before_each()
            loss = loss_fn(call(model, take(inputs, i), forward_fn), targets[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, chosen, allow_unused=True)
            for name, g, p in zip(names, grads, chosen, strict=True):
                rows[name].append((torch.zeros_like(p) if g is None else g).detach().double().flatten())
    finally:
        for p, flag in zip(chosen, flags, strict=True):
            p.requires_grad_(flag)
        if before_each is not None:
            before_each()
    return {name: torch.stack(r) for name, r in rows.items()}


def reference_gradients(model: nn.Module, inputs: Any, targets: Tensor, loss_fn=None, params=None, **kwargs) -> Tensor:
    """Per-example gradients [N, P] in float64 (the chosen parameters' in ``named_parameters`` order, flattened).

    Keywords as :func:`per_example_gradients`.
    """
    return torch.cat(list(per_example_gradients(model, inputs, targets, loss_fn, params, **kwargs).values()), dim=1)


def reference_gram(
    model, inputs, targets, inputs2=None, targets2=None, loss_fn=None, params=None, per_layer=False, **kwargs
) -> Any:
    """Float64 Gram [N, M] of the per-example gradients of two sets (the first with itself without ``inputs2``).

    With ``per_layer``, a dict module name -> [N, M] block (each module's own parameters). Keywords as
    :func:`per_example_gradients`.
    """
    rows = per_example_gradients(model, inputs, targets, loss_fn, params, **kwargs)
    cols = rows if inputs2 is None else per_example_gradients(model, inputs2, targets2, loss_fn, params, **kwargs)
    blocks: dict[str, Tensor] = {}
    for name in rows:
        key = name.rpartition(".")[0] or name
        block = rows[name] @ cols[name].T
        blocks[key] = block if key not in blocks else blocks[key] + block
    if per_layer:
        return blocks
    if not blocks:
        return torch.zeros(targets.shape[0], (targets if targets2 is None else targets2).shape[0], dtype=torch.float64)
    return sum(blocks.values())


#: The probe's pairs of sets: pair -> (rows' set, columns' set).
PAIRS = {"train-train": ("train", "train"), "train-val": ("train", "val"), "val-val": ("val", "val")}


def cos64(a, b):
    """Float64 cosine of every row of ``a`` with every row of ``b``; NaN where either row is zero."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    out = (a @ b.T) / (na[:, None] * nb[None, :])
    out[na == 0] = math.nan
    out[:, nb == 0] = math.nan
    return out.clamp(-1, 1)


def input_distance64(a, b):
    """Float64 cosine distance 1 - cos of the flattened inputs, every row of ``a`` with every row of ``b``."""
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
    """Mean of a class matrix's diagonal and of its off-diagonal entries, NaN entries left out."""
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
    """The 2.5% (lower) and 97.5% (higher) quantiles of the non-NaN draws; (NaN, NaN) when none."""
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


def coherence64(g):
    """Gradient coherence |mean g|^2 / mean |g_i|^2 and diversity sum |g_i|^2 / |sum g|^2 of the rows of ``g``."""
    mean = g.mean(0)
    return float(mean @ mean / (g * g).sum(1).mean()), float((g * g).sum() / (g.sum(0) @ g.sum(0)))


def weights_are_within_class_resamples(weights, labels):
    """Assert each draw's weights are within-class resample counts (non-negative integers, class sizes kept)."""
    for name, w in weights.items():
        assert (w >= 0).all() and torch.equal(w, w.round())
        for c in torch.unique(labels[name]).tolist():
            members = labels[name] == c
            assert torch.all(w[:, members].sum(1) == members.sum())


def check_intervals_against_brute_force(result, cos, dist, seed, ldist=None, layer=None, num_draws=200, sign=None):
    """Every interval and band of ``result`` against per-draw loops, with the draws the documented seed makes.
    ``cos``/``sign``: pair -> float64 stiffness of that kind (``sign`` only when measured)."""
    by_kind = {k: v for k, v in (("cosine", cos), ("sign", sign)) if k in result.kinds}
    assert by_kind.keys() == set(result.kinds)
    line = by_kind[result.xi_kind]
    generator = torch.Generator().manual_seed((seed * 1_000_003 + result.step) % 2**63)
    weights = draw_weights(result.labels, num_draws, generator)
    weights_are_within_class_resamples(weights, result.labels)
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
