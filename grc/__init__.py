"""grc: a compiler for generative-recommendation models (HSTU / MTGR).

A YAML spec goes in; weights, ONNX, surgeried ONNX, engines and serving bundles come out,
each produced by one cached build stage (see ``grc.stages``).
"""

__version__ = "0.1.0"
