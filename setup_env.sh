# Sourced by demo.sh and test.sh: create or reuse the project's virtual environment and install requirements.txt,
# requirements-export.txt (onnx, onnxruntime, openvino, nncf: export, exported models and their tests) and
# requirements-serve.txt (the service, TensorBoard, and their tests).
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-export.txt -r requirements-serve.txt
