"""The ONNX side of a build: exporting the dense model (export.py); stages/export.py is its thin stage."""
