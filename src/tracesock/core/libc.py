"""The one ctypes binding of libc (and of the two C-API calls used beside it).

Why libc and not Python's own wrappers: ``select.poll`` and the socket
methods retry ``EINTR`` invisibly (PEP 475), and an interrupted wait or send
is exactly what tracesock must see.  ctypes releases the GIL around each
call, as ``Py_BEGIN_ALLOW_THREADS`` does.  Only ``core.syscall`` and
``core.signals`` call these, but for ``malloc_trim``, which an attach's agent calls
at detach.
"""

from __future__ import annotations

import ctypes

__all__ = ["PollFd", "PyBuffer", "check_signals", "get_buffer", "get_errno", "malloc_trim",
           "poll", "pthread_sigmask", "recv", "release_buffer", "send"]

_libc = ctypes.CDLL(None, use_errno=True)
get_errno = ctypes.get_errno


class PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


poll = _libc.poll
poll.argtypes = [ctypes.POINTER(PollFd), ctypes.c_ulong, ctypes.c_int]
poll.restype = ctypes.c_int

send = _libc.send
send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
send.restype = ctypes.c_ssize_t

recv = _libc.recv
recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
recv.restype = ctypes.c_ssize_t

pthread_sigmask = getattr(_libc, "pthread_sigmask", None)
if pthread_sigmask is not None:
    pthread_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    pthread_sigmask.restype = ctypes.c_int

# glibc keeps freed heap for reuse; this hands it back to the kernel (None outside glibc)
malloc_trim = getattr(_libc, "malloc_trim", None)
if malloc_trim is not None:
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int


class PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


get_buffer = ctypes.pythonapi.PyObject_GetBuffer
get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
get_buffer.restype = ctypes.c_int
release_buffer = ctypes.pythonapi.PyBuffer_Release
release_buffer.argtypes = [ctypes.POINTER(PyBuffer)]
release_buffer.restype = None

check_signals = ctypes.pythonapi.PyErr_CheckSignals  # raises what a Python signal handler raised
check_signals.argtypes = []
check_signals.restype = ctypes.c_int
