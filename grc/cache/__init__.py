"""The content-addressed build cache: keys per task, a local store, an HTTP remote store."""
