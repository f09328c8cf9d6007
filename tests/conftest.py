"""Test-suite settings: StiffnessCallback in strict mode, so that a bug inside a probe fails the test that meets it
instead of becoming a warning while every probe is skipped."""

import os

from lightning_stiffness.exceptions import STRICT_ENV

# Set at import (before any callback is built) and inherited by the processes DDP tests start.
os.environ[STRICT_ENV] = "1"
