"""Where in the program a socket call came from: frames told apart by file.

A frame's file is ``own`` (tracesock), ``layer`` (the standard library's
socket layers: socket, ssl, selectors, socketserver, asyncio), ``library``
(the rest of the standard library, installed packages, frozen modules, and
the environment's scripts directory -- ``venv/bin/gunicorn``, the
console-script stub pip generates for an installed package's entry point, is
that package's code) or ``user`` -- the program's own code, which is what a
span's ``code.*`` attributes and a profile's call sites name.  Classifying a file costs a few
``realpath`` calls, so each file is classified once (bounded cache).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import traceback

__all__ = ["PACKAGE_DIRS", "SCRIPT_DIRS", "STDLIB_DIRS", "call_site", "kind", "stacktrace"]


def _library_dirs():
    paths = sysconfig.get_paths()
    stdlib = {paths.get("stdlib"), paths.get("platstdlib")}
    packages = {paths.get("purelib"), paths.get("platlib")}
    try:
        packages.update(site.getsitepackages())
        packages.add(site.getusersitepackages())
    except Exception:
        pass
    norm = lambda ps: tuple(sorted({os.path.realpath(p) + os.sep for p in ps if p}))  # noqa: E731
    return norm(stdlib), norm(packages)


def _script_dirs():
    """Where installers put the entry-point stubs: the environment's and the user's scripts."""
    dirs = {sysconfig.get_path("scripts")}
    try:
        dirs.add(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    return frozenset(os.path.realpath(d) for d in dirs if d)


OWN_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep  # the tracesock package
STDLIB_DIRS, PACKAGE_DIRS = _library_dirs()
SCRIPT_DIRS = _script_dirs()
_SOCKET_LAYERS = ("socket.py", "ssl.py", "selectors.py", "socketserver.py")
_cache = {}  # filename -> 'own' | 'layer' | 'library' | 'user'


def kind(filename):
    """``own``, ``layer``, ``library`` or ``user``: what kind of code ``filename`` holds."""
    found = _cache.get(filename)
    if found is None:
        path = os.path.realpath(filename) if not filename.startswith("<") else filename
        if path.startswith(OWN_DIR):
            found = "own"
        elif path.startswith("<frozen "):  # frozen stdlib modules (runpy, importlib, ...)
            found = "library"
        elif path.startswith(STDLIB_DIRS) and (
                os.path.basename(path) in _SOCKET_LAYERS or os.sep + "asyncio" + os.sep in path):
            found = "layer"
        elif (path.startswith(STDLIB_DIRS) or path.startswith(PACKAGE_DIRS)
              or os.path.dirname(path) in SCRIPT_DIRS):
            found = "library"
        else:
            found = "user"
        if len(_cache) < 4096:
            _cache[filename] = found
    return found


def call_site(start=None):
    """The frame a user would call "where my code did this", looked for from
    ``start`` outwards (default: the caller's frame).

    The innermost frame outside tracesock, the standard library and installed
    packages, their console-script stubs included (``requests.get()`` in app.py
    points at that line of app.py); when there is none, the innermost outside
    tracesock and the stdlib's own socket layers (socket, ssl, selectors,
    socketserver, asyncio): gunicorn's ``http/wsgi.py`` for the response it sends.
    """
    # Walking through frames costs: each one passed is made into a frame object.
    frame = sys._getframe(1) if start is None else start
    fallback = None
    while frame is not None:
        found = kind(frame.f_code.co_filename)
        if found == "user":
            return frame
        if found == "library" and fallback is None:
            fallback = frame
        frame = frame.f_back
    return fallback


def stacktrace():
    """The stack from the innermost frame outside tracesock, as Python prints it."""
    frame = sys._getframe(1)
    while frame is not None and kind(frame.f_code.co_filename) == "own":
        frame = frame.f_back
    return "".join(traceback.format_stack(frame, limit=64)) if frame is not None else ""
