"""The heal transfer: torchft's HTTP checkpoint transport, loading without pickle.

torchft's ``HTTPTransport`` streams the state dict with torch's streaming serializer and loads it with
``weights_only=False`` (it allows arbitrary pickled objects, e.g. LR schedulers). Our healing state holds only
tensors, ints and strings (``elastic.ft.state``), so the receiver loads with ``weights_only=True``: a peer can send
tensors, not code.
"""

from __future__ import annotations

import logging
import urllib.request
from datetime import timedelta

from torchft.checkpointing._serialization import _streaming_load
from torchft.checkpointing.http_transport import HTTPTransport

log = logging.getLogger("ecpt")


class SafeHTTPTransport(HTTPTransport):
    """``HTTPTransport`` whose receiver refuses anything but tensors and plain containers, and whose address names
    ``host`` (torchft's names ``socket.gethostname()``, which other pods of a Kubernetes job cannot resolve)."""

    def __init__(self, host: str, **kwargs) -> None:
        self.host = host  # before the base class starts its server and logs address()
        super().__init__(**kwargs)

    def address(self) -> str:
        port = self._server.socket.getsockname()[1]
        return f"http://{self.host}:{port}/checkpoint/"

    @classmethod
    def _load_from_address(cls, address: str, timeout: timedelta) -> object:
        with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
            return _streaming_load(f, weights_only=True)
