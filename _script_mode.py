"""For the files of this folder that also run as scripts (`python convert_checkpoint.py`, `python evaluate_calm.py`):
import the folder they are in as the package it is, so that their package imports work without an install."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def import_package(name: str = "calm_transformers") -> None:
    if name in sys.modules:
        return
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
