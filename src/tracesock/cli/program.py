"""Starting a program the way ``python script.py`` / ``python -m module`` does.

``tracesock run`` (traced or, under ``TRACESOCK_DISABLED=1``, as a pure
pass-through) runs the program in its own interpreter, whose ``sys.argv``,
``sys.path[0]`` and ``__main__`` were set up for tracesock.  This module
redoes what CPython's ``Modules/main.c`` and ``Python/pythonrun.c`` do for a
script, and what ``runpy._run_module_as_main`` does for ``-m`` and for a
directory or zip file, so that the program sees exactly what it would see
under plain python:

- ``sys.argv[0]``: the script as typed (``'script.py'``); for ``-m``, ``'-m'``
  while the module is being found, then its file's full path; a directory or
  zip file as typed.
- ``sys.path[0]``: the script's real directory; for ``-m`` the current
  directory; a directory or zip file itself (absolute).  Left alone under
  ``-P`` / ``PYTHONSAFEPATH`` / ``-I``, as python adds nothing there.
- ``__main__``: a fresh module (none of tracesock's globals), ``__file__``
  absolute, ``__loader__`` a ``SourceFileLoader`` (``SourcelessFileLoader`` for
  a ``.pyc``), ``__spec__`` None for a script, the module's spec under ``-m``;
  the code object's file name absolute, as in python's tracebacks.

:func:`script` and :func:`module` check first (:class:`NotRunnable`, with
python's message and exit status) and return a function that runs the
program; its exceptions propagate like python's (:func:`trim_traceback`
makes the printed traceback start at the program's first frame).
"""

from __future__ import annotations

import builtins
import functools
import importlib.machinery
import importlib.util
import io
import marshal
import os
import pkgutil
import runpy
import sys
import types
import warnings

__all__ = ["NotRunnable", "execute", "lookup", "module", "script", "trim_traceback"]


