"""The caller's ``__main__`` inside a worker.

A task defined in the caller's script pickles as ``__main__.name``. In a worker, ``__main__``
must therefore be the caller's script, never offload's own code (whose names, such as
``encode``, would otherwise answer instead). ``install`` puts a stand-in module in
``sys.modules["__main__"]``: the first attribute asked of it loads the caller's script as
``__mp_main__`` (so its ``if __name__ == "__main__":`` block does not run), as multiprocessing
does, and from then on ``__main__`` is that module.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

#: True while the caller's script is being loaded here: a manager started now means the script
#: has no ``if __name__ == "__main__":`` guard (offload refuses, naming the guard).
loading = False

_where: tuple[str, str] | None = None  # ("path", file) or ("module", name)


class _StandIn(types.ModuleType):
    """``__main__`` until the caller's script is needed."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        module = load()
        return getattr(module, name)


def install(where: tuple[str, str] | None) -> None:
    """Make ``__main__`` resolve to the caller's script (``where`` says how to find it)."""
    global _where
    _where = where
    if where is None:  # interactive or -c: nothing can be loaded
        sys.modules["__main__"] = _Missing("__main__")
        return
    sys.modules["__main__"] = _StandIn("__main__")


class _Missing(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"the task refers to __main__.{name}, but the caller's __main__ is not a file or "
            "module (interactive or -c); define task functions in an importable module"
        )


def load() -> types.ModuleType:
    """Load the caller's script as ``__mp_main__`` (once) and make it ``__main__`` too."""
    global loading
    existing = sys.modules.get("__mp_main__")
    if existing is not None and not isinstance(existing, _StandIn):
        return existing
    assert _where is not None
    how, where = _where
    package = None
    if how == "module":  # `python -m pkg.mod`: load its file under the name __mp_main__
        found = importlib.util.find_spec(where)
        if found is None or not found.origin or not found.has_location:
            raise ImportError(f"cannot load the caller's main module {where!r}")
        package = where.rpartition(".")[0] if not found.submodule_search_locations else where
        where = found.origin
    spec = importlib.util.spec_from_file_location("__mp_main__", where)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the caller's main module {where!r}")
    module = importlib.util.module_from_spec(spec)
    module.__name__ = "__mp_main__"  # so its `if __name__ == "__main__":` block does not run
    if package is not None:
        module.__package__ = package  # its relative imports work as under -m
    sys.modules["__mp_main__"] = module
    loading = True
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["__mp_main__"]
        raise
    finally:
        loading = False
    # Pickles name it __main__ (the caller's) or __mp_main__ (ours); `import multiprocessing`
    # inside the script re-points __mp_main__, so both are set after it ran.
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    return module
