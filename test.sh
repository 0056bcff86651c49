#!/usr/bin/env bash
# The test suite, CPU only: creates or reuses .venv, installs requirements.txt,
# requirements-export.txt and requirements-serve.txt (setup_env.sh), runs pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python -m pytest -q tests "$@"
