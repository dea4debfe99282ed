"""embedkit: verified ONNX Runtime artifacts for sentence-transformers models."""

__version__ = "0.1.0"
