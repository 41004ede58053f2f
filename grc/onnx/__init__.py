"""The ONNX side of a build: exporting the dense model (export.py; stages/export.py is its thin stage) and the
graph surgery passes that fuse it for engines (surgery/; stages/surgery.py)."""
