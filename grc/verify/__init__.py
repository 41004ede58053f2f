"""The comparator room: how a backend's scores are judged against the PyTorch oracle. compare.py: one comparator
(max_abs / max_rel against a Tolerance) used by verify, the engine and aoti parity checks; ranking.py: what a
ranking team reads (top-k overlap, Kendall's tau) of held-out users. The verify stage (grc/stages/verify.py) and
the parity checks call these; nothing here runs a backend."""
