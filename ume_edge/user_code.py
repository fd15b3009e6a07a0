"""A user's own Python file, loaded as a module: ``build --model file.py:factory`` and ``--preprocess
MODALITY=file.py:function`` name one. Loading a file runs it; the user names it on the command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_file(path: Path, module_name: str) -> ModuleType:
    """The module that ``path`` defines, imported as ``module_name``; ``FileNotFoundError`` or ``ImportError`` with
    the path when it cannot be."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
