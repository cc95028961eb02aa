"""Fault injection: the one place where a test reaches into a running peer.

The round path calls two hooks, which do nothing unless a fault plugin is
loaded:

- ``point(name, **context)``: a named moment, where a plugin may act (crash
  the process, sleep, raise);
- ``wrap(name, obj, **context) -> obj``: a component a plugin may replace by
  a misbehaving stand-in (a poisoned codec, a slow collective).

Points and wraps in the shipped code:

=====================  ========================================================
``after_commit``       point, ``round``: a DiLoCo round committed, before its
                       S_{r+1} is installed or anything is written after it
``collective``         wrap, ``round``, ``peer_id``: the collective the
                       model-free peer runs round ``round`` with (called
                       once per round, where the peer picks it)
=====================  ========================================================

A plugin is a Python file named by the environment variable
``DTRAIN_FAULT_PLUGIN`` (a path, so test code never ships in the package),
loaded once per process at the first hook call. It may define
``point(name, **context)`` and ``wrap(name, obj, **context)``; whatever it
leaves out stays a no-op. The test doubles (``tests/fault_plugin.py``) read
their own settings from the environment.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from types import ModuleType
from typing import Any, Optional

PLUGIN_ENV = "DTRAIN_FAULT_PLUGIN"

_lock = threading.Lock()
_loaded = False
_plugin: Optional[ModuleType] = None


def _load() -> Optional[ModuleType]:
    global _loaded, _plugin
    with _lock:
        if not _loaded:
            path = os.environ.get(PLUGIN_ENV, "")
            if path:
                spec = importlib.util.spec_from_file_location("dtrain_fault_plugin", path)
                if spec is None or spec.loader is None:
                    raise RuntimeError(f"{PLUGIN_ENV}={path!r} is not a Python file")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _plugin = module
            _loaded = True
        return _plugin


def point(name: str, **context: Any) -> None:
    plugin = _load()
    if plugin is not None and hasattr(plugin, "point"):
        plugin.point(name, **context)


def wrap(name: str, obj: Any, **context: Any) -> Any:
    plugin = _load()
    if plugin is not None and hasattr(plugin, "wrap"):
        return plugin.wrap(name, obj, **context)
    return obj
