"""The build side: torch, transformers and onnx. Runs once per model; the runtime never imports it."""
