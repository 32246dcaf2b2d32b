"""onnxmerge: merge well-trained ONNX networks into one multi-task model."""

__version__ = "0.1.0"
