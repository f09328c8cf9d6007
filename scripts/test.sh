#!/usr/bin/env bash
# Install the test dependencies and run the linter, the type checker and the whole test suite.
source "$(dirname "$0")/_env.sh" test
ruff check lightning_stiffness tests examples benchmarks
mypy
python -m pytest "$@"
