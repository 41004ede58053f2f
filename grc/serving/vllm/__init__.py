"""The vLLM server's room: its dedicated venv (env.py), the model vLLM runs per step (model.py) and the plugin
that registers it (plugin/: the request token encoding, the HF config class, the package a bundle carries).

Kept free of imports: model.py and plugin/ run inside the vLLM venv, env.py in grc's own interpreter."""
