"""Reproduce the stiffness findings of Fort et al. (arXiv 1901.09491) on bundled digits, then write the report.

Trains the paper's fully connected net (hidden 500-300-100, ReLU) with Adam at several learning rates spanning two
decades, probing stiffness on a schedule that is dense early and sparse late, in input space and in the
representation of each hidden layer. Then runs ``lightning-stiffness report`` over all runs and prints a summary.

    python examples/reproduce_paper.py                       # digits, 5 learning rates, about 5 minutes on 2 cores
    python examples/reproduce_paper.py --dataset mnist --data-dir ~/data --max-examples 12000

What was found is written up in examples/REPRODUCTION.md.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsDataModule, PaperNet

from lightning_stiffness import StiffnessCallback, StiffnessResult
from lightning_stiffness.names import MODEL
from lightning_stiffness.report import load_run, write_report

#: The hidden layers' ReLU outputs in PaperNet's fully connected net (Flatten, then Linear/ReLU pairs).
HIDDEN_LAYERS = ["net.2", "net.4", "net.6"]


def probe_schedule(max_epochs: int) -> list[int]:
    """Epochs (0-based) at whose end to probe: every epoch at first, then geometrically sparser, and the last one."""
    points = np.unique(np.round(np.geomspace(1, max_epochs, num=12)).astype(int) - 1)
    return sorted({int(p) for p in points} | {0, 1, 2, max_epochs - 1})


def train_one(args: argparse.Namespace, lr: float) -> Path:
    seed_everything(args.seed, workers=True)
    data = DigitsDataModule(
        dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, max_examples=args.max_examples
    )
    model = PaperNet(arch="fc", optimizer="adam", lr=lr, input_shape=data.input_shape, num_classes=data.num_classes)
    callback = StiffnessCallback(
        samples_per_class=args.samples_per_class,
        epochs=probe_schedule(args.epochs),
        layers=HIDDEN_LAYERS,
        per_layer=True,
        images_every_n_probes=4,
        seed=args.seed,
    )
    logger = TensorBoardLogger(args.out, name=f"lr={lr:g}")
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        deterministic=True,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return Path(logger.log_dir)


def _epochs_trained(result: StiffnessResult) -> int:
    """Epochs completed when the probe ran: 0 at initialisation (step 0), else its epoch + 1 (probes at epoch ends)."""
    return 0 if result.step == 0 else result.epoch + 1


def summarise(run_dir: Path, lr: float) -> dict:
    run = load_run(run_dir)
    first, last = run.results[0], run.results[-1]
    within = [r.classes["train-train"]["cosine"][MODEL].within for r in run.results]
    val_losses = [v for _, v in run.losses.get("val_loss", [])]
    best = int(np.argmin(val_losses)) if val_losses else -1

    def at(result: StiffnessResult) -> dict:
        classes = {pair: {kind: m[MODEL] for kind, m in by_kind.items()} for pair, by_kind in result.classes.items()}
        values = {
            "epochs_trained": _epochs_trained(result),
            "within_train": classes["train-train"]["cosine"].within,
            "between_train": classes["train-train"]["cosine"].between,
            "within_val": classes["val-val"]["cosine"].within,
            "between_val": classes["val-val"]["cosine"].between,
            "within_train_val": classes["train-val"]["cosine"].within,
            "sign_within_train_val": classes["train-val"]["sign"].within,
        }
        for space, measures in result.spaces["train-train"].items():
            values[f"xi_{space}"] = measures.critical_distance  # xi_input, then each layer's
        return values

    return {
        "lr": lr,
        "run_dir": str(run_dir),
        "start": at(first),
        "peak_within_train": max(within),
        "peak_at_epochs": _epochs_trained(run.results[int(np.argmax(within))]),
        "end": at(last),
        "best_val_loss": val_losses[best] if val_losses else None,
        "best_val_loss_epochs": best + 1 if val_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"])
    parser.add_argument(
        "--data-dir", default=None, help="torchvision's download folder for mnist/fashion-mnist/cifar10"
    )
    parser.add_argument("--max-examples", type=int, default=None, help="random subset of the data set")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/reproduction")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    runs = [(lr, train_one(args, lr)) for lr in args.lrs]
    report = write_report([args.out], Path(args.out) / "report", epochs=[0, 1, 5, args.epochs])
    summary = [summarise(run_dir, lr) for lr, run_dir in runs]
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))

    columns = ["lr", "within@0", "between@0", "peak within", "within@end", "between@end", "best val (ep)"]
    columns += ["xi in@0", "xi in@end"] + [f"xi {layer}@end" for layer in HIDDEN_LAYERS]
    print("  ".join(f"{c:>13}" for c in columns))
    for row in summary:
        s, e = row["start"], row["end"]
        cells = [f"{row['lr']:g}", f"{s['within_train']:.3f}", f"{s['between_train']:.3f}"]
        cells += [f"{row['peak_within_train']:.3f}", f"{e['within_train']:.3f}", f"{e['between_train']:.3f}"]
        cells += [f"{row['best_val_loss']:.3f} ({row['best_val_loss_epochs']})", f"{s['xi_input']:.3f}"]
        cells += [f"{e['xi_input']:.3f}"] + [f"{e['xi_' + layer]:.3f}" for layer in HIDDEN_LAYERS]
        print("  ".join(f"{c:>13}" for c in cells))
    print(f"\nreport: {report}\nsummary: {Path(args.out) / 'summary.json'}")


if __name__ == "__main__":
    main()
