"""Former home of ``Sequential`` and ``from_config``, kept so that old imports still work:
the containers live in fastcnn/containers.py, the registry in fastcnn/module.py."""

from __future__ import annotations

from ._types import Config, Rng
from .containers import Sequential
from .module import Module, module_from_config

__all__ = ["Sequential", "from_config"]


def from_config(config: Config, rng: Rng = None) -> Module:
    """Rebuild a module tree from ``get_config()`` output (fresh parameters drawn from ``rng``,
    a Generator or seed; load weights with ``load_state_dict``)."""
    return module_from_config(config, rng=rng)
