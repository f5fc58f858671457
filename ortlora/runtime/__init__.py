"""The runtime side: trains from an artifact directory with onnxruntime and numpy. Never imports torch."""
