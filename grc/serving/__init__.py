"""Serving: run a real Triton Inference Server and write the model configs it reads."""
