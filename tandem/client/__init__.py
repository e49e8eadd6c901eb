"""The replica-aware client: service-to-service callers reach a tandem cluster without a
proxy. Each request goes straight to the server its session token names; when that server
is gone it goes to the session's secondary, then to any live server of the cluster view the
client learns from the backends (docs/client.md).

    from tandem.client import Cluster, TandemTransport      # httpx (sync)
    from tandem.client import AsyncTandemTransport          # httpx (async)
    from tandem.client import TandemAdapter                 # requests

`Cluster` needs nothing beyond tandem; the transports need httpx and the adapter requests
(`pip install 'tandem-proxy[client]'`), imported only when first named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .attempts import REQUEST_ID_HEADER, Attempts, new_request_id
from .cluster import Cluster, Target
from .errors import ClientError, ClusterSpecError, MissingDependency, NoServerAvailable
from .policy import IDEMPOTENT, Failure, may_retry
from .tokens import read_route, route_of_request

if TYPE_CHECKING:
    from .httpx_transport import AsyncTandemTransport, TandemTransport
    from .requests_adapter import TandemAdapter

__all__ = ["Cluster", "Target", "TandemTransport", "AsyncTandemTransport", "TandemAdapter",
           "Attempts", "REQUEST_ID_HEADER", "new_request_id", "IDEMPOTENT", "Failure",
           "may_retry", "read_route", "route_of_request", "ClientError", "ClusterSpecError",
           "MissingDependency", "NoServerAvailable"]

_LAZY = {"TandemTransport": ".httpx_transport", "AsyncTandemTransport": ".httpx_transport",
         "TandemAdapter": ".requests_adapter"}


def __getattr__(name: str) -> Any:
    """The library-bound classes, imported when first named (MissingDependency if their
    library is not installed)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
