"""apmon: exact activation-pattern statistics and APT probes for PyTorch ReLU networks.

``monitor.watch`` is imported lazily so that the service side (which never imports torch) can
use the rest of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from monitor.client.handle import Monitor, watch

__all__ = ["Monitor", "watch"]


def __getattr__(name: str) -> Any:
    if name in ("watch", "Monitor"):
        from monitor.client import handle

        return getattr(handle, name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
