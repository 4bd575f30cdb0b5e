#!/usr/bin/env bash
# Build the documentation site with warnings as errors; the example gallery is rendered, not executed.
# Usage, from the repository root: PYTHONPATH=$PWD bash docs/build.sh [extra sphinx-build options]
set -euo pipefail
cd "$(dirname "$0")/.."
python docs/generate_benchmarks.py --check   # the benchmarks page must match benchmarks/results/*.json
exec python -m sphinx -W --keep-going -b html docs docs/_build/html "$@"
