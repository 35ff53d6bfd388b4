"""tracesock's settings: command-line options over ``TRACESOCK_*`` variables over defaults.

Every value is checked here.  A bad one raises :class:`ConfigError` whose
message is one line naming the option or variable it came from; the command
line prints it and exits with status 2 (never a traceback, never a value
silently ignored).  The variables are documented in docs/configuration.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

__all__ = ["ConfigError", "Settings", "from_env", "to_env", "EXPORTERS", "DETAILS"]

DETAILS = ("metrics", "calls", "syscalls")
EXPORTERS = ("file", "otlp", "console", "none")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = ("always_on", "always_off", "parentbased_always_on", "parentbased_always_off",
            "traceidratio", "parentbased_traceidratio")
DEFAULT_OUTPUT = "tracesock-{pid}.json"
DEFAULT_MAX_SPANS = 10_000

# name of the variable -> Settings field
ENV = {
    "TRACESOCK_DETAIL": "detail",
    "TRACESOCK_SLOW_THRESHOLD": "slow_threshold",
    "TRACESOCK_EXPORTER": "exporters",
    "TRACESOCK_OUTPUT": "output",
    "TRACESOCK_SERVICE_NAME": "service_name",
    "TRACESOCK_PROMETHEUS_PORT": "prometheus_port",
    "TRACESOCK_PROMETHEUS_HOST": "prometheus_host",
    "TRACESOCK_MAX_SPANS": "max_spans",
    "TRACESOCK_SUMMARY": "summary",
    "TRACESOCK_CHILDREN": "children",
    "TRACESOCK_PROFILE": "profile",
    "TRACESOCK_OVERWRITE": "overwrite",
}


class ConfigError(ValueError):
    """A setting with a bad value; ``str()`` is a one-line message naming it."""


@dataclass(frozen=True)
class Settings:
    detail: str = "calls"
    slow_threshold: float | None = 0.0
    exporters: tuple = ("file",)
    output: str = DEFAULT_OUTPUT
    service_name: str | None = None
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    max_spans: int = DEFAULT_MAX_SPANS
    summary: bool = True
    children: bool = False
    profile: str | None = None  # tracesock run --profile FILE (this process only, not --children)
    overwrite: bool = False  # replace existing output files (otherwise refuse)
    sources: dict = field(default_factory=dict, compare=False)  # field -> where it came from

    def output_path(self, pid=None):
        return self.output.replace("{pid}", str(os.getpid() if pid is None else pid))


# --- parsers: (raw string, name of its source) -> value, or ConfigError ------

def _one_line(value):
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def parse_detail(raw, source):
    value = raw.strip().lower()
    if value not in DETAILS:
        raise ConfigError(f"{source}: unknown detail level {_one_line(raw)} "
                          f"(choose from {', '.join(DETAILS)})")
    return value


def parse_threshold(raw, source):
    value = raw.strip().lower()
    if value in ("none", "off", "never"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{source}: {_one_line(raw)} is not a number of seconds "
                          f"(or 'none' to disable slow-call spans)") from None
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ConfigError(f"{source}: slow threshold must be a finite number of seconds >= 0, "
                          f"not {_one_line(raw)}")
    return seconds


def parse_exporters(raw, source):
    if isinstance(raw, str):
        raw = [raw]
    names = []
    for item in raw:
        for name in item.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in EXPORTERS:
                raise ConfigError(f"{source}: unknown exporter {_one_line(name)} "
                                  f"(choose from {', '.join(EXPORTERS)})")
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"{source}: no exporter given (choose from {', '.join(EXPORTERS)})")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"{source}: 'none' cannot be combined with other exporters")
    return tuple(names)


def parse_output(raw, source):
    if not raw.strip():
        raise ConfigError(f"{source}: empty output path")
    try:
        raw.replace("{pid}", "0")
    except Exception:  # pragma: no cover
        raise ConfigError(f"{source}: bad output path {_one_line(raw)}") from None
    return raw


def parse_int(raw, source, *, minimum, maximum=None, what="a whole number"):
    try:
        value = int(str(raw).strip(), 10)
    except ValueError:
        raise ConfigError(f"{source}: {_one_line(raw)} is not {what}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{source}: must be {bound}, not {value}")
    return value


def parse_port(raw, source):
    return parse_int(raw, source, minimum=0, maximum=65535, what="a TCP port number")


def parse_max_spans(raw, source):
    return parse_int(raw, source, minimum=1, what="a whole number of spans")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw, source):
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{source}: {_one_line(raw)} is not a boolean (use 1/0, true/false)")


def parse_text(raw, source):
    if not raw.strip():
        raise ConfigError(f"{source}: empty value")
    return raw.strip()


PARSERS = {
    "detail": parse_detail,
    "slow_threshold": parse_threshold,
    "exporters": parse_exporters,
    "output": parse_output,
    "service_name": parse_text,
    "prometheus_port": parse_port,
    "prometheus_host": parse_text,
    "max_spans": parse_max_spans,
    "summary": parse_bool,
    "children": parse_bool,
    "profile": parse_output,
    "overwrite": parse_bool,
}

def check_output(paths, source, overwrite):
    """Files about to be written at exit: their directory must exist and be
    writable, and none may exist yet unless ``overwrite`` -- said now, in one
    line naming the setting, rather than after the program ran."""
    for path in paths:
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ConfigError(f"{source}: directory {directory!r} does not exist")
        if not os.access(directory, os.W_OK):
            raise ConfigError(f"{source}: directory {directory!r} is not writable")
        if os.path.lexists(path) and not overwrite:
            raise ConfigError(f"{source}: {path!r} exists; pass --overwrite (or "
                              f"TRACESOCK_OVERWRITE=1) to replace it")


TLS_ENGINES = ("native", "bio")


def check_tls_engine(environ=None):
    """``TRACESOCK_TLS_ENGINE`` (read by ``instrument()``): empty, or a known engine."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TRACESOCK_TLS_ENGINE", "")
    if raw.strip() and raw.strip().lower() not in TLS_ENGINES:
        raise ConfigError(f"TRACESOCK_TLS_ENGINE: unknown engine {_one_line(raw)} "
                          f"(choose from {', '.join(TLS_ENGINES)})")


