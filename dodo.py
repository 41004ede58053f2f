"""Plain doit entry point: the same tasks ``grc build`` runs, with the same state database.

doit -f dodo.py spec=specs/hstu-tiny.yaml            # build
doit -f dodo.py spec=specs/hstu-tiny.yaml list       # the tasks
doit -f dodo.py spec=specs/hstu-tiny.yaml info verify
"""

from __future__ import annotations

import sys
from pathlib import Path

from doit import get_var

from grc.build.graph import task_dicts as stage_tasks
from grc.build.runner import DB_NAME
from grc.errors import SpecError
from grc.spec.loader import load_spec

try:
    LOADED = load_spec(get_var("spec", "specs/hstu-tiny.yaml"))
except SpecError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
ROOT = Path(get_var("artifacts", "artifacts")) / LOADED.spec.name
ROOT.mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {"dep_file": str(ROOT / DB_NAME), "backend": "sqlite3", "verbosity": 2}


def task_grc():  # type: ignore[no-untyped-def]
    """grc stages of the selected spec (each task's basename is the stage name)."""
    yield from stage_tasks(LOADED, ROOT)
