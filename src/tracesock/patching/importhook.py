"""The one import hook: modules imported after ``instrument()`` are patched as they arrive.

A ``sys.meta_path`` finder that finds nothing itself.  For a watched name it
asks the finders after it for the module's spec and wraps that loader's
``exec_module`` once, so the patch runs right after the module's own code --
before anyone can take a reference to what it is about to replace -- while
the module keeps its real loader and spec.  Names are watched only while
instrumented; ``clear()`` takes the hook out of ``sys.meta_path``.
"""

from __future__ import annotations

import sys
import threading

from ..core.guard import dropped

__all__ = ["HOOK", "ImportHook", "apply"]


class ImportHook:
    def __init__(self):
        self._watched = {}  # module name -> (patch(module), again: also every later fresh import)
        self._lock = threading.RLock()

    def watch(self, name, patch, again=False):
        """Run ``patch(module)`` when ``name`` is next imported (and every time, if ``again``)."""
        with self._lock:
            self._watched[name] = (patch, again)
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def clear(self):
        with self._lock:
            self._watched.clear()
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass

    def _apply(self, name, module):
        with self._lock:
            entry = self._watched.get(name)
            if entry is None:
                return
            patch, again = entry
            if not again:
                del self._watched[name]
        apply(patch, module)


    def find_spec(self, name, path=None, target=None):
        if name not in self._watched:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or "exec_module" in getattr(loader, "__dict__", {"exec_module": 1}):
            return spec

        def exec_and_patch(module):
            try:
                del loader.exec_module  # one module per loader: back to the class's method
            except AttributeError:
                pass
            exec_module(module)
            self._apply(name, module)

        try:
            loader.exec_module = exec_and_patch
        except Exception:
            pass
        return spec

    def invalidate_caches(self):
        pass


def apply(patch, module):
    """``patch(module)``; a patcher that fails is counted, never raised into the import."""
    try:
        patch(module)
    except Exception:
        dropped()


HOOK = ImportHook()
