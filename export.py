"""Export a trained run to ONNX (`python export.py --help`; after pip install also `dinomaly-export`)."""
from dinomaly.cli import export_main

if __name__ == "__main__":
    export_main()
