"""Graph surgery: onnx-graphsurgeon passes that fuse the exported graph for engines."""
