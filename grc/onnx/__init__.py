"""The ONNX side of a build: exporting the dense model (export.py; stages/export.py is its thin stage) and the
graph surgery passes that fuse it for engines (surgery/; stages/surgery.py), and the onnxruntime session that
runs a surgeried graph with grc's custom op (ort.py: verify, engine parity, the Triton onnx model)."""
