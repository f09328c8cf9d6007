# Shared by demo.sh and test.sh: a virtual environment in .venv with the project installed.
# torch==2.13.0 is installed first when torch is missing: a bare `torch` requirement would pull a large CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[$1]"
