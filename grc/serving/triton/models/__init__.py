"""The python-backend models of the triton bundle. Each generated ``model.py`` is a one-line shim
(``from grc.serving.triton.models.<step> import TritonPythonModel``), so grc must be installed in
the Python environment the server's python backend runs (``grc deploy`` arranges it; see
grc/serving/triton/server.py). Tensors cross the backend boundary through ``tensor_io`` (DLPack).
"""
