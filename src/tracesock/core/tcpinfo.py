"""Why a send was slow: Linux ``TCP_INFO`` snapshots and a verdict.

``getsockopt(IPPROTO_TCP, TCP_INFO)`` returns ``struct tcp_info``
(include/uapi/linux/tcp.h); the kernel copies at most what it has, so a field
past the returned length does not exist on that kernel and is omitted, never
guessed.  Offsets used here, with the kernel that added each field:

=====================  ======  =========  ===========================================
field                  offset  kernel     meaning
=====================  ======  =========  ===========================================
tcpi_snd_mss           16      2.6        sender maximum segment size, bytes
tcpi_rtt               68      2.6        smoothed RTT, us
tcpi_snd_cwnd          80      2.6        congestion window, segments
tcpi_total_retrans     100     2.6.?      retransmitted segments, cumulative
tcpi_notsent_bytes     144     4.6        bytes in the send queue not yet sent
tcpi_busy_time         168     4.10       us the connection was busy sending
tcpi_rwnd_limited      176     4.10       us limited by the peer's receive window
tcpi_sndbuf_limited    184     4.10       us limited by our send buffer (SO_SNDBUF)
=====================  ======  =========  ===========================================

The full verdict needs Linux >= 4.10 (the "chrono" counters); older kernels
get the fields they have.  Not Linux, not TCP, or the call fails: no snapshot.
Each snapshot also reads ``SO_SNDBUF``: the kernel counts a send buffer set
too small by the program as plain busy time (in flight is capped at the
buffer, not the window), so a buffer below both the congestion window's bytes
(``snd_cwnd * snd_mss``) and the kernel's initial buffer (``tcp_wmem[1]``,
i.e. forced by the program, not autotuned) tells ``send_buffer_small`` from
``network``.  And the thread's user CPU time (``RUSAGE_THREAD``): Python
signal handlers run as user time in the main thread while a blocked send
uses none, which is how time lost to signals is told apart.
"""

from __future__ import annotations

import _socket
import fcntl
import resource
import socket
import struct
import sys

__all__ = ["snapshot", "diagnose", "inq", "FIELDS", "VERDICTS"]

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_LINUX = sys.platform.startswith("linux")
_SIOCINQ = 0x541B  # FIONREAD: bytes queued for reading
_BUFLEN = 256
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)

# name -> (offset, struct format)
FIELDS = {
    "snd_mss": (16, "I"),
    "rtt": (68, "I"),
    "snd_cwnd": (80, "I"),
    "total_retrans": (100, "I"),
    "notsent_bytes": (144, "I"),
    "busy_time": (168, "Q"),
    "rwnd_limited": (176, "Q"),
    "sndbuf_limited": (184, "Q"),
}

VERDICTS = ("receiver_slow", "send_buffer_small", "network", "signals", "timeout", "none")

# A cause "explains" a slow call when it accounts for this share of its duration.
_DOMINANT = 0.3
# Exact handler time below this is the clock reads around a check that ran no
# handler (tens of ns each; a Python handler call alone takes longer).
_HANDLER_RAN_NS = 100_000


