"""Package names that load their module on first use (PEP 562 `__getattr__`).

Why: Ray imports a package in every process that unpickles something defined in it, and
some of those processes (an actor that only holds a list, the Ray Train controller, a GPU box
without Ray) need one light module of the package, not the torch / transformers stack that
its other modules pull in.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package`: name -> the attribute of the module `exports` names."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