class NotRunnable(Exception):
    """The program cannot be started: python's message (without its own name) and exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def _safe_path():
    # -P / PYTHONSAFEPATH (3.11+) and -I: python prepends no directory to sys.path
    return getattr(sys.flags, "safe_path", False) or sys.flags.isolated


def _set_path0(directory):
    """Put the program's directory where python would have put it: in place of tracesock's own."""
    if _safe_path():
        return
    if sys.path:
        sys.path[0] = directory
    else:
        sys.path.insert(0, directory)


def _fresh_main():
    """A new ``__main__`` in ``sys.modules``, with what the interpreter gives it at start-up."""
    previous = sys.modules.get("__main__")
    main = types.ModuleType("__main__")
    main.__loader__ = importlib.machinery.BuiltinImporter  # as pylifecycle.c's add_main_module
    if previous is not None and "__annotations__" in vars(previous):
        main.__annotations__ = {}  # CPython up to 3.13 creates __main__ with it
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    return main


def _is_pyc(path):
    # Python/pythonrun.c maybe_pyc_file(): the extension, or the magic number's first half
    if path.endswith(".pyc"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(2) == importlib.util.MAGIC_NUMBER[:2]
    except OSError:
        return False


def _abspath(path):
    # python makes the file name absolute (3.9+) without normalising it: '/cwd/./x.py'
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def script(path, args):
    """``python path args...`` for a file, a directory or a zip file holding ``__main__.py``."""
    full = _abspath(path)
    if pkgutil.get_importer(full) is not None:  # a directory or a zip file, as python tells them
        return _main_of(path, full, args)
    try:
        open(full, "rb").close()
    except OSError as e:
        raise NotRunnable(f"can't open file {full!r}: [Errno {e.errno}] {e.strerror}", 2) from None

    def run():
        sys.argv[:] = [path] + list(args)
        _set_path0(os.path.dirname(os.path.realpath(path)))
        main = _fresh_main()
        main.__file__ = full
        if sys.version_info < (3, 15):  # pythonrun.c stopped setting it in 3.15
            main.__cached__ = None
        pyc = _is_pyc(full)
        loader = (importlib.machinery.SourcelessFileLoader if pyc
                  else importlib.machinery.SourceFileLoader)("__main__", full)
        main.__loader__ = loader
        try:
            execute(functools.partial(_code_of, full, pyc), vars(main))
        finally:
            # pythonrun.c removes them once the script has run (atexit handlers do not see them)
            vars(main).pop("__file__", None)
            vars(main).pop("__cached__", None)

    return run


def _code_of(full, pyc):
    with io.open_code(full) as f:
        data = f.read()
    if pyc:
        return marshal.loads(data[16:])
    return compile(data, full, "exec", dont_inherit=True)


def _main_of(path, full, args):
    """A directory or zip file: its ``__main__`` module, found on it as ``sys.path[0]``."""
    sys.argv[:] = [path] + list(args)
    if _safe_path():
        sys.path.insert(0, full)
    else:
        _set_path0(full)
    main = _fresh_main()
    # runpy hides __main__ while it looks for the directory's own
    try:
        lookup(runpy._get_main_module_details, runpy._Error)
    except runpy._Error as e:
        raise NotRunnable(str(e), 1) from None

    def run():
        sys.modules["__main__"] = main
        execute(None, vars(main), main_module=("__main__", False))

    return run


def module(name, args):
    """``python -m name args...``: found (and its parent packages imported) now, as python does."""
    sys.argv[:] = ["-m"] + list(args)  # python's sys.argv[0] while the module is being found
    _set_path0(os.getcwd())
    main = _fresh_main()  # what the parent packages imported to find it see
    try:
        with warnings.catch_warnings():
            # runpy's warning (a module imported by its own package) comes once, from the
            # lookup _run_module_as_main makes again when the program starts; the parent
            # packages' own warnings are not repeated: they show now
            warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package",
                                    category=RuntimeWarning)
            lookup(runpy._get_module_details, name, runpy._Error)
    except runpy._Error as e:
        raise NotRunnable(str(e), 1) from None

    def run():
        execute(None, vars(main), main_module=(name, True))

    return run


def lookup(find, *args):
    """runpy's lookup of the program before it starts: the frame above runpy's.

    An exception in a parent package imported to find the module (or a
    ``SyntaxError`` in its source) is printed from there, as python prints it
    but for the one ``_run_module_as_main`` frame python shows above.
    """
    return find(*args)


def execute(load, globals_, main_module=None):
    """Run the program: the frame above its first (trim_traceback cuts the traceback there).

    A script: ``load()``'s code in ``globals_``.  ``main_module`` ``(name, alter_argv)``:
    what python's C main calls for ``-m`` and for a directory or zip file,
    ``runpy._run_module_as_main``, into ``sys.modules["__main__"]`` (``globals_``'s module):
    it finds the module again (already checked, its parent packages already imported),
    sets ``sys.argv[0]`` and the module's attributes from its spec, and its two frames
    are in the traceback as under python.
    """
    if main_module is None:
        exec(load(), globals_)
    else:
        runpy._run_module_as_main(*main_module)


# The frames right above the program's (the first one found cuts), and right below
# execute() when the script's source does not compile: no frame of the program.
_ABOVE_PROGRAM = (execute.__code__, lookup.__code__)
_BELOW_EXECUTE = (_code_of.__code__,)


def trim_traceback():
    """Print an uncaught exception's traceback from the program's first frame, as python does.

    Swaps ``sys.excepthook`` for one call (the program has finished by then):
    the frames of tracesock and runpy above the program are cut off (all of
    them for a ``SyntaxError`` in the script itself), then the hook that was in
    place (the program's own, if it set one) prints.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        sys.excepthook = previous
        t = tb
        while t is not None and t.tb_frame.f_code not in _ABOVE_PROGRAM:
            t = t.tb_next
        if t is not None and isinstance(exc, BaseException):
            # the first one only: the program may run code through runpy itself
            start = t.tb_next
            while start is not None and start.tb_frame.f_code in _BELOW_EXECUTE:
                start = start.tb_next
            tb = start
            exc.__traceback__ = tb  # what the default hook prints from
        previous(exc_type, exc, tb)

    sys.excepthook = hook
