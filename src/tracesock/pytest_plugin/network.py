"""``--tracesock-deny-network``: keep a test suite on this machine.

A connect, a ``sendto``/``sendmsg`` to an address, or a name lookup that
reaches anything but loopback (127.0.0.0/8, ::1, ``localhost``, Unix sockets)
fails the test that made it, naming the test, the address or name, and the
call site with its stack.  ``=warn`` lets the call go and reports it.  The
check is ``sockets.policy``'s: it runs inside tracesock's own socket methods
(instrumented for the session at ``detail="metrics"``: no spans), before any
syscall; the telemetry pipeline's own sockets are never checked.

What counts as local: loopback and unspecified addresses (a connect to
0.0.0.0 reaches this host), the names ``localhost``/``*.localhost``, this
host's own name (``socket.gethostname()``: resolved from /etc/hosts; where it
maps to a non-loopback address, the connect is still refused), lookups of
numeric addresses (no query leaves the machine: the connect that follows is
checked) and passive lookups (``getaddrinfo(None, port)``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import traceback

from ..core import sites
from ..sockets import policy

__all__ = ["Denied", "NetworkGuard", "parse_allow"]

_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_AF_UNIX = getattr(socket, "AF_UNIX", None)


class Denied(RuntimeError):
    """Raised by a socket call that would leave the machine under ``--tracesock-deny-network``.

    Not an ``OSError``: code that retries on connection errors must not swallow it."""


def parse_allow(text, source="--tracesock-allow-hosts"):
    """``(names, networks)`` of a comma list of host names, addresses and CIDRs; ValueError names it."""
    names, networks = set(), []
    items = [raw.strip() for raw in (text or "").split(",")] if (text or "").strip() else []
    for item in items:
        if not item:
            raise ValueError(f"{source}: empty entry in {text!r}")
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if "/" in item or not _NAME.match(item):
            raise ValueError(f"{source}: {item!r} is not a host name, an address or a CIDR network")
        names.add(item.lower().rstrip("."))
    return names, networks


def _address(host):
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0
    except (ValueError, AttributeError):
        return None


def _local_ip(ip):
    if ip.is_loopback or ip.is_unspecified:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped is not None and (mapped.is_loopback or mapped.is_unspecified)


class Violation:
    __slots__ = ("test", "what", "target", "site", "stack")

    def __init__(self, test, what, target, site, stack):
        self.test, self.what, self.target, self.site, self.stack = test, what, target, site, stack

    def line(self):
        return f"{self.what} {self.target} from {self.site}"


class NetworkGuard:
    """The check handed to ``sockets.policy``, and what it found, per test."""

    def __init__(self, mode, names=(), networks=()):
        self.mode = mode  # "deny" or "warn"
        self.names = set(names)
        self.networks = list(networks)
        self.own_name = socket.gethostname().lower()
        self.test = None  # nodeid of the running test
        self.allow_all = False  # @pytest.mark.allow_network() on the running test
        self.extra = (set(), [])  # hosts that marker allows
        self.found = {}  # nodeid -> [Violation]
        self._lock = threading.Lock()

    def start(self):
        policy.set_check(self.check)

    def stop(self):
        if policy.check == self.check:
            policy.set_check(None)

    def begin(self, test, allow_all, extra):
        self.test, self.allow_all, self.extra = test, allow_all, extra

    def end(self):
        self.test, self.allow_all, self.extra = None, False, (set(), [])

    def take(self, test):
        with self._lock:
            return self.found.pop(test, [])

    # -- deciding

    def _allowed_ip(self, ip):
        return _local_ip(ip) or any(ip in net for net in self.networks + self.extra[1])

    def _allowed_name(self, name):
        name = name.lower().rstrip(".")
        return (name == "localhost" or name.endswith(".localhost") or name == self.own_name
                or name in self.names or name in self.extra[0])

    def _allowed_host(self, host):
        if host is None or host == "" or host == b"":
            return True  # passive (bind) lookups, INADDR_ANY
        if isinstance(host, bytes):
            host = host.decode("idna", "replace")
        if not isinstance(host, str):
            return True  # CPython will reject the argument itself
        ip = _address(host)
        return self._allowed_ip(ip) if ip is not None else self._allowed_name(host)

    def allowed(self, what, family, target):
        if self.allow_all:
            return True
        if family is not None:  # connect, sendto, sendmsg: an address of that family
            if family == _AF_UNIX or not isinstance(target, tuple) or not target:
                return True
            return self._allowed_host(target[0])
        if isinstance(target, str) and _address(target) is not None:
            # a numeric address: a forward lookup sends no query (the connect is checked);
            # a reverse one (getnameinfo) asks about that address
            return what != "getnameinfo" or self._allowed_ip(_address(target))
        return self._allowed_host(target)

    def check(self, what, family, target):
        __tracebackhide__ = True  # pytest shows the test's frames, not ours
        if self.allowed(what, family, target):
            return
        frame = sites.call_site()
        site = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        stack = _program_stack(frame)
        shown = _shown(target)
        found = Violation(self.test or "(no test running)", what, shown, site, stack)
        with self._lock:
            self.found.setdefault(found.test, []).append(found)
        if self.mode == "deny":
            raise Denied(f"tracesock: network access denied in {found.test}: {what} {shown} is not "
                         f"loopback (allow it with --tracesock-allow-hosts or @pytest.mark.allow_network)")


def _program_stack(frame):
    """The stack down to ``frame``, the program's frames and the stdlib's socket layers
    only (not pytest's and pluggy's), as Python prints it."""
    if frame is None:
        return ""
    entries = [e for e in traceback.extract_stack(frame, limit=64) if sites.kind(e.filename) in ("user", "layer")]
    return "".join(traceback.format_list(entries))


def _shown(target):
    if isinstance(target, tuple) and len(target) >= 2:
        host = target[0]
        return f"[{host}]:{target[1]}" if isinstance(host, str) and ":" in host else f"{host}:{target[1]}"
    return repr(target) if not isinstance(target, str) else target


def report(violations, mode):
    """The text a test's violations fail (or warn) it with."""
    head = ("network access outside loopback" + (" (reported only: --tracesock-deny-network=warn)"
                                                 if mode == "warn" else ""))
    parts = [head]
    for v in violations:
        parts.append(f"  {v.line()}")
        if v.stack:
            parts.append("    " + v.stack.rstrip().replace("\n", "\n    "))
    return "\n".join(parts)
