"""The offline report, end to end on tiny runs: files exist, images decode, bad input is refused."""

import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.report import ReportError, find_runs, load_run, main, write_report
from tests.helpers import DigitsData, TinyNet, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for lr in (0.02, 0.2):
        callback = StiffnessCallback(samples_per_class=2, layers=["net.1"], log_images=False)
        trainer(root / f"lr={lr}", [callback], max_epochs=3).fit(TinyNet(lr=lr), datamodule=DigitsData())
    return root


def _decodes(path):
    with Image.open(path) as image:
        image.load()
        return min(image.size) >= 300


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_for_several_runs(runs, tmp_path, fmt):
    assert len(find_runs([runs])) == 2
    report = write_report([runs], tmp_path / "report", epochs=["initialisation", 2, 10], fmt=fmt)
    assert report.name == f"report.{fmt}"
    text = report.read_text()
    pictures = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert "critical_distance_vs_lr.png" in pictures
    assert len(pictures) == 2 * 3 + 1
    for name in pictures:
        assert name in text
        assert _decodes(tmp_path / "report" / name)
    assert "lr = 0.02" in text and "lr = 0.2" in text
    assert "ξ net.1" in text and "ξ bins input" in text and "least-squares line through all same-class" in text
    assert "| initialisation | 0 |" in text or "<td>initialisation</td>" in text
    # Epoch 10 was never probed (3 epochs): the report says which probe it drew instead.
    assert "no probe at epoch 10; the nearest one, at epoch 2, step 12, is drawn instead." in text
    assert "no probe at epoch 2" not in text


def test_console_command(runs, tmp_path, capsys):
    assert main(["report", str(runs / "lr=0.02"), "-o", str(tmp_path / "one"), "--pair", "val-val"]) == 0
    assert "report written to" in capsys.readouterr().out
    assert (tmp_path / "one" / "report.md").exists()
    assert not (tmp_path / "one" / "critical_distance_vs_lr.png").exists()  # one run: no learning-rate plot


def test_csv_logger_runs_are_read(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, log_images=False, kinds=["sign"])
    fit = trainer(tmp_path, [callback], max_epochs=2, logger=CSVLogger(tmp_path), limit_val_batches=0)
    fit.fit(TinyNet(), datamodule=DigitsData())
    (run,) = find_runs([tmp_path])
    loaded = load_run(run)
    assert {"train_loss"} <= set(loaded.losses) and len(loaded.losses["train_loss"]) == 2
    assert loaded.steps == [0, 4, 8]
    assert write_report([tmp_path], tmp_path / "report", kind="sign").exists()
    with pytest.raises(ReportError, match="has no 'cosine' stiffness; it has \\['sign'\\]"):
        write_report([tmp_path], tmp_path / "report", kind="cosine")
    with pytest.raises(ReportError, match="has no 'val-val' results; it has \\['train-train'\\]"):
        write_report([tmp_path], tmp_path / "report", kind="sign", pair="val-val")
    with pytest.raises(ReportError, match="`fmt` must be 'md' or 'html'"):
        write_report([tmp_path], tmp_path / "report", kind="sign", fmt="pdf")


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
