#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite (and the linter).
source "$(dirname "$0")/_env.sh" test
ruff check lightning_stiffness tests examples benchmarks
python -m pytest "$@"
