"""Serving a built model: common/ (what both servers share), triton/ (Triton bundle, python-backend models, server
process), vllm/ (the vLLM venv, the model vLLM runs, the plugin registering it)."""
