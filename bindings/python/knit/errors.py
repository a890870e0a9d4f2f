"""Exceptions, one class per status family, derived at import time from libknit's own status
table (``knit_status_name`` / ``knit_status_family``): nothing here repeats a code."""

import enum

from ._native import ffi, lib


def _text(p):
    return ffi.string(p).decode("utf-8", "replace")


def _table():
    rows = {}
    # Codes are small and stable; the table has no gaps above its last row worth scanning for.
    for code in range(0, 256):
        name = _text(lib.knit_status_name(code))
        if name != "UNKNOWN":
            rows[name] = code
    return rows


#: Every status code, by name: ``Status.TIMEOUT == 4``.
Status = enum.IntEnum("Status", _table())


class KnitError(Exception):
    """A failed knit call. ``status`` (a :class:`Status`), ``family``, ``message``, and for an
    invocation that failed on every server, ``result``: the io.Connect-shaped result (a dict)."""

    def __init__(self, status, message=None, result=None):
        self.status = Status(status) if status in Status._value2member_map_ else status
        self.family = _text(lib.knit_status_family(status))
        self.message = message or _text(lib.knit_status_string(status))
        self.result = result
        super().__init__(self.message)


class UsageError(KnitError):
    """INVALID_ARGUMENT, CLOSED: the caller used the API wrongly."""


class NotFoundError(KnitError):
    """NO_SERVER, NOT_FOUND."""


class KnitTimeoutError(KnitError):
    """TIMEOUT, BUSY."""


class RemoteError(KnitError):
    """METHOD_FAILED, PEER_LEFT: the server failed or went away."""


class KnitConnectionError(KnitError):
    """GATEWAY_UNREACHABLE, DISCONNECTED, PROTOCOL, ALREADY_RUNNING."""


class KnitPermissionError(KnitError):
    """PERMISSION_DENIED."""


class InputError(KnitError):
    """BAD_INPUT, PAYLOAD_TOO_LARGE, ALREADY_EXISTS."""


class InternalError(KnitError):
    """INTERNAL (a bug in knit) and codes this binding does not know."""


FAMILIES = {
    "usage": UsageError,
    "not_found": NotFoundError,
    "timeout": KnitTimeoutError,
    "remote": RemoteError,
    "connection": KnitConnectionError,
    "permission": KnitPermissionError,
    "input": InputError,
    "internal": InternalError,
}


def error_class(status):
    """The exception class for a status code (by its family in the status table)."""
    return FAMILIES.get(_text(lib.knit_status_family(status)), InternalError)


def last_error():
    return _text(lib.knit_last_error_message())


def check(status, result=None):
    """Raises the family's exception unless ``status`` is OK."""
    if status != 0:
        raise error_class(status)(status, last_error(), result)