def snapshot(sock):
    """The TCP_INFO fields above as a dict (absent fields left out), or ``None``."""
    if not _LINUX:
        return None
    try:
        raw = _socket.socket.getsockopt(sock, socket.IPPROTO_TCP, _TCP_INFO, _BUFLEN)
    except (OSError, ValueError):
        return None
    out = {}
    for name, (offset, fmt) in FIELDS.items():
        end = offset + struct.calcsize(fmt)
        if len(raw) >= end:
            out[name] = struct.unpack_from("=" + fmt, raw, offset)[0]
    try:
        out["sndbuf"] = _socket.socket.getsockopt(sock, socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        pass
    if _RUSAGE_THREAD is not None:
        # User CPU of this thread: a blocked or copying send uses system time;
        # Python signal handlers run as user time, in this (the main) thread.
        out["utime"] = resource.getrusage(_RUSAGE_THREAD).ru_utime
    return out


def _default_sndbuf():
    """The kernel's initial TCP send buffer (tcp_wmem[1]): a program that set a
    smaller SO_SNDBUF forced it; autotuned buffers grow from here."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 65536


def inq(sock):
    """Bytes waiting in the receive queue (``SIOCINQ``), or ``None``."""
    try:
        buf = fcntl.ioctl(sock.fileno(), _SIOCINQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return struct.unpack("i", buf)[0]


def diagnose(before, after, duration_s, eintr_retries, timed_out, signal_ns=None):
    """Span attributes and a verdict from two snapshots of one call.

    ``signal_ns``: the exact time Python signal handlers ran during the call
    (the C extension times them, see ``syscall.signal_acc``), or ``None``:
    then the thread's user CPU time stands in for it (sampled per tick).
    Returns ``(attributes, verdict)``.  Times are turned into seconds.
    """
    attrs = {}
    if "rtt" in after:
        attrs["tracesock.tcp.rtt"] = after["rtt"] / 1e6
    if "snd_cwnd" in after:
        attrs["tracesock.tcp.snd_cwnd"] = after["snd_cwnd"]
    if "notsent_bytes" in after:
        attrs["tracesock.tcp.unsent_bytes"] = after["notsent_bytes"]

    def delta(name):
        if name in before and name in after:
            return max(after[name] - before[name], 0)
        return None

    retrans = delta("total_retrans")
    rwnd = delta("rwnd_limited")
    sndbuf = delta("sndbuf_limited")
    busy = delta("busy_time")
    if retrans is not None:
        attrs["tracesock.tcp.retransmits"] = retrans
    if rwnd is not None:
        attrs["tracesock.tcp.rwnd_limited"] = rwnd / 1e6
    if sndbuf is not None:
        attrs["tracesock.tcp.sndbuf_limited"] = sndbuf / 1e6
    if busy is not None:
        attrs["tracesock.tcp.busy"] = busy / 1e6
    window = after["snd_cwnd"] * after["snd_mss"] if {"snd_cwnd", "snd_mss"} <= after.keys() else None
    sndbuf_now = after.get("sndbuf")
    small_buffer = (window is not None and sndbuf_now is not None
                    and sndbuf_now < window and sndbuf_now < _DEFAULT_SNDBUF)
    signal_s = 0.0
    if signal_ns is not None:
        if eintr_retries or signal_ns >= _HANDLER_RAN_NS:
            # A handler may also run after a send no signal interrupted (the
            # signal went to another thread): its time delayed the call all the same.
            signal_s = signal_ns / 1e9
            attrs["tracesock.signals.duration"] = signal_s
    elif eintr_retries and "utime" in before and "utime" in after:
        signal_s = max(after["utime"] - before["utime"], 0.0)
        attrs["tracesock.signals.duration"] = signal_s
    verdict = _verdict(duration_s, eintr_retries, timed_out, retrans, rwnd, sndbuf, busy,
                       small_buffer, signal_s)
    attrs["tracesock.diagnosis"] = verdict
    return attrs, verdict


def _verdict(duration_s, eintr_retries, timed_out, retrans, rwnd, sndbuf, busy, small_buffer,
             signal_s):
    if timed_out:
        return "timeout"
    if (eintr_retries or signal_s) and signal_s >= duration_s * _DOMINANT:
        return "signals"  # the handlers themselves took the time
    floor = duration_s * _DOMINANT * 1e6  # in us, like the chrono counters
    rwnd = rwnd or 0
    sndbuf = sndbuf or 0
    if rwnd >= sndbuf and rwnd > 0 and rwnd >= floor:
        return "receiver_slow"
    if sndbuf > rwnd and sndbuf >= floor:
        return "send_buffer_small"
    # Busy but limited by neither window: our too-small buffer, or the network.
    cwnd_limited = (busy or 0) - rwnd - sndbuf
    if not retrans and small_buffer and cwnd_limited >= floor:
        return "send_buffer_small"
    if retrans or (busy is not None and cwnd_limited >= floor):
        return "network"
    if eintr_retries:
        return "signals"
    return "none"


_DEFAULT_SNDBUF = _default_sndbuf()
