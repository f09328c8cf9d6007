"""Bootstrap intervals and class groups with many classes, against the probe they come from, side by side.

The setting of the issue: the paper's fully connected net with C outputs (784-500-300-100-C), C classes x 2 probe
examples in train and in val (N = 2C each), both kinds, every measure. "probe" is the Gram matrix and
``measure_stiffness``; "extras" are what the callback adds from its matrices: ``add_intervals`` (200 draws: the
within/between intervals of each pair and kind, xi's and the curve bands) and ``add_group_measures`` (20 groups).
The table gives the fastest of ``--repeat`` runs of each (runs alternate: a shared machine's load changes) and the
extras' share of the probe (target: at most 50%).

``--before`` also times the within/between draws as they were computed before (kept here only, for the comparison):
per class of columns, a [C, N] x [N, B] product, O(C^2 N B), and a [K, C, B, C] tensor; at 1000 classes one probe's
intervals took minutes, so ``--before`` runs it once, at the sizes of ``--before-classes``.

    python benchmarks/bench_many_classes.py [--classes 300 1000] [--repeat 3] [--before] [--threads 2]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gram import relu_mlp

from lightning_stiffness.functional import gradient_gram
from lightning_stiffness.measures import intervals
from lightning_stiffness.measures.groups import add_group_measures
from lightning_stiffness.measures.intervals import add_intervals
from lightning_stiffness.measures.probe_measures import measure_stiffness
from lightning_stiffness.names import MODEL, PAIRS

DRAWS = 200
NUM_GROUPS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--before", action="store_true", help="also time the former within/between draws once")
    parser.add_argument("--before-classes", type=int, nargs="+", default=[300, 1000])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {DRAWS} draws, {NUM_GROUPS} groups")
    print("| classes x per class | N train + val | probe (s) | intervals (s) | groups (s) | extras / probe |")
    rows = []
    for num_classes in args.classes:
        probe, extras, result = _time(num_classes, args.per_class, args.repeat)
        share = (extras["intervals"] + extras["groups"]) / probe
        n = num_classes * args.per_class
        cells = f"{probe:.2f} | {extras['intervals']:.2f} | {extras['groups']:.2f} | {share:.1%}"
        rows.append(f"| {num_classes} x {args.per_class} (after) | {n} + {n} | {cells} |")
        print(rows[-1], flush=True)
        if args.before and num_classes in args.before_classes:
            after = _class_intervals(result)
            with _former_class_draws():
                start = time.perf_counter()
                add_intervals(result, DRAWS, seed=0)
                former = time.perf_counter() - start
            before = _class_intervals(result)
            gap = max(abs(x - y) for x, y in zip(after, before, strict=True))
            print(f"largest difference of a within/between interval end, before - after: {gap:.2e}")
            share = (former + extras["groups"]) / probe
            cells = f"{probe:.2f} | {former:.2f} | {extras['groups']:.2f} | {share:.1%}"
            rows.append(f"| {num_classes} x {args.per_class} (before) | {n} + {n} | {cells} |")
            print(rows[-1], flush=True)


def _time(num_classes: int, per_class: int, repeat: int):
    """Fastest probe, intervals and groups of ``repeat`` alternating runs, and the last probe's result."""
    torch.manual_seed(0)
    model = relu_mlp(784, 500, 300, 100, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    sets = {name: (torch.randn(len(labels), 784), labels) for name in ("train", "val")}
    groups = [c % NUM_GROUPS for c in range(num_classes)]
    runs: dict[str, list[float]] = {"probe": [], "intervals": [], "groups": []}
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        x = torch.cat([s[0] for s in sets.values()])
        y = torch.cat([s[1] for s in sets.values()])
        gram = gradient_gram(model, x, y, method="auto")
        result = measure_stiffness(
            gram,
            {k: v[0] for k, v in sets.items()},
            {k: v[1] for k, v in sets.items()},
            {k: torch.arange(len(v[1])) for k, v in sets.items()},
            num_classes=num_classes,
        )
        runs["probe"].append(time.perf_counter() - start)
        start = time.perf_counter()
        add_intervals(result, DRAWS, seed=0)
        runs["intervals"].append(time.perf_counter() - start)
        start = time.perf_counter()
        add_group_measures(result, groups)
        runs["groups"].append(time.perf_counter() - start)
    fastest = {part: min(times) for part, times in runs.items()}
    return fastest.pop("probe"), fastest, result


def _class_intervals(result) -> list[float]:
    """Every within/between interval end of ``result``, in a fixed order."""
    ends = []
    for by_kind in result.classes.values():
        for layers in by_kind.values():
            for side in ("within", "between"):
                ends += list(layers[MODEL].intervals[side])
    return ends


class _former_class_draws:
    """Within/between draws computed as before, in place of the package's for the ``with`` block."""

    def __enter__(self) -> None:
        self._kept = intervals._class_draws
        intervals._class_draws = _former

    def __exit__(self, *exc) -> None:
        intervals._class_draws = self._kept


def _former(stiffness, pair, kinds, labels_r, labels_c, w_r, w_c, num_classes):
    """The former ``_class_draws``: columns sorted by class, then per class of columns a [C, N] x [N, B] product
    into a [K, C, B, C] tensor of sums, and [B, C, C] counts."""
    order_c = torch.argsort(labels_c, stable=True)
    labels_c, w_c = labels_c[order_c], w_c[:, order_c].float()
    w_r = w_r.float()
    rows, cols = PAIRS[pair]
    n, m = labels_r.numel(), labels_c.numel()
    matrices = {kind: stiffness[kind].cpu() for kind in kinds}
    finite = {kind: bool(torch.isfinite(values.sum())) for kind, values in matrices.items()}
    forms = torch.empty(len(kinds) + sum(not f for f in finite.values()), n, m)
    position = torch.argsort(order_c)
    index = 0
    for kind, values in matrices.items():
        form = forms[index]
        torch.index_select(values.float(), 1, order_c, out=form)
        if finite[kind]:
            if rows == cols:
                form[torch.arange(n), position] = 0.0
        else:
            valid = torch.isfinite(form)
            if rows == cols:
                valid[torch.arange(n), position] = False
            form.masked_fill_(~valid, 0.0)
            index += 1
            forms[index] = valid
        index += 1
    sums = iter(_former_weighted_class_sums(forms, w_r, w_c, labels_r, labels_c, num_classes))
    counts = None
    out = {}
    for kind in kinds:
        kind_sums = next(sums)
        if finite[kind]:
            if counts is None:
                counts = _former_class_counts(w_r, w_c, labels_r, labels_c, num_classes, rows == cols)
            kind_counts = counts
        else:
            kind_counts = next(sums)
        matrix = torch.where(kind_counts > 0, kind_sums / kind_counts.clamp_min(1e-12), torch.nan)
        diagonal = torch.eye(num_classes, dtype=torch.bool)
        out[kind] = (matrix[:, diagonal].nanmean(dim=1), matrix[:, ~diagonal].nanmean(dim=1))
    return out


def _former_weighted_class_sums(forms, w_rows, w_cols, labels_r, labels_c, num_classes) -> Tensor:
    k, b = forms.shape[0], w_rows.shape[0]
    out = torch.zeros(k, num_classes, b, num_classes)
    rows_onehot_t = torch.nn.functional.one_hot(labels_r.long(), num_classes).float().T
    weights_t = w_rows.T.contiguous()
    for label in torch.unique(labels_c).tolist():
        members = torch.nonzero(labels_c == label).flatten()
        cols = slice(int(members[0]), int(members[-1]) + 1)  # sorted: contiguous
        per_row = forms[:, :, cols] @ w_cols[:, cols].T
        out[:, :, :, label] = rows_onehot_t @ (per_row * weights_t)
    return out.transpose(1, 2)


def _former_class_counts(w_rows, w_cols, labels_r, labels_c, num_classes, same_set) -> Tensor:
    onehot_r = torch.nn.functional.one_hot(labels_r.long(), num_classes).float()
    onehot_c = torch.nn.functional.one_hot(labels_c.long(), num_classes).float()
    counts = (w_rows @ onehot_r)[:, :, None] * (w_cols @ onehot_c)[:, None, :]
    if same_set:
        counts -= torch.diag_embed((w_rows * w_rows) @ onehot_r)
    return counts


if __name__ == "__main__":
    main()
