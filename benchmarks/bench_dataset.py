"""Exact class stiffness over a whole training set against one training epoch, measured side by side in one process.

The setting of the issue tracker's target: ``dataset_class_stiffness`` on 60,000 synthetic 784-dimensional examples
with the paper's fully connected net (784-500-300-100-10), against one training epoch over the same examples at batch
size 32 (Lightning Trainer, Adam). Target: at most 3x the epoch. ``--block-size`` (default 1024) sets how many
examples each Gram matrix of norms and each class's weighted backward pass take at once (loader batches are joined).

    python benchmarks/bench_dataset.py [--block-size 1024] [--examples 60000] [--repeat 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_callback import PaperFC

from lightning_stiffness.functional import dataset_class_stiffness, within_between


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="the measurement's loader batch size")
    parser.add_argument("--block-size", type=int, default=1024, help="examples per Gram matrix of norms")
    parser.add_argument("--examples", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs of each")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PaperFC()
    train = TensorDataset(torch.randn(args.examples, 784), torch.randint(0, 10, (args.examples,)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.examples} examples")
    model.eval()
    warm = DataLoader(TensorDataset(*train[:64]), batch_size=32)
    dataset_class_stiffness(model, warm, 10)  # warm-up

    loader = DataLoader(train, batch_size=args.batch_size)
    trainer_options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    # Alternated and repeated: on a shared machine the load changes from minute to minute; the fastest run of each
    # is the least disturbed.
    dataset_runs, epoch_runs = [], []
    for _ in range(args.repeat):
        model.eval()
        start = time.perf_counter()
        matrix = dataset_class_stiffness(model, loader, 10, block_size=args.block_size)
        dataset_runs.append(time.perf_counter() - start)
        model.train()
        start = time.perf_counter()
        Trainer(**trainer_options).fit(model, DataLoader(train, batch_size=32, shuffle=True))
        epoch_runs.append(time.perf_counter() - start)
    within, between = within_between(matrix)
    print(f"dataset_class_stiffness (blocks of {args.block_size}): {_runs(dataset_runs)}")
    print(f"one training epoch (batch 32, Lightning, Adam): {_runs(epoch_runs)}")
    print(f"last matrix: within {within:.4f}, between {between:.4f}")
    ratio = min(dataset_runs) / min(epoch_runs)
    print(f"dataset / epoch (fastest runs): {ratio:.2f}x   (target: at most 3x)")


def _runs(seconds: list[float]) -> str:
    return f"fastest {min(seconds):.2f} s, runs " + ", ".join(f"{s:.2f}" for s in seconds)


if __name__ == "__main__":
    main()
