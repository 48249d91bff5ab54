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
    """``HTTPTransport`` whose receiver refuses anything but tensors and plain containers."""

    @classmethod
    def _load_from_address(cls, address: str, timeout: timedelta) -> object:
        with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
            return _streaming_load(f, weights_only=True)
