"""The offline report, end to end on tiny runs: runs of two learning rates and two seeds each (TensorBoard), one run
logged to TensorBoard, CSV, MLflow and W&B at once, and runs whose first logger is MLflow or W&B. The markdown and
the PNG files are read back: figures present and decodable, legends off the axes, intervals in the tables, the
run-settings table, the losses each logger holds, seeds aggregated with their t-intervals."""

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure
from PIL import Image

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.names import MODEL
from lightning_stiffness.report import ReportError, find_runs, load_run, load_runs, main, seed_groups, write_report
from lightning_stiffness.report import loggers as logger_files
from lightning_stiffness.report import runs as report_runs
from lightning_stiffness.report.loggers import LOGGERS
from lightning_stiffness.report.seeds import summarise, t_quantile
from tests.helpers import DigitsData, TinyNet, trainer

LRS, SEEDS = (0.02, 0.2), (0, 1)
INTERVAL = re.compile(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]")


class SeededNet(TinyNet):
    """TinyNet whose hyperparameters hold its seed, as examples/reproduce_paper.py's model does."""

    def __init__(self, lr: float = 0.05, seed: int = 0):
        super().__init__(lr=lr)
        self.save_hyperparameters()


def _callback(**kwargs):
    return StiffnessCallback(samples_per_class=2, layers=["net.1"], log_images=False, num_bootstrap=100, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for lr in LRS:
        for seed in SEEDS:
            seed_everything(seed)
            logger = TensorBoardLogger(root, name=f"lr={lr}", version=f"seed={seed}")
            fit = trainer(root, [_callback()], max_epochs=3, logger=logger)
            fit.fit(SeededNet(lr=lr, seed=seed), datamodule=DigitsData())
    return root


def _offline(monkeypatch, root: Path) -> None:
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 needs it for a local ./mlruns store


@pytest.fixture(scope="module")
def every_logger(tmp_path_factory):
    """One run logged to TensorBoard (first: the raw results), CSV, MLflow and W&B at once."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    root = tmp_path_factory.mktemp("every_logger")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, root)
        wandb_logger = WandbLogger(project="report", save_dir=str(root), offline=True)
        loggers = [
            TensorBoardLogger(root, name="tb", version=0),
            CSVLogger(root, name="csv", version=0),
            MLFlowLogger(experiment_name="report", tracking_uri=(root / "mlruns").as_uri()),
            wandb_logger,
        ]
        fit = trainer(root, [_callback()], max_epochs=2, logger=loggers)
        fit.fit(SeededNet(lr=0.1, seed=3), datamodule=DigitsData())
        wandb_logger.experiment.finish()
    return root


@pytest.fixture(scope="module")
def first_loggers(tmp_path_factory):
    """A run whose first (only) logger is MLflow, and one whose first logger is W&B: the raw results in their run
    directories (``mlruns/<experiment>/<run>/stiffness``, ``{save_dir}/{project}/{id}/stiffness``) and copies in
    the runs (``artifacts/stiffness``, ``files/stiffness``)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    root = tmp_path_factory.mktemp("first_loggers")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, root / "wandb_first")
        mlflow = MLFlowLogger(experiment_name="first", tracking_uri=(root / "mlflow_first" / "mlruns").as_uri())
        trainer(root, [_callback()], max_epochs=2, logger=mlflow).fit(SeededNet(lr=0.1), datamodule=DigitsData())
        wandb_logger = WandbLogger(project="first", save_dir=str(root / "wandb_first"), offline=True)
        fit = trainer(root, [_callback()], max_epochs=2, logger=wandb_logger)
        fit.fit(SeededNet(lr=0.1), datamodule=DigitsData())
        wandb_logger.experiment.finish()
    return root, mlflow.experiment_id, mlflow.run_id, wandb_logger.version


class _Saved:
    """Every figure the report saves: its axes, legends and texts, checked as it is saved."""

    def __init__(self, monkeypatch):
        self.figures: dict[str, Figure] = {}
        self.axes_count: dict[str, int] = {}
        self.texts: dict[str, list[str]] = {}
        original = Figure.savefig
        saved = self

        def savefig(figure, path, *args, **kwargs):
            original(figure, path, *args, **kwargs)  # drawn: the extents below are final
            name = Path(path).name
            saved.axes_count[name] = len(figure.axes)
            saved.texts[name] = [t.get_text() for axes in figure.axes for t in axes.texts]
            saved.texts[name] += [a.get_title() for a in figure.axes]
            renderer = figure.canvas.get_renderer()
            legends = list(figure.legends) + [a.get_legend() for a in figure.axes if a.get_legend()]
            for legend in legends:
                box = legend.get_window_extent(renderer)
                for axes in figure.axes:
                    if axes.get_label() == "<colorbar>":
                        continue
                    assert not box.overlaps(axes.get_window_extent(renderer)), f"{name}: a legend over the data"

        monkeypatch.setattr(Figure, "savefig", savefig)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("L"))
    assert min(pixels.shape) >= 300, path
    assert pixels.std() > 10, f"{path} looks blank"
    return pixels


