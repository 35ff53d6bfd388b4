"""The second layer: core's records as OpenTelemetry spans and metrics.

``recorder`` is the one way to emit spans (``Recorder.qualifies``,
``Recorder.deliver``, ``Recorder.call_span``); ``metrics`` hands the
aggregates to a MeterProvider at collection time; ``profile`` keeps socket
time by Python stack.  Nothing here patches anything.
"""
