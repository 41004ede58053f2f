"""Runtimes that execute grc artifacts: onnxruntime (CPU) with grc's custom ops."""
