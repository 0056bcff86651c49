"""Run a trained model on new images (`python predict.py --help`; after pip install also `dinomaly-predict`)."""
from dinomaly.cli import predict_main

if __name__ == "__main__":
    predict_main()
