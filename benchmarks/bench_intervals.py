"""Bootstrap intervals and curve bands against the probe they come from, measured side by side in one process.

The callback benchmark's probe: the paper's fully connected net (784-500-300-100-10), 500 training and 500
validation examples (50 per class), both kinds, every measure (``measure_stiffness`` on the Gram matrix). Then, from
one set of draws, the intervals of that probe (every within/between of each pair and kind, and xi) and the bands
around its three distance curves, for a few numbers of draws. The default ``num_bootstrap`` is chosen so that the
intervals and bands together cost less than half of the probe. Runs alternate, the fastest of each counts (a shared
machine's load changes from minute to minute).

    python benchmarks/bench_intervals.py [--draws 100 200 400] [--per-class 50] [--repeat 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_callback import PaperFC, probe_once

from lightning_stiffness.measures.intervals import bootstrap_intervals, curve_bands, draw_weights
from lightning_stiffness.names import MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PaperFC()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    sets = {name: (torch.randn(len(labels), 784), labels) for name in ("train", "val")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(labels)} + {len(labels)} examples")
    probe_once(model, {k: (v[0][:8], v[1][:8]) for k, v in sets.items()}, "auto")  # warm-up
    probe_runs = []
    parts = ("weights", "intervals", "bands")
    runs = {(draws, part): [] for draws in args.draws for part in parts}
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = probe_once(model, sets, "auto")
        probe_runs.append(time.perf_counter() - start)
        for draws in args.draws:
            start = time.perf_counter()
            weights = draw_weights(result.labels, draws, torch.Generator().manual_seed(0))  # shared, as in the callback
            runs[draws, "weights"].append(time.perf_counter() - start)
            for part, measure in (("intervals", _intervals), ("bands", _bands)):
                start = time.perf_counter()
                measure(result, weights)
                runs[draws, part].append(time.perf_counter() - start)
    probe = min(probe_runs)
    print(f"probe (Gram matrix and every measure): fastest {probe:.3f} s; fastest of each below, in seconds")
    print("| draws | weights | intervals | bands | all | share of the probe |")
    for draws in args.draws:
        fastest = [min(runs[draws, part]) for part in parts]
        cells = " | ".join(f"{t:.3f}" for t in fastest)
        print(f"| {draws} | {cells} | {sum(fastest):.3f} | {sum(fastest) / probe:.1%} |")


def _by_structure(result):
    """The probe's stiffness matrices (pair -> kind) and distances (pair -> space), as the interval functions take
    them."""
    classes = result.classes
    stiffness = {pair: {kind: m[MODEL].stiffness for kind, m in by_kind.items()} for pair, by_kind in classes.items()}
    distances = {pair: {space: m.distances for space, m in spaces.items()} for pair, spaces in result.spaces.items()}
    return stiffness, distances


def _intervals(result, weights) -> None:
    stiffness, distances = _by_structure(result)
    draws = next(iter(weights.values())).shape[0]
    bootstrap_intervals(
        stiffness, distances, result.labels, result.kinds, result.xi_kind, result.num_classes, draws, None,
        weights=weights,
    )  # fmt: skip


def _bands(result, weights) -> None:
    stiffness, distances = _by_structure(result)
    edges = {pair: {space: m.curves["within"].edges for space, m in by.items()} for pair, by in result.spaces.items()}
    curve_bands(stiffness, distances, edges, result.labels, result.xi_kind, weights)


if __name__ == "__main__":
    main()
