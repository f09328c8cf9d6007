"""The console command ``lightning-stiffness report RUN_DIR [RUN_DIR ...]``, also ``python -m lightning_stiffness``."""

import argparse
import sys
from collections.abc import Sequence

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.names import (
    INITIALISATION,
    KINDS,
    PAIRS,
    PREFIX,
)
from lightning_stiffness.report.document import DEFAULT_PAIR, write_report


def _epoch_choice(text: str) -> int | str:
    if text in (INITIALISATION, "init"):
        return INITIALISATION
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or '{INITIALISATION}', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: the process's arguments); returns its exit status (2 on a
    :class:`~lightning_stiffness.exceptions.ReportError`)."""
    parser = argparse.ArgumentParser(prog="lightning-stiffness", description="Reports from saved stiffness results.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="write a report (Markdown or HTML with PNG figures) for runs")
    report.add_argument("runs", nargs="+", help="run directories (a logger's log_dir) or folders above them")
    report.add_argument("-o", "--out", default="stiffness-report", help="output directory (default: %(default)s)")
    report.add_argument(
        "--epochs",
        nargs="+",
        type=_epoch_choice,
        help="probes whose class matrices to show: Lightning's 0-based epochs (the probe at each one's end), or "
        f"'{INITIALISATION}'",
    )
    report.add_argument(
        "--pair",
        choices=list(PAIRS),
        help=f"probe pair shown (default: {DEFAULT_PAIR}, or the pair a run has, with a note)",
    )
    report.add_argument(
        "--kind", choices=list(KINDS), help="stiffness kind of the matrices and tables (default: cosine, else sign)"
    )
    report.add_argument("--format", default="md", choices=["md", "html"], help="report format (default: %(default)s)")
    report.add_argument("--lr-key", default="lr", help="hyperparameter of the learning rate (default: %(default)s)")
    report.add_argument(
        "--seed-key",
        default="seed",
        help="hyperparameter of the seed: runs sharing every other one are aggregated (default: %(default)s)",
    )
    report.add_argument("--prefix", default=PREFIX, help="the callback's `prefix` (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = write_report(
            args.runs,
            args.out,
            epochs=args.epochs,
            pair=args.pair,
            kind=args.kind,
            fmt=args.format,
            lr_key=args.lr_key,
            seed_key=args.seed_key,
            prefix=args.prefix,
        )
    except ReportError as err:
        print(f"lightning-stiffness report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
