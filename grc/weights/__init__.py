"""The weights room: the artifact every stage after ``weights`` reads (artifact.py: sharded safetensors + manifest,
written by seeded init or checkpoint import, read back as a model and its tables), the streaming safetensors
reader/writer under it (safetensors_io.py), and the fp32 reference a quantized build is judged against
(reference.py). The artifact's names are importable from here (``from grc.weights import open_tables``)."""

from grc.weights.artifact import (
    CODE_DTYPE,
    DENSE_VIEW,
    FLOAT_TABLES,
    INDEX,
    MANIFEST,
    import_checkpoint,
    load_model,
    locate_checkpoint,
    open_tables,
    read_manifest,
    slice_loader,
    table_entries,
    write_init,
)

__all__ = [
    "CODE_DTYPE",
    "DENSE_VIEW",
    "FLOAT_TABLES",
    "INDEX",
    "MANIFEST",
    "import_checkpoint",
    "load_model",
    "locate_checkpoint",
    "open_tables",
    "read_manifest",
    "slice_loader",
    "table_entries",
    "write_init",
]