DISABLED_ENV = "TRACESOCK_DISABLED"


def disabled(environ=None):
    """``TRACESOCK_DISABLED`` set to a true value: tracesock does nothing at all."""
    environ = os.environ if environ is None else environ
    raw = environ.get(DISABLED_ENV, "")
    return bool(raw.strip()) and parse_bool(raw, DISABLED_ENV)


def from_env(environ=None, base=None):
    """Settings from ``TRACESOCK_*`` variables (an empty variable counts as unset)."""
    environ = os.environ if environ is None else environ
    settings = base or Settings()
    changes, sources = {}, dict(settings.sources)
    for var, name in ENV.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        changes[name] = PARSERS[name](raw, var)
        sources[name] = var
    return replace(settings, **changes, sources=sources)


def override(settings, **values):
    """Apply already-parsed values (``None`` = not given); ``values`` maps field -> (value, source)."""
    changes, sources = {}, dict(settings.sources)
    for name, given in values.items():
        if given is None:
            continue
        value, source = given
        changes[name] = value
        sources[name] = source
    return replace(settings, **changes, sources=sources)


def replace_output(settings, output):
    return replace(settings, output=output)


def to_env(settings):
    """The ``TRACESOCK_*`` variables that reproduce ``settings`` in a child process."""
    out = {
        "TRACESOCK_DETAIL": settings.detail,
        "TRACESOCK_SLOW_THRESHOLD": "none" if settings.slow_threshold is None else repr(settings.slow_threshold),
        "TRACESOCK_EXPORTER": ",".join(settings.exporters),
        "TRACESOCK_OUTPUT": settings.output,
        "TRACESOCK_MAX_SPANS": str(settings.max_spans),
        "TRACESOCK_SUMMARY": "1" if settings.summary else "0",
        "TRACESOCK_CHILDREN": "1" if settings.children else "0",
        "TRACESOCK_OVERWRITE": "1" if settings.overwrite else "0",
    }
    if settings.service_name:
        out["TRACESOCK_SERVICE_NAME"] = settings.service_name
    return out


