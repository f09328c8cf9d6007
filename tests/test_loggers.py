"""Images reach W&B (offline) and MLflow (a local file store) through their own APIs; the files are checked on disk."""

import pytest

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.names import KINDS, PAIRS
from tests.helpers import DigitsData, TinyNet, trainer

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
