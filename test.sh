#!/usr/bin/env bash
# The test suite, CPU only: creates or reuses .venv, installs requirements.txt and requirements-export.txt, runs pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python -m pytest -q tests "$@"
