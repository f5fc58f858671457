"""Hand-off: adapters, merged models and ONNX models for use outside ortlora."""
