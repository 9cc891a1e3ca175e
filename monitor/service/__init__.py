"""The monitoring service: FastAPI app factory, routes, ingest, sinks, metrics and its CLI."""
