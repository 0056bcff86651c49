# Sourced by demo.sh and test.sh: create or reuse the project's virtual environment and install requirements.txt
# and requirements-export.txt (onnx, onnxruntime: the ONNX export and its test).
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-export.txt
