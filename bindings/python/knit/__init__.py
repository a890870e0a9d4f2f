"""knit for Python: io.Connect-style interop methods over shared memory, through libknit's C
ABI (cffi, ABI mode).

>>> import knit
>>> with knit.Client("pricer") as server, knit.Client("blotter") as client:
...     server.register("Price", lambda args, caller: {"symbol": args["symbol"], "bid": 101.25})
...     r = client.invoke("Price", {"symbol": "VOD.L"})
...     r["returned"]["bid"]
101.25
"""

from ._native import ffi, lib
from .client import CONNECT_PARK, CONNECT_POLL, CONNECT_SPIN, DEFAULT_WAIT_MS, Client, Reply
from .pubsub import (
    ChannelUpdate,
    Channels,
    ContextUpdate,
    Contexts,
    Message,
    Stream,
    StreamItem,
    StreamRequest,
    StreamSubscriber,
    Subscription,
)
from .errors import (
    FAMILIES,
    InputError,
    InternalError,
    KnitConnectionError,
    KnitError,
    KnitPermissionError,
    KnitTimeoutError,
    NotFoundError,
    RemoteError,
    Status,
    UsageError,
    error_class,
)

__version__ = ffi.string(lib.knit_version()).decode()

__all__ = [
    "Client",
    "Reply",
    "Subscription",
    "Contexts",
    "Channels",
    "ChannelUpdate",
    "ContextUpdate",
    "Message",
    "Stream",
    "StreamItem",
    "StreamRequest",
    "StreamSubscriber",
    "Status",
    "KnitError",
    "UsageError",
    "NotFoundError",
    "KnitTimeoutError",
    "RemoteError",
    "KnitConnectionError",
    "KnitPermissionError",
    "InputError",
    "InternalError",
    "FAMILIES",
    "error_class",
    "CONNECT_POLL",
    "CONNECT_SPIN",
    "CONNECT_PARK",
    "DEFAULT_WAIT_MS",
    "ffi",
    "lib",
]