def _t_cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    half = t_quantile(len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def test_report_for_several_runs(runs, tmp_path, monkeypatch):
    saved = _Saved(monkeypatch)
    assert len(find_runs([runs])) == 4
    out = tmp_path / "report"
    report = write_report([runs], out, epochs=["initialisation", 2, 10])
    assert report.name == "report.md"
    text = report.read_text()
    pictures = sorted(p.name for p in out.glob("*.png"))
    per_run = ["class_matrices", "distance", "stiffness", "xi"]
    expected = [f"run{i}_{part}.png" for i in range(4) for part in per_run]
    expected += [f"seeds{i}_{part}.png" for i in range(2) for part in ("stiffness", "xi")]
    assert pictures == sorted([*expected, "critical_distance_vs_lr.png"])
    for name in pictures:
        assert name in text
        _png(out / name)
    assert "Stiffness report (train-val; cosine)" in text  # train-val unless told otherwise
    assert "lr = 0.02, seed = 0" in text and "lr = 0.2, seed = 1" in text
    assert "ξ net.1" in text and "ξ bins input" in text and "least-squares line through all same-class" in text
    assert "no probe at epoch 10; the nearest one, at epoch 2, step 12, is drawn instead." in text
    assert "no probe at epoch 2" not in text
    # A stiffness panel per kind, each with the losses on a second axis; every legend lies off the axes (_Saved).
    assert saved.axes_count["run0_stiffness.png"] == 2 * 2
    assert any("within 0." in title for title in saved.texts["run0_class_matrices.png"])
    assert any("ξ = " in t for t in saved.texts["run0_distance.png"])
    _check_markdown(runs, text)


def test_html_report(runs, tmp_path):
    report = write_report([runs / "lr=0.2"], tmp_path / "report", fmt="html")  # two seeds of one learning rate
    text = report.read_text()
    assert report.name == "report.html" and text.startswith("<!doctype html>")
    pictures = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pictures) == 2 * 4 + 2 and "critical_distance_vs_lr.png" not in pictures  # one learning rate
    for name in pictures:
        assert f"<img src='{name}'" in text
    assert "<td>initialisation</td>" in text and "<th>examples per class</th>" in text
    assert len(INTERVAL.findall(text)) > 20


def _check_markdown(root: Path, text: str) -> None:
    # Tables with intervals: the bootstrap ones of every probe, the t-intervals over seeds.
    assert len(INTERVAL.findall(text)) > 40
    assert "| initialisation | 0 | " in text
    # The settings table: a row per run, from the hparams and the results.
    assert "| run | model | examples per class | epochs | seed | lr | kinds | probes | intervals |" in text
    assert "| run0 | – | train 2, val 2 | 3 | 0 | 0.02 | cosine, sign | 4 (steps 0–12) | 95% bootstrap |" in text
    # Seeds aggregated: the mean over both seeds of within-class stiffness at the last probe, with its t-interval.
    runs = load_runs([root])
    for lr in LRS:
        assert f"Seeds aggregated — lr = {lr}: 2 seeds (seed 0, 1)" in text
        same = [run for run in runs if run.hparams["lr"] == lr]
        within = [run.results[-1].classes["train-val"]["cosine"][MODEL].within for run in same]
        xi = [run.results[-1].spaces["train-val"]["input"].critical_distance for run in same]
        assert f"| 12 | 2 | {_t_cell(within)} |" in text
        assert _t_cell(xi) in text
        assert f"| {lr:g} | 2 | {_t_cell(within)} |" in text  # the table against the learning rate
    assert "95% Student-t interval" in text
    # Notes: a measure at 1 at every probe is saturated, an extrapolated ξ is said to be.
    saturated = [
        f"run{index}"
        for index, run in enumerate(runs)
        if all(r.classes["train-val"]["sign"][MODEL].within >= 0.995 for r in run.results)
    ]
    note = "Saturated: sign within-class stiffness (train-val) is 1.00 at every probe of "
    assert (note + ", ".join(saturated) + " (every same-class gradient pair agrees in sign)" in text) == bool(saturated)
    # ...in one line of totals over the runs (each run's table marks its probes)
    flagged = [sum(bool(r.spaces["train-val"]["input"].extrapolated) for r in run.results) for run in runs]
    with_one = sum(map(bool, flagged))
    note = f"input space (train-val) at {sum(flagged)} of {4 * len(runs)} probes in {with_one} of {len(runs)} runs"
    assert (note in text) == (sum(flagged) > 0)
    assert ("ξ extrapolated (the line through the same-class pairs" in text) == ("(extrapolated)" in text)


