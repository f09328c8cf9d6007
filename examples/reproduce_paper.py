"""Reproduce the stiffness findings of Fort et al. (arXiv 1901.09491) on bundled digits, then write the report.

Trains the paper's fully connected net (hidden 500-300-100, ReLU) with Adam at several learning rates spanning two
decades, each with several seeds, probing stiffness on a schedule that is dense early and sparse late, in input space
and in the representation of each hidden layer. Then runs ``lightning-stiffness report`` over all runs (which
aggregates the seeds of each learning rate) and prints each measure's mean over seeds with its 95% interval.

    python examples/reproduce_paper.py                       # digits, 5 learning rates x 3 seeds
    python examples/reproduce_paper.py --seeds 0 1 2 3 4 --lrs 1e-4 1e-3 1e-2
    python examples/reproduce_paper.py --dataset mnist --data-dir ~/data --max-examples 12000

What was found, and how long it took, is written up in examples/REPRODUCTION.md.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsDataModule, PaperNet

from lightning_stiffness import StiffnessCallback, StiffnessResult
from lightning_stiffness.names import INITIALISATION, MODEL
from lightning_stiffness.report import load_run, write_report

#: The hidden layers' ReLU outputs in PaperNet's fully connected net (Flatten, then Linear/ReLU pairs).
HIDDEN_LAYERS = ["net.2", "net.4", "net.6"]


def probe_schedule(max_epochs: int) -> list[int]:
    """Epochs (0-based) at whose end to probe: every epoch at first, then geometrically sparser, and the last one."""
    points = np.unique(np.round(np.geomspace(1, max_epochs, num=10)).astype(int) - 1)
    return sorted({int(p) for p in points} | {0, 1, 2, max_epochs - 1})


def report_epochs(max_epochs: int) -> list[int | str]:
    """The probes the report's class matrices show: before training, after 1 and 5 epochs, and after the last.

    The report takes Lightning's 0-based epochs (a probe at the end of epoch ``e`` follows ``e + 1`` epochs of
    training), and ``"initialisation"`` for the probe before any training step.
    """
    return [INITIALISATION, *sorted({e for e in (0, 4, max_epochs - 1) if 0 <= e < max_epochs})]


def train_one(args: argparse.Namespace, lr: float, seed: int) -> Path:
    """Train one run; returns its log directory ``{out}/lr={lr}/seed={seed}``, its hparams holding lr and seed."""
    seed_everything(seed, workers=True)
    data = DigitsDataModule(
        dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, max_examples=args.max_examples
    )
    model = PaperNet(arch="fc", optimizer="adam", lr=lr, input_shape=data.input_shape, num_classes=data.num_classes)
    callback = StiffnessCallback(
        samples_per_class=args.samples_per_class,
        epochs=probe_schedule(args.epochs),
        layers=HIDDEN_LAYERS,
        per_layer=True,
        log_images=False,  # the report draws the figures; per-probe images would only slow 15 runs down
        seed=seed,
    )
    logger = TensorBoardLogger(args.out, name=f"lr={lr:g}", version=f"seed={seed}", default_hp_metric=False)
    # The seed is not an argument of the model, so Lightning would not log it; the report groups runs by every
    # hyperparameter but this one and aggregates over it.
    logger.log_hyperparams({"seed": seed})
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


def summarise(run_dir: Path, lr: float, seed: int) -> dict:
    """One run's numbers: stiffness and ξ at the first and last probe, the peak of within-class stiffness, losses."""
    run = load_run(run_dir)
    first, last = run.results[0], run.results[-1]
    within = [r.classes["train-train"]["cosine"][MODEL].within for r in run.results]
    val_losses = [v for _, v in run.losses.get("val_loss", [])]
    best = int(np.argmin(val_losses)) if val_losses else -1

    def at(result: StiffnessResult) -> dict:
        classes = {pair: {kind: m[MODEL] for kind, m in by_kind.items()} for pair, by_kind in result.classes.items()}
        values = {
            "within_train": classes["train-train"]["cosine"].within,
            "between_train": classes["train-train"]["cosine"].between,
            "within_val": classes["val-val"]["cosine"].within,
            "between_val": classes["val-val"]["cosine"].between,
            "within_train_val": classes["train-val"]["cosine"].within,
            "between_train_val": classes["train-val"]["cosine"].between,
            "sign_within_train_val": classes["train-val"]["sign"].within,
        }
        for space, measures in result.spaces["train-train"].items():
            values[f"xi_{space}"] = measures.critical_distance  # xi_input, then each layer's
        return values

    return {
        "lr": lr,
        "seed": seed,
        "run_dir": str(run_dir),
        "epochs_at_end": _epochs_trained(last),
        "start": at(first),
        "peak_within_train": max(within),
        "peak_at_epochs": _epochs_trained(run.results[int(np.argmax(within))]),
        "end": at(last),
        "best_val_loss": val_losses[best] if val_losses else float("nan"),
        "best_val_loss_epochs": best + 1 if val_losses else float("nan"),
        "final_val_loss": val_losses[-1] if val_losses else float("nan"),
    }


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``values`` over seeds and its Student-t confidence interval (``low == high == mean`` for one seed).

    With 3 seeds the t quantile is 4.30, so the interval is wide: it says how far the mean of a new set of seeds
    could move, which is what a verdict across learning rates has to beat.
    """
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(x.mean())
    if x.size == 1 or float(x.std()) == 0.0:
        return {"mean": mean, "low": mean, "high": mean, "n": int(x.size)}
    low, high = stats.t.interval(confidence, df=x.size - 1, loc=mean, scale=stats.sem(x))
    return {"mean": mean, "low": float(low), "high": float(high), "n": int(x.size)}


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Per learning rate, each number of :func:`summarise` as its mean over seeds with a 95% interval."""
    out = []
    for lr in sorted({row["lr"] for row in rows}):
        same = [row for row in rows if row["lr"] == lr]
        entry: dict = {"lr": lr, "seeds": [row["seed"] for row in same]}
        for key in ("peak_within_train", "peak_at_epochs", "best_val_loss", "best_val_loss_epochs", "final_val_loss"):
            entry[key] = mean_interval([row[key] for row in same])
        for when in ("start", "end"):
            entry[when] = {k: mean_interval([row[when][k] for row in same]) for k in same[0][when]}
        out.append(entry)
    return out


