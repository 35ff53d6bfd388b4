"""The bottom layer: what happens on the socket, as plain data.  No OpenTelemetry.

Modules here import only from each other (and the C extension, through
``speedups``).  The layers above: ``telemetry`` -> ``sockets`` -> ``patching``
-> the ways in and out (docs/architecture.md).
"""