def test_seed_groups(runs):
    loaded = load_runs([runs])
    groups = seed_groups(loaded)
    assert [sorted(g.seeds) for g in groups] == [[0, 1], [0, 1]]
    assert [g.hparams["lr"] for g in groups] == list(LRS)
    assert groups[0].steps == [0, 4, 8, 12]
    assert [len(g.runs) for g in seed_groups(loaded, seed_key="lr")] == [2, 2]  # grouped by seed instead
    assert [len(g.runs) for g in seed_groups(loaded, seed_key="absent")] == [1, 1, 1, 1]
    for run in loaded[1:]:
        run.hparams["seed"] = 0  # one seed twice: not aggregated together
    assert [len(g.runs) for g in seed_groups(loaded)] == [1, 1, 1, 1]


def test_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 10, 29, 30, 31, 60, 1000):
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4)
    summary = summarise([1.0, 2.0, 3.0, math.nan])
    assert summary.n == 3 and summary.mean == 2.0
    assert summary.high - 2.0 == pytest.approx(scipy_stats.t.ppf(0.975, 2) / math.sqrt(3), abs=1e-3)
    assert math.isnan(summarise([1.0]).low) and summarise([]).n == 0


def test_losses_and_hparams_from_every_logger(every_logger, tmp_path, monkeypatch):
    saved = _Saved(monkeypatch)
    (run,) = load_runs([every_logger])  # the copies in the MLflow and W&B runs are this run, not others
    assert run.path == every_logger / "tb" / "version_0"
    assert [files.logger for files in run.loggers] == list(LOGGERS)
    reference = run.losses_of("TensorBoard")
    assert set(reference) == {"train_loss", "val_loss"} and len(reference["train_loss"]) == 2
    for logger in LOGGERS:
        losses = run.losses_of(logger)
        assert set(losses) == set(reference), logger
        for tag, points in losses.items():
            assert [s for s, _ in points] == [s for s, _ in reference[tag]], (logger, tag)
            assert [v for _, v in points] == pytest.approx([v for _, v in reference[tag]], rel=1e-6), (logger, tag)
    for files in run.loggers:
        assert files.hparams["lr"] == 0.1 and files.hparams["seed"] == 3, files.logger
        assert not files.note, files.logger
    assert run.hparams == {"dropout": 0.0, "lr": 0.1, "nan_after_epoch": None, "seed": 3}
    text = write_report([every_logger], tmp_path / "report").read_text()
    assert "| TensorBoard, CSV, MLflow, W&B |" in text
    assert len(list((tmp_path / "report").glob("*.png"))) == 4  # one run
    assert saved.axes_count["run0_stiffness.png"] == 2 * 2


def test_runs_whose_first_logger_is_mlflow_or_wandb(first_loggers, tmp_path):
    root, experiment, mlflow_run, wandb_id = first_loggers
    mlflow_dir = root / "mlflow_first" / "mlruns" / experiment / mlflow_run
    assert (mlflow_dir / "stiffness").is_dir() and (mlflow_dir / "artifacts" / "stiffness").is_dir()
    wandb_dir = root / "wandb_first" / "first" / wandb_id
    assert sorted(find_runs([root])) == sorted([mlflow_dir, wandb_dir])
    for run in load_runs([root]):
        (files,) = run.loggers
        assert files.logger == ("MLflow" if run.path == mlflow_dir else "W&B")
        assert set(run.losses) == {"train_loss", "val_loss"} and run.hparams["lr"] == 0.1
    # Given alone, the MLflow store and the W&B folder are read as the runs they hold (raw results from the copies).
    (only,) = load_runs([root / "mlflow_first" / "mlruns"])
    assert only.path == mlflow_dir and len(only.results) == 3
    (wandb_copy,) = load_runs([root / "wandb_first" / "wandb"])
    assert wandb_copy.path.name.startswith("offline-run-") and set(wandb_copy.losses) == {"train_loss", "val_loss"}
    assert load_run(mlflow_dir).losses.keys() == {"train_loss", "val_loss"}
    text = write_report([root], tmp_path / "report").read_text()
    assert "| MLflow |" in text and "| W&B |" in text


def test_mlflow_file_layout_without_mlflow(every_logger, monkeypatch):
    (run,) = load_runs([every_logger])
    with_mlflow = run.losses_of("MLflow")
    monkeypatch.setitem(sys.modules, "mlflow.store.tracking.file_store", None)  # as if MLflow were not installed
    (run,) = load_runs([every_logger])
    assert run.losses_of("MLflow") == with_mlflow
    (files,) = [f for f in run.loggers if f.logger == "MLflow"]
    assert files.hparams["lr"] == 0.1 and "MLflow is not installed" in files.note


