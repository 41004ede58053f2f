"""What both servers (Triton and vLLM) use: the request schema and its checks (request.py, validate.py), the PyTorch
reference a served answer is checked against (reference.py), the closed load loop (loop.py), local ports, HTTP
probes, process groups and detached-server records (process.py), bundle file placement (files.py), the
user-history K/V store under a byte budget (history_cache.py)."""
