"""tracesock's start-up hook for ``tracesock run --children`` (see tracesock.bootstrap).

Runs the ``sitecustomize`` that this one shadows, if there is one, then
starts tracing when ``TRACESOCK_BOOTSTRAP=1``, then takes its directory off
``sys.path``: the program sees the ``sys.path`` it would see without
tracesock (``PYTHONPATH`` in the environment keeps it for grandchildren).
"""

import os
import sys


_HERE = os.path.dirname(os.path.abspath(__file__))


def _ours(entry):
    return os.path.abspath(entry or os.curdir) == _HERE


def _chain():
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if not _ours(p)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()

if os.environ.get("TRACESOCK_BOOTSTRAP") == "1":
    try:
        from tracesock.bootstrap import activate as _activate
    except ImportError as _e:
        sys.stderr.write(f"tracesock: not tracing {sys.executable} (pid {os.getpid()}): "
                         f"cannot import tracesock: {_e}\n")
    else:
        _activate()

sys.path[:] = [_p for _p in sys.path if not _ours(_p)]
