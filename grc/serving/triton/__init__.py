"""Triton: the bundle writer (bundle.py, model_config.py, history_bundle.py), the python-backend models it serves
(models/), the server process (server.py), and the client side that checks and loads a served bundle (check.py,
load.py)."""