def test_wandb_without_a_log_reader(every_logger, tmp_path, monkeypatch):
    """Where wandb has no reader of its ``.wandb`` log, the files a synced run has are read, and the report says so."""
    monkeypatch.setattr(logger_files, "_wandb_records", lambda log: None)
    (wandb_run,) = (every_logger / "wandb").glob("offline-run-*")
    files = wandb_run / "files"
    (files / "config.yaml").write_text("_wandb:\n  value: {}\nlr:\n  value: 0.1\nseed:\n  value: 3\n")
    (files / "wandb-summary.json").write_text('{"train_loss": 2.25, "trainer/global_step": 7, "_step": 9}')
    try:
        (run,) = load_runs([every_logger])
        assert run.losses_of("W&B") == {"train_loss": [(7, 2.25)]}
        (wandb,) = [f for f in run.loggers if f.logger == "W&B"]
        assert wandb.hparams == {"lr": 0.1, "seed": 3}
        text = write_report([every_logger], tmp_path / "report").read_text()
        assert "W&B history not read" in text
    finally:
        (files / "config.yaml").unlink()
        (files / "wandb-summary.json").unlink()


def test_console_command(runs, tmp_path, capsys):
    one = runs / "lr=0.02" / "seed=0"
    assert main(["report", str(one), "-o", str(tmp_path / "one"), "--pair", "val-val"]) == 0
    assert "report written to" in capsys.readouterr().out
    text = (tmp_path / "one" / "report.md").read_text()
    assert "Stiffness report (val-val; cosine)" in text and "Seeds aggregated" not in text
    assert not (tmp_path / "one" / "critical_distance_vs_lr.png").exists()  # one run: no learning-rate plot


def test_csv_logger_runs_are_read(tmp_path, monkeypatch):
    _Saved(monkeypatch)
    callback = StiffnessCallback(samples_per_class=2, log_images=False, kinds=["sign"])
    fit = trainer(tmp_path, [callback], max_epochs=2, logger=CSVLogger(tmp_path), limit_val_batches=0)
    fit.fit(TinyNet(), datamodule=DigitsData())
    (run,) = find_runs([tmp_path])
    loaded = load_run(run)
    assert {"train_loss"} <= set(loaded.losses) and len(loaded.losses["train_loss"]) == 2
    assert loaded.losses == loaded.losses_of("CSV")
    assert loaded.steps == [0, 4, 8]
    # No validation set: the train-train pair and the sign kind are shown, each with a note saying so.
    text = write_report([tmp_path], tmp_path / "report").read_text()
    assert "has no train-val pair: its train-train pair is shown instead." in text
    assert "has no cosine kind: its sign kind is shown instead." in text
    with pytest.raises(ReportError, match="has no 'cosine' stiffness; it has \\['sign'\\]"):
        write_report([tmp_path], tmp_path / "report", kind="cosine")
    with pytest.raises(ReportError, match="has no 'val-val' results; it has \\['train-train'\\]"):
        write_report([tmp_path], tmp_path / "report", kind="sign", pair="val-val")
    with pytest.raises(ReportError, match="`fmt` must be 'md' or 'html'"):
        write_report([tmp_path], tmp_path / "report", kind="sign", fmt="pdf")


def test_no_loss_axis_without_losses(runs, tmp_path, monkeypatch):
    saved = _Saved(monkeypatch)
    one = runs / "lr=0.2" / "seed=1"
    monkeypatch.setattr(report_runs, "find_logger_dirs", lambda root: [])  # no logger's files: no losses
    write_report([one], tmp_path / "report")
    assert saved.axes_count["run0_stiffness.png"] == 2  # a panel per kind, no empty second axis
    assert saved.axes_count["run0_xi.png"] == 1


def test_epochs_argument(runs, tmp_path, capsys):
    out = tmp_path / "init"
    assert main(["report", str(runs / "lr=0.02"), "-o", str(out), "--epochs", "init", "1"]) == 0
    assert "no probe at" not in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["report", str(runs), "--epochs", "1.5"])
    assert "expected an epoch number or 'initialisation'" in capsys.readouterr().err


def test_directory_without_results_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no saved stiffness results under"):
        find_runs([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no saved stiffness results" in capsys.readouterr().err
    with pytest.raises(ReportError, match="does not exist"):
        find_runs([tmp_path / "missing"])


@pytest.mark.parametrize(
    ("epochs", "match"),
    [(["2"], "`epochs` must hold epoch numbers or 'initialisation', got '2'"), ([], "`epochs` is empty")],
)
def test_epochs_are_checked_before_the_runs_are_read(tmp_path, epochs, match):
    # Text other than "initialisation" used to fail choosing the probes (int - str); no epoch at all, drawing them.
    with pytest.raises(ReportError, match=match):
        write_report([tmp_path / "no runs here"], tmp_path / "report", epochs=epochs)