def _cell(stat: dict) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"
    return f"{stat['mean']:.3f}"


def summary_table(aggregated: Sequence[dict]) -> str:
    """A markdown table of the aggregated numbers: mean over seeds [95% interval]."""
    columns = ["lr", "within at 0", "peak within", "within at end", "between at end", "best val loss"]
    columns += ["ξ input at 0", "ξ input at end"] + [f"ξ `{layer}` at end" for layer in HIDDEN_LAYERS]
    lines = ["| " + " | ".join(columns) + " |", "|" + " ---: |" * len(columns)]
    for row in aggregated:
        s, e = row["start"], row["end"]
        cells = [f"{row['lr']:g}", _cell(s["within_train"]), _cell(row["peak_within_train"])]
        cells += [_cell(e["within_train"]), _cell(e["between_train"]), _cell(row["best_val_loss"])]
        cells += [_cell(s["xi_input"]), _cell(e["xi_input"])] + [_cell(e[f"xi_{layer}"]) for layer in HIDDEN_LAYERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"])
    parser.add_argument(
        "--data-dir", default=None, help="torchvision's download folder for mnist/fashion-mnist/cifar10"
    )
    parser.add_argument("--max-examples", type=int, default=None, help="random subset of the data set")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per learning rate")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--out", default="runs/reproduction")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    rows = [summarise(train_one(args, lr, seed), lr, seed) for lr in args.lrs for seed in args.seeds]
    aggregated = aggregate(rows)
    out = Path(args.out)
    report = write_report([out], out / "report", epochs=report_epochs(args.epochs))
    seconds = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps({"seconds": seconds, "runs": rows, "by_lr": aggregated}, indent=2))
    table = summary_table(aggregated)
    (out / "summary.md").write_text(table + "\n")
    print(f"{len(rows)} runs ({len(args.lrs)} learning rates x {len(args.seeds)} seeds) in {seconds / 60:.1f} min")
    print("mean over seeds [95% t-interval]; stiffness is cosine, train-train; ξ from same-class pairs\n")
    print(table)
    print(f"\nreport: {report}\nsummary: {out / 'summary.json'}, {out / 'summary.md'}")
    return report


if __name__ == "__main__":
    main()
