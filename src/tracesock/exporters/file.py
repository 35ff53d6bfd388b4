"""The local file exporter: Jaeger's native JSON, written once at shutdown, bounded.

At most ``max_spans`` spans are kept in memory (the first ones; the span of
the whole run, ended last, always has a place).  The rest are counted, and
the count goes into the file (``warnings`` of the trace, the process tag
``tracesock.spans.dropped``) and into the summary.  A kept span whose parent
was dropped is dropped too, so every reference in the file points at a span
that is in it (a parent in another process -- ``--children`` -- excepted).
"""

from __future__ import annotations

import json
import os
import threading

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .formats import otlp_to_jaeger, spans_to_otlp

__all__ = ["JaegerFileExporter", "write_private"]


def write_private(path, text, overwrite=False):
    """Write ``text`` to ``path`` readable by its owner only (mode 0600).

    Telemetry files name hosts, ports and code paths: nobody else should read
    them.  An existing file is never replaced unless ``overwrite``
    (``FileExistsError``).  The text goes to a new temporary file first, so a
    reader never sees half a file; the temporary name is created exclusively
    (``O_EXCL``), so a planted file or symlink is never written through.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, atomically
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


class JaegerFileExporter(SpanExporter):
    def __init__(self, path, max_spans=10_000, *, keep=None, overwrite=False):
        self.path = path
        self.overwrite = overwrite
        self.max_spans = max_spans
        self.keep = keep  # predicate: spans that always get a place (the run span)
        self._spans = []
        self._kept_special = False  # the span `keep` picks has arrived
        self.dropped = 0
        self.written = None  # number of spans written, once written
        self.error = None  # why writing failed (one line), at shutdown
        self._lock = threading.Lock()
        self._done = False

    def export(self, spans):
        with self._lock:
            if self._done:
                return SpanExportResult.FAILURE
            reserved = 1 if self.keep is not None and not self._kept_special else 0
            for span in spans:
                if reserved and self.keep(span):
                    self._kept_special = True
                    reserved = 0
                    self._spans.append(span)
                elif len(self._spans) + reserved < self.max_spans:
                    self._spans.append(span)
                else:
                    self.dropped += 1
        return SpanExportResult.SUCCESS

    def _kept(self):
        spans = self._spans
        if not self.dropped:
            return spans
        ids = {s.context.span_id for s in spans}
        # Drop the descendants of dropped spans (children end first, so they were kept).
        changed = True
        while changed:
            changed = False
            kept = []
            for s in spans:
                parent = s.parent
                if parent is not None and not parent.is_remote and parent.span_id not in ids:
                    ids.discard(s.context.span_id)
                    self.dropped += 1
                    changed = True
                else:
                    kept.append(s)
            spans = kept
        return spans

    def document(self):
        """The Jaeger JSON document of what was kept (does not close the exporter)."""
        with self._lock:
            spans = self._kept()
            self._spans = spans
            doc = otlp_to_jaeger(spans_to_otlp(spans))
            if self.dropped:
                note = (f"tracesock: {self.dropped} spans dropped "
                        f"(cap of {self.max_spans} spans kept; raise it with --max-spans)")
                for trace in doc["data"]:
                    trace["warnings"] = [note]
                    for process in trace["processes"].values():
                        process["tags"].append(
                            {"key": "tracesock.spans.dropped", "type": "int64", "value": self.dropped})
            return doc, len(spans)

    def write(self):
        doc, count = self.document()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        write_private(self.path, json.dumps(doc, separators=(",", ":")) + "\n", self.overwrite)
        self.written = count
        return count

    def shutdown(self):
        with self._lock:
            if self._done:
                return
        try:
            self.write()
        except FileExistsError:
            self.error = f"{self.path}: exists, not replaced (--overwrite / TRACESOCK_OVERWRITE=1 replaces it)"
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
        with self._lock:
            self._done = True
            self._spans = []

    def force_flush(self, timeout_millis=30000):
        return True
