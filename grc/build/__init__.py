"""The build graph: stages -> doit tasks, fingerprints, atomic outputs, the runner."""
