"""Health: pure state (``state``) and the I/O that feeds it (``probes``, ``checker``)."""