def check_otel_env(environ=None, exporters=()):
    """The standard OpenTelemetry variables tracesock relies on, checked up front.

    The SDK would log a warning and fall back to a default for these; a
    command-line tool stops instead, naming the variable.
    """
    environ = os.environ if environ is None else environ
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: unknown sampler {_one_line(sampler)} "
                          f"(choose from {', '.join(SAMPLERS)})")
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "")
        if arg.strip():
            try:
                rate = float(arg)
            except ValueError:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {_one_line(arg)} is not a number") from None
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: sampling ratio must be between 0 and 1, not {arg}")
    if "otlp" in exporters:
        otlp_protocol(environ)


def otlp_protocol(environ=None):
    environ = os.environ if environ is None else environ
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = environ.get(var, "").strip()
        if raw:
            if raw.lower() not in OTLP_PROTOCOLS:
                raise ConfigError(f"{var}: unsupported OTLP protocol {_one_line(raw)} "
                                  f"(choose from {', '.join(OTLP_PROTOCOLS)})")
            return raw.lower()
    return "http/protobuf"


# --- metrics: the standard OTEL_* variables of the metric exporters ---------

METRICS_EXPORTERS = ("otlp", "console", "prometheus", "none")
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
EXEMPLAR_FILTERS = ("trace_based", "always_on", "always_off")


@dataclass(frozen=True)
class MetricsSettings:
    """Where ``tracesock run`` pushes its metrics, from the standard variables."""
    exporters: tuple = ()  # of METRICS_EXPORTERS, without "none"
    interval_ms: float = 60000.0  # OTEL_METRIC_EXPORT_INTERVAL
    timeout_ms: float = 30000.0  # OTEL_METRIC_EXPORT_TIMEOUT
    protocol: str = "http/protobuf"  # OTLP's
    temporality: str = "cumulative"
    exemplar_filter: str = "trace_based"
    prometheus_port: int = 9464  # OTEL_METRICS_EXPORTER=prometheus: OTEL_EXPORTER_PROMETHEUS_PORT
    prometheus_host: str = "localhost"


def _milliseconds(environ, var, default):
    raw = environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{var}: {_one_line(raw)} is not a number of milliseconds") from None
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ConfigError(f"{var}: must be a number of milliseconds > 0, not {_one_line(raw)}")
    return value


def _choice(environ, var, choices, default, what):
    raw = environ.get(var, "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise ConfigError(f"{var}: unknown {what} {_one_line(raw)} (choose from {', '.join(choices)})")
    return raw.lower()


def metrics_settings(environ=None, exporters=()):
    """:class:`MetricsSettings` from ``OTEL_METRICS_EXPORTER`` & co.; ConfigError naming a bad one.

    ``OTEL_METRICS_EXPORTER`` unset: metrics go over OTLP when the traces do
    (``--exporter otlp``), else nowhere (a scrape endpoint is ``--prometheus-port``).
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("OTEL_METRICS_EXPORTER", "").strip()
    if raw:
        names = []
        for name in raw.split(","):
            name = name.strip().lower()
            if name not in METRICS_EXPORTERS:
                raise ConfigError(f"OTEL_METRICS_EXPORTER: unknown metrics exporter {_one_line(name)} "
                                  f"(choose from {', '.join(METRICS_EXPORTERS)})")
            if name not in names:
                names.append(name)
        if "none" in names and len(names) > 1:
            raise ConfigError("OTEL_METRICS_EXPORTER: 'none' cannot be combined with other exporters")
        names = tuple(n for n in names if n != "none")
    else:
        names = ("otlp",) if "otlp" in exporters else ()
    protocol = "http/protobuf"
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            if environ.get(var, "").strip():
                protocol = _choice(environ, var, OTLP_PROTOCOLS, protocol, "OTLP protocol")
                break
    port = environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip()
    return MetricsSettings(
        exporters=names,
        interval_ms=_milliseconds(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60000.0),
        timeout_ms=_milliseconds(environ, "OTEL_METRIC_EXPORT_TIMEOUT", 30000.0),
        protocol=protocol,
        temporality=_choice(environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", TEMPORALITIES,
                            "cumulative", "temporality preference"),
        exemplar_filter=_choice(environ, "OTEL_METRICS_EXEMPLAR_FILTER", EXEMPLAR_FILTERS,
                                "trace_based", "exemplar filter"),
        prometheus_port=parse_port(port, "OTEL_EXPORTER_PROMETHEUS_PORT") if port else 9464,
        prometheus_host=environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost",
    )
