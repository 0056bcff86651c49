"""Dinomaly, Dinomaly2 and CRR: multi-class industrial anomaly detection by feature reconstruction.

    from dinomaly import Detector
    detector = Detector("saved_results/<run>")
    r = detector("part.png")                 # r.score, r.is_anomalous, r.anomaly_map, r.mask, r.class_name

Importing the package is light: PyTorch loads when a Detector opens a checkpoint, never for an exported model
(.onnx, .xml: docs/deployment.md, "Without PyTorch").
"""
__version__ = "1.0.0"
__all__ = ["Detector"]


def __getattr__(name: str):
    if name == "Detector":
        from .predict import Detector
        return Detector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
