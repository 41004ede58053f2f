"""Serving a built model: common/ (what both servers share), triton/ (Triton bundle, python-backend models, server
process), and the vLLM bundle's plugin, venv and model (vllm_plugin/, vllm_env.py, vllm_model.py)."""
