"""Runnable examples of rayexec (`python examples/<name>.py`). A package so that
tests, and Ray workers (which get the driver's working directory on sys.path),
can import their worker classes as `examples.<name>.<Class>`."""
