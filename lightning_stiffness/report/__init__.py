"""Offline report from the raw results runs saved: ``lightning-stiffness report RUN_DIR [RUN_DIR ...]``.

A run directory is a logger's directory (``lightning_logs/version_0``) holding ``stiffness/epoch=E-step=S.pt`` files
(``StiffnessCallback(save_raw=True)``, the default), or any folder above such directories: every run found under the
given paths is reported. The report is a directory with ``report.md`` (or ``report.html``) and PNG figures:

- class stiffness matrices of chosen probes, side by side;
- within/between-class stiffness against the global step, with the run's train/validation loss (from its
  TensorBoard event files or ``metrics.csv``), the stretch where validation loss rises above its minimum shaded;
- the critical distance xi against the global step, in input space and in each recorded layer;
- with several runs, xi at the last probe against each run's learning rate (from ``hparams.yaml``).

Probes are named as everywhere in this package (:func:`~lightning_stiffness.names.probe_label`): "initialisation"
for the probe before the first optimiser step, otherwise Lightning's 0-based epoch and the global step
("epoch 2, step 120"); ``--epochs 0 2`` picks the probes at the end of epochs 0 and 2, ``--epochs initialisation``
the first one. When a run has no probe in an epoch asked for, the report draws the nearest one and says so.

The package: :mod:`.runs` (finding and reading runs), :mod:`.figures`, :mod:`.document` (:func:`write_report`) and
:mod:`.command` (:func:`main`, the console command ``lightning-stiffness``).
"""

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.report.command import main
from lightning_stiffness.report.document import write_report
from lightning_stiffness.report.runs import Run, find_runs, load_run

__all__ = ["ReportError", "Run", "find_runs", "load_run", "main", "write_report"]
