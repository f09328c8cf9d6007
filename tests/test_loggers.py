"""Images reach W&B (offline) and MLflow (a local file store) through their own APIs; the files are checked on disk.
Two callbacks with their own prefixes log to W&B, MLflow, CSV and TensorBoard at once, and a logger whose image store
raises costs the other loggers none of their images."""

import warnings
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.names import KINDS, PAIRS, class_matrix_tag, distance_curve_tag
from tests.helpers import (
    DigitsData,
    TinyNet,
    _callback,
    _image_steps,
    _stiffness_warnings,
    trainer,
    workers,
    workers_left,
)

TAG = class_matrix_tag("train-val", "cosine")
IMAGES_PER_PROBE = len(PAIRS) * len(KINDS) + len(PAIRS)  # class matrices and distance curves


def test_wandb_offline_gets_every_probes_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    logger = WandbLogger(project="stiffness-test", save_dir=str(tmp_path), offline=True)
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1, logger=logger)
    fit.fit(TinyNet(), datamodule=DigitsData())
    logger.experiment.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = sorted((run / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2 * IMAGES_PER_PROBE  # the probes at initialisation and after epoch 0
    assert any("train-val/cosine/class_matrix" in str(path) for path in media)


def test_mlflow_file_store_gets_every_probes_images(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 needs it for a local ./mlruns store
    logger = MLFlowLogger(experiment_name="stiffness", tracking_uri=(tmp_path / "mlruns").as_uri())
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1, logger=logger)
    fit.fit(TinyNet(), datamodule=DigitsData())
    artifacts = tmp_path / "mlruns" / logger.experiment_id / logger.run_id / "artifacts"
    pictures = [p for p in artifacts.rglob("*.png") if "compressed" not in p.name]
    assert len(pictures) == 2 * IMAGES_PER_PROBE
    client = logger.experiment
    assert client.get_metric_history(logger.run_id, "stiffness/train-val/cosine/within_class")


def test_wandb_first_gives_each_run_its_own_directory(tmp_path, monkeypatch):
    """With W&B as the first logger, ``trainer.log_dir`` is W&B's ``save_dir``, shared by every run; raw results and
    PNG files go where ``ModelCheckpoint`` puts a run's checkpoints instead: ``{save_dir}/{project}/{run id}``."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    runs = []
    for _ in range(2):
        logger = WandbLogger(project="stiffness-test", save_dir=str(tmp_path), offline=True)
        loggers = [logger, CSVLogger(str(tmp_path / "csv"))]
        fit = trainer(
            tmp_path, [StiffnessCallback(samples_per_class=2, kinds=["cosine"])], max_epochs=1, logger=loggers
        )
        fit.fit(TinyNet(), datamodule=DigitsData())
        runs.append(tmp_path / "stiffness-test" / logger.version)
        logger.experiment.finish()
    assert runs[0] != runs[1]
    for run in runs:
        assert sorted(path.name for path in (run / "stiffness").glob("*.pt")) == [
            "epoch=0-step=0.pt",
            "epoch=0-step=4.pt",
        ]
        assert len(list(run.rglob("class_matrix/*.png"))) == 2 * len(PAIRS)  # CSV takes no images: PNG files


# ---------------------------------------------------------------------------- two prefixes, a logger that raises


def test_two_prefixes_in_wandb_mlflow_csv_and_tensorboard_at_once(tmp_path, system_temp, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    before = workers()
    wandb_logger = WandbLogger(project="review", save_dir=str(tmp_path), offline=True)
    mlflow_logger = MLFlowLogger(experiment_name="review", tracking_uri=(tmp_path / "mlruns").as_uri())
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    loggers = [tb, wandb_logger, mlflow_logger, CSVLogger(tmp_path, name="csv", version=0)]
    callbacks = [_callback(), _callback(kinds=["sign"], prefix="sign2", every_n_steps=3)]
    fit = trainer(tmp_path, callbacks, max_epochs=2, logger=loggers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    wandb_logger.experiment.finish()
    assert not _stiffness_warnings(caught)
    steps = {"stiffness": [0, 4, 8], "sign2": [0, 3, 6]}
    per_probe = 6  # three pairs: a class matrix and a distance curve each
    for prefix, probed in steps.items():
        kind = "cosine" if prefix == "stiffness" else "sign"
        assert _image_steps(tb.log_dir, class_matrix_tag("train-val", kind, prefix)) == probed
        assert _image_steps(tb.log_dir, distance_curve_tag("val-val", prefix=prefix)) == probed
        (run,) = (tmp_path / "wandb").glob("offline-run-*")
        media = list((run / "files" / "media" / "images" / prefix).rglob("*.png"))
        assert len(media) == per_probe * len(probed), prefix
        artifacts = tmp_path / "mlruns" / mlflow_logger.experiment_id / mlflow_logger.run_id / "artifacts" / "images"
        pictures = [p for p in artifacts.glob(f"{prefix}~*.png") if "compressed" not in p.name]
        assert len(pictures) == per_probe * len(probed), prefix
        # The raw results travel with the W&B and MLflow runs: the same files, by the same relative paths.
        names = {f"epoch={step // 5}-step={step}.pt" for step in probed}
        run_dir = tmp_path / "mlruns" / mlflow_logger.experiment_id / mlflow_logger.run_id
        for where in (run_dir / "artifacts" / prefix, run / "files" / prefix):
            assert {p.name for p in where.glob("*.pt")} == names, where
            for name in names:
                assert (where / name).read_bytes() == (Path(tb.log_dir) / prefix / name).read_bytes()
        for step in probed:  # the CSV logger's PNG files, beside the raw results (in trainer.log_dir)
            epoch = step // 5
            png = Path(fit.log_dir) / class_matrix_tag("val-val", kind, prefix) / f"epoch={epoch}-step={step}.png"
            with Image.open(png) as picture:
                assert picture.mode == "RGB"
    assert not workers_left(before)
    assert not list(system_temp.glob("stiffness-images-*"))


class _FileWriterWithoutImages:
    """A TensorBoard file writer whose image summaries fail (a full disk, a broken store): scalars go through."""

    def __init__(self, writer):
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def add_summary(self, summary, *args, **kwargs):
        if any(value.HasField("image") for value in summary.value):
            raise RuntimeError("image store down")
        return self._writer.add_summary(summary, *args, **kwargs)


class _Experiment:
    def __init__(self, writer):
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def _get_file_writer(self):
        return _FileWriterWithoutImages(self._writer._get_file_writer())


class _ImagesBrokenLogger(TensorBoardLogger):
    @property
    def experiment(self):
        return _Experiment(super().experiment)


def test_a_logger_that_raises_costs_the_other_loggers_nothing(tmp_path):
    broken = _ImagesBrokenLogger(tmp_path, name="broken", version=0)
    good = TensorBoardLogger(tmp_path, name="good", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    fit = trainer(tmp_path, [_callback()], max_epochs=1, logger=[broken, good, csv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 1  # training went on
    assert any("image store down" in message for message in _stiffness_warnings(caught))  # a warning instead
    assert _image_steps(good.log_dir) == [0, 4]  # the next TensorBoard logger still gets every probe's images
    assert sorted(p.name for p in (Path(fit.log_dir) / TAG).glob("*.png")) == [  # and the CSV logger its files
        "epoch=0-step=0.png",
        "epoch=0-step=4.png",
    ]
