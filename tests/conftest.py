"""Test-suite settings: StiffnessCallback in strict mode, so that a bug inside a probe fails the test that meets it
instead of becoming a warning while every probe is skipped."""

import os
import tempfile
from pathlib import Path

import pytest

from lightning_stiffness.exceptions import STRICT_ENV

# Set at import (before any callback is built) and inherited by the processes DDP tests start.
os.environ[STRICT_ENV] = "1"


@pytest.fixture
def system_temp(tmp_path, monkeypatch) -> Path:
    """A private system temp directory, so that `stiffness-images-*` left by this test (and by no other) show."""
    path = tmp_path / "systemp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path
