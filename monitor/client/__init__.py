"""The client shim that runs inside the training job (imports torch, never the service)."""

from monitor.client.handle import AlertRaised, Monitor, watch

__all__ = ["AlertRaised", "Monitor", "watch"]
