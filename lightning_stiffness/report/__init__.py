"""Offline report from the raw results runs saved: ``lightning-stiffness report RUN_DIR [RUN_DIR ...]``.

A run directory is a logger's directory (``lightning_logs/version_0``) holding ``stiffness/epoch=E-step=S.pt`` files
(``StiffnessCallback(save_raw=True)``, the default), an MLflow or W&B run holding their copy, or any folder above
such directories: every run found under the given paths is reported, once however many copies its loggers keep. The
losses and hyperparameters come from every logger's files under those paths: TensorBoard, CSV, MLflow (a file store)
and W&B (offline runs), each read with its own reader (:mod:`.loggers`). The report is a directory with ``report.md``
(or ``report.html``) and PNG figures:

- a run-settings table (model class where the hyperparameters name it, examples per class, epochs, seed, learning
  rate, kinds, probes, loggers);
- notes: how ξ is fitted, fallbacks (a run without the pair asked for), saturated measures, extrapolated ξ;
- runs sharing every hyperparameter but the seed, aggregated: within/between and ξ over training as the mean over
  seeds with a 95% Student-t interval (:mod:`.seeds`);
- with several learning rates, ξ and within/between at the last probe against the learning rate, with error bars;
- per run: class stiffness matrices of chosen probes (within/between in their titles), stiffness against distance in
  input space and each recorded layer (same- and different-class curves, bands, the fitted line, ξ), within/between
  over training with the train and validation losses on a second axis, ξ over training, and a table of every probe
  with its 95% bootstrap intervals.

The pair shown is ``train-val`` by default (how a step on training examples moves validation examples, the paper's
generalisation view); a run without it shows the pair it has, with a note.

Probes are named as everywhere in this package (:func:`~lightning_stiffness.names.probe_label`): "initialisation"
for the probe before the first optimiser step, otherwise Lightning's 0-based epoch and the global step
("epoch 2, step 120"); ``--epochs 0 2`` picks the probes at the end of epochs 0 and 2, ``--epochs initialisation``
the first one. When a run has no probe in an epoch asked for, the report draws the nearest one and says so.

The package: :mod:`.runs` (finding and reading runs), :mod:`.loggers` (each logger's files), :mod:`.seeds`,
:mod:`.figures`, :mod:`.document` (:func:`write_report`) and :mod:`.command` (:func:`main`, the console command
``lightning-stiffness``).
"""

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.report.command import main
from lightning_stiffness.report.document import write_report
from lightning_stiffness.report.runs import Run, find_runs, load_run, load_runs
from lightning_stiffness.report.seeds import SeedGroup, seed_groups

__all__ = [
    "ReportError",
    "Run",
    "SeedGroup",
    "find_runs",
    "load_run",
    "load_runs",
    "main",
    "seed_groups",
    "write_report",
]
