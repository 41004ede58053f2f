"""AOTInductor engines: the dense jagged model, exported with the HSTU ops as ``torch.ops.grc.*``
custom ops (Triton kernels on CUDA, the PyTorch reference elsewhere) and compiled ahead of time by
AOTInductor into one ``.pt2`` package per target.

- ``model``: the export entry point (``JaggedDense``) and ``export_program``.
- ``build``: compile a package, check parity against the float64 PyTorch reference, metadata.
- ``runtime``: load a package (registers the ops first), CUDA-graph replay per input shape.
- ``inputs``: random valid jagged requests (parity checks, benchmarks).

Nothing here is imported by a stage declaration: torch loads only when a stage runs.
"""
