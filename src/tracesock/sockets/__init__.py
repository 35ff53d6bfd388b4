"""The third layer: the traced methods, built on ``core`` and reporting to ``telemetry``.

``methods`` (``socket.socket``'s data methods and the C fast path's glue),
``dns`` (name resolution and ``socket.create_connection``) and ``tls``
(``ssl.SSLSocket``'s calls and their wire level).  Each declares what it
replaces as data (``METHODS``, ``replacements()``); only ``patching``
installs it.
"""
