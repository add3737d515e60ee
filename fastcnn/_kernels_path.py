"""Make ``fastcnn.kernels`` importable from a source checkout.

Installed, the top-level ``kernels/`` folder of the repository *is* the subpackage
``fastcnn/kernels`` (see ``package-dir`` in pyproject.toml). In a checkout, where
``fastcnn/`` and ``kernels/`` are siblings, this registers the sibling under the same name,
so ``python -m fastcnn`` and the tests behave the same before and after ``pip install``.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def register(package_dir: str) -> None:
    name = "fastcnn.kernels"
    if name in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    source = os.path.join(os.path.dirname(package_dir), "kernels")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"fastcnn: the kernels package was not found at {source}")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[source])
    if spec is None or spec.loader is None:  # pragma: no cover - a file location always has both
        raise ImportError(f"fastcnn: cannot import the kernels package at {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
