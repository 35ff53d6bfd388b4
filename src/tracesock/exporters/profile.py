"""The profile as files: speedscope JSON and collapsed stacks, and reading them back.

``write(profile, path)`` writes what ``tracesock run --profile FILE`` writes
at exit (and ``tracesock.write_profile`` on demand):

- **speedscope JSON** (``*.speedscope.json``; https://www.speedscope.app,
  offline ``npx speedscope FILE``): one sampled profile per thread weighted in
  seconds, whose leaves split each call's time into ``[syscalls]``,
  ``[waiting]`` and ``[other]``; one profile of all threads weighted in
  bytes (leaves ``[sent]`` / ``[received]``).  The exact per-stack numbers
  (calls, time split, bytes, partial sends, EINTR retries, errors, the call
  site) ride along under the top-level key ``"tracesock"``, which speedscope
  ignores and ``tracesock report`` reads.
- **collapsed stacks** (``*.folded``): ``thread;frame;...;socket.send;[waiting] 1234``,
  one line per stack and leaf, weight in microseconds, for ``flamegraph.pl``
  and ``inferno-flamegraph``.

A frame is ``function (file:line)``: the qualified name (3.11+), the file
relative to the working directory when it is under it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from ..core.sites import OWN_DIR, PACKAGE_DIRS, STDLIB_DIRS, kind
from ..telemetry import profile as _live
from ..version import __version__

__all__ = ["ProfileData", "Stack", "Site", "collect", "to_speedscope", "to_folded", "write",
           "load", "load_doc", "is_profile_doc", "sites", "folded_path", "SCHEMA"]

SCHEMA = "https://www.speedscope.app/file-format-schema.json"
LEAVES = ("[syscalls]", "[waiting]", "[other]")
OVER_CAP = "[stacks over the cap]"


@dataclass
class Stack:
    thread: str
    method: str
    frames: list  # [(name, file, line)], root first, without the method and leaf frames
    calls: int = 0
    total_ns: int = 0
    syscall_ns: int = 0
    wait_ns: int = 0
    sent: int = 0
    received: int = 0
    partial_sends: int = 0
    eintr_retries: int = 0
    errors: int = 0
    syscalls: int = 0
    site: tuple | None = None  # (name, file, line) of the call site

    @property
    def other_ns(self):
        return max(self.total_ns - self.syscall_ns - self.wait_ns, 0)

    def add(self, other):
        for name in ("calls", "total_ns", "syscall_ns", "wait_ns", "sent", "received",
                     "partial_sends", "eintr_retries", "errors", "syscalls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ProfileData:
    stacks: list
    threads: list
    pid: int | None = None
    max_stacks: int = 0
    max_depth: int = 0
    over_cap_calls: int = 0  # calls whose stack was not kept (cap reached); in ``overflow``
    truncated_stacks: int = 0
    async_stacks: int = 0
    overflow: Stack | None = None
    sources: list = field(default_factory=list)

    @property
    def total_ns(self):
        return sum(s.total_ns for s in self.stacks) + (self.overflow.total_ns if self.overflow else 0)


_FIELDS = ("calls", "total_ns", "syscall_ns", "wait_ns", "sent", "received", "partial_sends",
           "eintr_retries", "errors", "syscalls")


def _site_of(frames):
    """The call site rule of code.* attributes (docs/telemetry.md), on a resolved stack."""

    fallback = None
    for frame in reversed(frames):
        name, path, line = frame
        if not path:
            continue
        found = kind(path)
        if found == "user":
            return frame
        if found == "library" and fallback is None:
            fallback = frame
    return fallback


_OWN = OWN_DIR
_own_cache = {}


def _is_own(path):
    own = _own_cache.get(path)
    if own is None:
        own = _own_cache[path] = (not path.startswith("<")
                                  and os.path.realpath(path).startswith(_OWN))
    return own


_PROGRAM_START = os.path.join("tracesock", "cli", "program.py")  # its execute(): the program's caller


def _is_run_code(name, path):
    return name == "_run_code" and "runpy" in path


def _is_runpy(name, path):
    return name in ("_run_module_as_main", "_run_code") and "runpy" in path


def _trim(frames):
    """Without tracesock's own frames; under ``tracesock run``, from the program's first frame
    (what ran before ``tracesock.cli.program.execute`` -- and the runpy frames it may call
    for ``-m`` -- is the runner, not the program)."""
    cut = 0
    runner = False
    for i, (name, path, line) in enumerate(frames):
        if path and _is_own(path):
            runner = True
            if name == "execute" and path.endswith(_PROGRAM_START):
                cut = i + 1
                while cut < len(frames) and _is_runpy(*frames[cut][:2]):  # -m: runpy's frames
                    cut += 1
                break
        elif runner and _is_run_code(name, path):
            cut = i + 1
            break
    return [f for f in frames[cut:] if not (f[1] and _is_own(f[1]))]


def collect(profile):
    """Resolve a live :class:`tracesock.telemetry.profile.Profile` into :class:`ProfileData`."""
    tables, overflow, overflow_calls = profile.snapshot()
    stacks = {}
    threads = []
    for name, ident, order, entries in sorted(tables, key=lambda t: t[2]):
        label = name if name not in threads else f"{name} ({ident})"
        threads.append(label)
        for key, values in entries.items():
            pairs = _trim([profile.frame(key[i], key[i + 1]) for i in range(len(key) - 2, 0, -2)])
            resolved = (label, key[0], tuple(pairs))
            s = stacks.get(resolved)
            if s is None:
                s = stacks[resolved] = Stack(label, key[0], pairs)
                s.site = _site_of(pairs)
            s.add(Stack("", "", [], *values))
    over = None
    if overflow_calls or any(overflow):
        over = Stack("(all threads)", "", [], *overflow)
    return ProfileData(stacks=list(stacks.values()), threads=threads, pid=os.getpid(),
                       max_stacks=profile.max_stacks, max_depth=profile.max_depth,
                       over_cap_calls=overflow_calls, truncated_stacks=profile.truncated,
                       async_stacks=profile.async_attributed, overflow=over)


_short = {}


def _short_path(path):
    """Relative to the working directory, the standard library or site-packages when under one."""
    short = _short.get(path)
    if short is None:
        short = path
        if not path.startswith("<"):

            real = os.path.realpath(path)
            for base in sorted(PACKAGE_DIRS + STDLIB_DIRS, key=len, reverse=True):
                if real.startswith(base):
                    short = real[len(base):]
                    break
            else:
                try:
                    rel = os.path.relpath(path)
                    if not rel.startswith(".." + os.sep) and not os.path.isabs(rel):
                        short = rel
                except ValueError:
                    pass
        if len(_short) < 10_000:
            _short[path] = short
    return short


def frame_text(frame):
    """``function (file:line)`` -- the text of a frame in folded stacks and the flame graph."""
    name, path, line = frame
    if not path:
        return name
    path = _short_path(path)
    return f"{name} ({path}:{line})" if line is not None else f"{name} ({path})"


# --- speedscope ----------------------------------------------------------------

def to_speedscope(data, *, name=None):
    frames, index = [], {}

    def fid(frame):
        i = index.get(frame)
        if i is None:
            i = index[frame] = len(frames)
            fname, path, line = frame
            entry = {"name": fname}
            if path:
                entry["file"] = path
            if line is not None:
                entry["line"] = line
            frames.append(entry)
        return i

    def synthetic(text):
        return fid((text, "", None))

    stacks = list(data.stacks)
    if data.overflow is not None:
        stacks.append(data.overflow)
    profiles = []
    threads = list(data.threads) + ([data.overflow.thread] if data.overflow is not None else [])
    for thread in threads:
        samples, weights = [], []
        for s in stacks:
            if s.thread != thread:
                continue
            base = [fid(f) for f in s.frames] + ([synthetic("socket." + s.method)] if s.method
                                                 else [synthetic(OVER_CAP)])
            for leaf, ns in zip(LEAVES, (s.syscall_ns, s.wait_ns, s.other_ns)):
                if ns > 0:
                    samples.append(base + [synthetic(leaf)])
                    weights.append(ns / 1e9)
        total = sum(weights)
        profiles.append({"type": "sampled", "name": f"{thread}: socket time", "unit": "seconds",
                         "startValue": 0, "endValue": total, "samples": samples, "weights": weights})
    samples, weights = [], []
    for s in stacks:
        base = ([synthetic("thread " + s.thread)] + [fid(f) for f in s.frames]
                + [synthetic("socket." + s.method) if s.method else synthetic(OVER_CAP)])
        for leaf, n in (("[sent]", s.sent), ("[received]", s.received)):
            if n > 0:
                samples.append(base + [synthetic(leaf)])
                weights.append(n)
    profiles.append({"type": "sampled", "name": "all threads: bytes sent and received", "unit": "bytes",
                     "startValue": 0, "endValue": sum(weights), "samples": samples, "weights": weights})

    def values(s):
        return {"calls": s.calls, "seconds": s.total_ns / 1e9, "syscall_seconds": s.syscall_ns / 1e9,
                "wait_seconds": s.wait_ns / 1e9, "bytes_sent": s.sent, "bytes_received": s.received,
                "partial_sends": s.partial_sends, "eintr_retries": s.eintr_retries, "errors": s.errors,
                "syscalls": s.syscalls}

    detail = []
    for s in data.stacks:
        entry = {"thread": s.thread, "method": s.method, "frames": [fid(f) for f in s.frames]}
        if s.site is not None:
            entry["site"] = fid(s.site)
        entry.update(values(s))
        detail.append(entry)
    doc = {
        "$schema": SCHEMA,
        "name": name or f"tracesock: socket time by Python stack (pid {data.pid})",
        "exporter": f"tracesock {__version__}",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
        "tracesock": {
            "version": 1, "pid": data.pid, "written": time.time(),
            "max_stacks": data.max_stacks, "max_depth": data.max_depth,
            "over_cap_calls": data.over_cap_calls, "truncated_stacks": data.truncated_stacks,
            "async_stacks": data.async_stacks, "threads": data.threads, "stacks": detail,
            "overflow": values(data.overflow) if data.overflow is not None else None,
        },
    }
    return doc


def is_profile_doc(doc):
    return (isinstance(doc, dict) and doc.get("$schema") == SCHEMA
            and isinstance(doc.get("tracesock"), dict))


def load_doc(doc, source=""):
    """:class:`ProfileData` from a speedscope document written by tracesock."""
    if not is_profile_doc(doc):
        raise ValueError("not a tracesock profile (speedscope JSON with a \"tracesock\" section)")
    frames = [(f.get("name", "?"), f.get("file", ""), f.get("line")) for f in doc["shared"]["frames"]]
    t = doc["tracesock"]
    stacks = []
    for e in t.get("stacks") or ():
        s = Stack(e["thread"], e["method"], [frames[i] for i in e["frames"]],
                  calls=int(e["calls"]), total_ns=round(e["seconds"] * 1e9),
                  syscall_ns=round(e["syscall_seconds"] * 1e9), wait_ns=round(e["wait_seconds"] * 1e9),
                  sent=int(e["bytes_sent"]), received=int(e["bytes_received"]),
                  partial_sends=int(e["partial_sends"]), eintr_retries=int(e["eintr_retries"]),
                  errors=int(e["errors"]), syscalls=int(e.get("syscalls", 0)))
        if e.get("site") is not None:
            s.site = frames[e["site"]]
        stacks.append(s)
    over = None
    o = t.get("overflow")
    if o:
        over = Stack("(all threads)", "", [], calls=int(o["calls"]), total_ns=round(o["seconds"] * 1e9),
                     syscall_ns=round(o["syscall_seconds"] * 1e9), wait_ns=round(o["wait_seconds"] * 1e9),
                     sent=int(o["bytes_sent"]), received=int(o["bytes_received"]),
                     partial_sends=int(o["partial_sends"]), eintr_retries=int(o["eintr_retries"]),
                     errors=int(o["errors"]), syscalls=int(o.get("syscalls", 0)))
    return ProfileData(stacks=stacks, threads=list(t.get("threads") or ()), pid=t.get("pid"),
                       max_stacks=t.get("max_stacks", 0), max_depth=t.get("max_depth", 0),
                       over_cap_calls=t.get("over_cap_calls", 0),
                       truncated_stacks=t.get("truncated_stacks", 0),
                       async_stacks=t.get("async_stacks", 0), overflow=over,
                       sources=[source] if source else [])


def load(path):
    with open(path, encoding="utf-8") as f:
        return load_doc(json.load(f), path)


def merge(profiles):
    """Several profiles (processes) as one: threads are prefixed with their pid."""
    if len(profiles) == 1:
        return profiles[0]
    out = ProfileData(stacks=[], threads=[])
    for p in profiles:
        prefix = f"pid {p.pid} " if p.pid is not None else ""
        for s in p.stacks:
            s.thread = prefix + s.thread
            out.stacks.append(s)
        out.threads += [prefix + t for t in p.threads]
        out.over_cap_calls += p.over_cap_calls
        out.truncated_stacks += p.truncated_stacks
        out.async_stacks += p.async_stacks
        out.max_stacks = max(out.max_stacks, p.max_stacks)
        out.max_depth = max(out.max_depth, p.max_depth)
        if p.overflow is not None:
            if out.overflow is None:
                out.overflow = Stack("(all threads)", "", [])
            out.overflow.add(p.overflow)
        out.sources += p.sources
    return out


# --- collapsed stacks ----------------------------------------------------------

def _clean(text):
    return text.replace(";", ",").replace("\n", " ")


def to_folded(data):
    """Collapsed stacks, weight = microseconds (rounded; zero lines left out)."""
    lines = []
    stacks = list(data.stacks)
    if data.overflow is not None:
        stacks.append(data.overflow)
    for s in stacks:
        base = [_clean("thread " + s.thread)] + [_clean(frame_text(f)) for f in s.frames]
        base.append("socket." + s.method if s.method else OVER_CAP)
        for leaf, ns in zip(LEAVES, (s.syscall_ns, s.wait_ns, s.other_ns)):
            us = round(ns / 1e3)
            if us > 0:
                lines.append(";".join(base + [leaf]) + f" {us}")
    return "\n".join(lines) + ("\n" if lines else "")


# --- writing -------------------------------------------------------------------

def folded_path(path):
    for suffix in (".speedscope.json", ".json"):
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".folded"
    return path + ".folded"


def paths_for(path, folded=True):
    """The files ``write(profile, path)`` writes."""
    if path.endswith(".folded"):
        return [path]
    return [path, folded_path(path)] if folded else [path]


def _atomic_write(path, text, overwrite):
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a profile names the code
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the file appeared meanwhile: never replaced
    finally:
        os.unlink(tmp)


def write(profile, path, *, folded=True, overwrite=True):
    """Write ``profile`` (a live Profile or ProfileData) to ``path``.

    ``*.folded``: collapsed stacks only.  Anything else: speedscope JSON, and
    (``folded=True``) the collapsed stacks next to it (``.speedscope.json`` /
    ``.json`` replaced by ``.folded``).  Files are created mode 0600; with
    ``overwrite=False`` an existing file is not replaced (FileExistsError).
    Returns the paths written.
    """
    data = profile if isinstance(profile, ProfileData) else collect(profile)
    written = []
    for target in paths_for(path, folded):
        text = (to_folded(data) if target.endswith(".folded")
                else json.dumps(to_speedscope(data), separators=(",", ":")))
        _atomic_write(target, text, overwrite)
        written.append(target)
    return written


# --- top call sites --------------------------------------------------------------

@dataclass
class Site:
    function: str
    file: str
    line: int | None
    calls: int = 0
    sent: int = 0
    received: int = 0
    total_ns: int = 0
    wait_ns: int = 0
    syscall_ns: int = 0
    syscalls: int = 0
    eintr_retries: int = 0
    partial_sends: int = 0
    methods: set = field(default_factory=set)

    @property
    def label(self):
        short = str(self.file).rsplit("/", 1)[-1] if self.file else "?"
        return f"{short}:{self.line}" if self.line is not None else short


def sites(data):
    """Top call sites of a profile, by total socket time."""
    out = {}
    for s in data.stacks:
        site = s.site or ("(no call site)", "", None)
        k = site
        r = out.get(k)
        if r is None:
            r = out[k] = Site(site[0], site[1], site[2])
        r.calls += s.calls
        r.sent += s.sent
        r.received += s.received
        r.total_ns += s.total_ns
        r.wait_ns += s.wait_ns
        r.syscall_ns += s.syscall_ns
        r.eintr_retries += s.eintr_retries
        r.partial_sends += s.partial_sends
        r.syscalls += s.syscalls
        r.methods.add(s.method)
    return sorted(out.values(), key=lambda r: (-r.total_ns, -r.calls, r.file, r.line or 0))


def span_sites(calls):
    """Top call sites from call spans' ``code.*`` attributes (``report.Span`` objects)."""
    out = {}
    for s in calls:
        if s.method == "create_connection":
            continue  # a set-up, not a call: its socket.connect children are counted
        t = s.tags
        path = t.get("code.file.path")
        if not path:
            continue  # not attributable
        key = (t.get("code.function.name") or "(no call site)", path or "", t.get("code.line.number"))
        r = out.get(key)
        if r is None:
            r = out[key] = Site(*key)
        r.calls += 1
        moved = int(t.get("tracesock.bytes.transferred") or 0)
        method = s.method
        if method in ("send", "sendall", "sendto", "sendmsg", "sendfile"):
            r.sent += moved
        elif method.startswith("recv"):
            r.received += moved
        r.total_ns += s.duration_us * 1000
        r.wait_ns += round((float(t.get("tracesock.wait.duration") or 0.0) * 1e6 + s.blocked_us) * 1000)
        r.syscalls += int(t.get("tracesock.syscalls") or 0)
        r.eintr_retries += int(t.get("tracesock.eintr_retries") or 0)
        r.partial_sends += int(t.get("tracesock.partial_sends") or 0)
        r.methods.add(method)
    return sorted(out.values(), key=lambda r: (-r.total_ns, -r.calls, r.file, r.line or 0))


def write_profile(path, *, folded=True):
    """Write the process's profile now: speedscope JSON at ``path`` (and the
    collapsed stacks next to it), or collapsed stacks only if ``path`` ends in
    ``.folded``.  Returns the paths written.  Profiling goes on."""
    profile = _live.current()
    if profile is None:
        raise RuntimeError("tracesock: no profile: call tracesock.instrument(profile=True) first")
    return write(profile, path, folded=folded)
