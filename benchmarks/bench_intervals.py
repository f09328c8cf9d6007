"""Bootstrap intervals against the probe they come from, measured side by side in one process.

The callback benchmark's probe: the paper's fully connected net (784-500-300-100-10), 500 training and 500
validation examples (50 per class), both kinds, every measure (``measure_stiffness`` on the Gram matrix). Then the
intervals of that probe (every within/between of each pair and kind, and xi) for a few numbers of draws. The default
``num_bootstrap`` is chosen so that the intervals cost less than half of the probe. Runs alternate, the fastest of
each counts (a shared machine's load changes from minute to minute).

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

from lightning_stiffness.extra_measures import ExtraMeasures


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
    probe_runs, draw_runs = [], {draws: [] for draws in args.draws}
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = probe_once(model, sets, "auto")
        probe_runs.append(time.perf_counter() - start)
        for draws in args.draws:
            start = time.perf_counter()
            ExtraMeasures(num_bootstrap=draws).add(result)
            draw_runs[draws].append(time.perf_counter() - start)
    probe = min(probe_runs)
    print(f"probe (Gram matrix and every measure): fastest {probe:.3f} s")
    for draws, runs in draw_runs.items():
        print(f"intervals, {draws:4d} draws: fastest {min(runs):.3f} s = {min(runs) / probe:5.1%} of the probe")


if __name__ == "__main__":
    main()
