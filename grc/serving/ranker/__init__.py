"""The whole request path of a served GR model in one process: parse -> embedding lookup -> token
projector -> dense -> ranking (``Ranker``). Device-agnostic and free of Triton imports: the fused
Triton model (grc/serving/triton/models/fused.py) wraps it, benchmarks call it in-process."""
