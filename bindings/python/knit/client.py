"""The client: connect, register methods, invoke, poll. Values travel as JSON (``json``
module), raw bytes through :meth:`Client.invoke_bytes` / :meth:`Client.register_bytes`."""

import json
import threading

from . import pubsub
from ._native import ffi, lib
from .errors import UsageError, check, error_class, last_error

CONNECT_POLL = lib.KNIT_CONNECT_POLL
CONNECT_SPIN = lib.KNIT_CONNECT_SPIN
CONNECT_PARK = lib.KNIT_CONNECT_PARK
DEFAULT_WAIT_MS = lib.KNIT_DEFAULT_WAIT_MS

# Looked up now, not in __del__: a first lookup of a cffi `lib` attribute takes cffi's
# non-reentrant lock, which a garbage collection may interrupt (see pubsub.py).
_reply_error = lib.knit_reply_error


def _c(s):
    return ffi.NULL if s is None else s.encode("utf-8")


def _take_string(p):
    """Copies and frees a string knit returned (NULL gives None)."""
    if p == ffi.NULL:
        return None
    try:
        return ffi.string(p).decode("utf-8")
    finally:
        lib.knit_string_free(p)


class Reply:
    """The answer to one incoming call: call :meth:`ok`, :meth:`bytes` or :meth:`error` once,
    now or later, from any thread. A reply dropped unanswered answers with the error "method
    handler did not reply" (as the Rust API's ``Responder`` does)."""

    __slots__ = ("_h", "_lock")

    def __init__(self, handle):
        self._h = handle
        self._lock = threading.Lock()

    @property
    def answered(self):
        return self._h is None

    def _finish(self, st):
        if st in (0, lib.KNIT_CLOSED):
            self._h = None
        check(st)

    def ok(self, value=None):
        """Answers with a JSON-serialisable value."""
        text = json.dumps(value)
        with self._lock:
            self._finish(lib.knit_reply_ok(self._handle(), text.encode("utf-8")))

    def bytes(self, data):
        """Answers with raw bytes."""
        data = bytes(data)
        with self._lock:
            self._finish(lib.knit_reply_bytes(self._handle(), data, len(data)))

    def error(self, message, context=None):
        """Answers with an error message and optional JSON-serialisable context."""
        ctx = ffi.NULL if context is None else json.dumps(context).encode("utf-8")
        with self._lock:
            self._finish(lib.knit_reply_error_ex(self._handle(), str(message).encode("utf-8"), ctx))

    def _handle(self):
        if self._h is None:
            raise UsageError(lib.KNIT_CLOSED, "this reply was already answered")
        return self._h

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None:
            self._h = None
            _reply_error(h, b"method handler did not reply")


def _handlers_running():
    """The clients whose method handlers run on this thread, innermost last (a poll-mode
    client's handler may poll another client, whose handler runs inside it)."""
    running = getattr(pubsub._tls, "handlers_of", None)
    if running is None:
        running = pubsub._tls.handlers_of = []
    return running


class Client:
    """A connection to the gateway (``gateway=None``: ``$KNIT_GATEWAY`` or the default path).

    ``poll=True``: no dispatcher thread; handlers run inside :meth:`poll`. ``wait``: ``"spin"``
    or ``"park"`` (default: spin briefly, then sleep). Handlers run on knit's dispatcher thread
    (holding the GIL while they run); calls into knit release the GIL.
    """

    def __init__(self, application, gateway=None, *, poll=False, wait=None, instance=None):
        flags = CONNECT_POLL if poll else 0
        if wait == "spin":
            flags |= CONNECT_SPIN
        elif wait == "park":
            flags |= CONNECT_PARK
        elif wait is not None:
            raise ValueError("wait must be 'spin', 'park' or None")
        out = ffi.new("knit_client_t **")
        check(lib.knit_client_connect_ex(_c(gateway), _c(application), _c(instance), flags, 0, out))
        self._h = out[0]
        self._lock = threading.Lock()
        # Callbacks and their user data must outlive every call knit may make into them: they
        # are kept until close (unregister may run inside the handler it removes).
        self._keep = {}
        self._retired = []
        # Open subscriptions and streams: they live until closed or until the client closes.
        self._live = set()

    # ----- lifetime ---------------------------------------------------------------------------

    def close(self):
        """Closes the connection (idempotent). Afterwards none of its handlers runs."""
        with self._lock:
            h, self._h = self._h, None
        if h is not None:
            check(lib.knit_client_close(h))
        if any(c is self for c in getattr(pubsub._tls, "handlers_of", ())):
            # Closing from inside one of our method handlers, which is still running on this
            # thread (perhaps under another client's handler, in poll mode): its cffi callback
            # must outlive it (freeing a callback while it runs would crash), so the handlers,
            # those unregistered meanwhile too, are kept for good (rare).
            pubsub._orphans.append(dict(self._keep))
            pubsub._orphans.append(list(self._retired))
        running = getattr(pubsub._tls, "running", None)
        for x in list(self._live):  # closed with the client: forget their handles
            if x is running:  # closing from inside its callback: keep that alive
                pubsub._orphans.append(x._cbs)
            x._h = None
            x._cbs = None
        self._live.clear()
        self._keep.clear()
        self._retired.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing useful to report
                pass

    @property
    def handle(self):
        """The raw ``knit_client_t *`` (NULL once closed)."""
        return self._h if self._h is not None else ffi.NULL

    def _open(self):
        """The raw handle for a call into knit; a closed client raises ``CLOSED`` (a
        :class:`UsageError`), as a closed handle does in C."""
        h = self._h
        if h is None:
            raise UsageError(lib.KNIT_CLOSED, "the client is closed")
        return h

    # ----- registering ------------------------------------------------------------------------

    def register(self, name, handler):
        """Registers ``handler(args, caller) -> result`` (JSON values; ``caller`` is a dict).
        An exception answers with its message as the error."""

        def run(args, caller, reply):
            reply.ok(handler(args, caller))

        self.register_async(name, run)

    def register_async(self, name, handler):
        """Registers ``handler(args, caller, reply)``: answer through the :class:`Reply`, now or
        later (keep it), from any thread."""

        @ffi.callback("knit_method_fn")
        def trampoline(_ud, args, caller, reply_h):
            reply = Reply(reply_h)
            self._run_handler(
                reply, lambda: handler(json.loads(ffi.string(args)), json.loads(ffi.string(caller)), reply)
            )

        self._add(name, trampoline, lambda: lib.knit_register(self._open(), _c(name), trampoline, ffi.NULL))

    def register_bytes(self, name, handler):
        """Registers ``handler(data: bytes, caller) -> bytes`` for raw-bytes calls (``data`` is
        the arguments' JSON text when the caller did not send bytes)."""

        @ffi.callback("knit_bytes_method_fn")
        def trampoline(_ud, data, n, caller, reply_h):
            reply = Reply(reply_h)
            self._run_handler(
                reply, lambda: reply.bytes(handler(bytes(ffi.buffer(data, n)), json.loads(ffi.string(caller))))
            )

        self._add(name, trampoline, lambda: lib.knit_register_bytes(self._open(), _c(name), trampoline, ffi.NULL))

    def _run_handler(self, reply, call):
        """Runs one of our method handlers (``call``) on this thread, marked as running there
        (see :meth:`close`); an exception answers the call with its message as the error."""
        running = _handlers_running()
        running.append(self)
        try:
            call()
        except Exception as e:
            if not reply.answered:
                try:
                    reply.error(str(e) or type(e).__name__)
                except Exception:
                    pass
        finally:
            running.pop()

    def _add(self, name, cb, do_register):
        check(do_register())
        self._keep[name] = cb

    def unregister(self, name):
        """Removes one of our methods; when this returns its handler is not running."""
        check(lib.knit_unregister(self._open(), _c(name)))
        cb = self._keep.pop(name, None)
        if cb is not None:
            self._retired.append(cb)

    # ----- invoking ---------------------------------------------------------------------------

    def invoke(self, method, args=None, target=None, wait_ms=DEFAULT_WAIT_MS, timeout_ms=0):
        """Invokes ``method`` and returns the io.Connect-shaped result (a dict with
        ``returned``, ``executed_by``, …). ``target``: None/"best", "all", "skip-mine", an
        application name, or an instance filter dict (or a list of them). Raises the status
        family's exception; when every server failed its ``result`` holds the result dict."""
        if isinstance(target, (dict, list)):
            target = json.dumps(target)
        out = ffi.new("char **")
        st = lib.knit_invoke_ex(
            self._open(),
            _c(method),
            json.dumps({} if args is None else args).encode("utf-8"),
            _c(target),
            wait_ms,
            timeout_ms,
            out,
        )
        message = last_error() if st != 0 else None
        text = _take_string(out[0])
        result = json.loads(text) if text is not None else None
        if st != 0:
            raise error_class(st)(st, message, result)
        return result

    def invoke_bytes(self, method, data, target=None, wait_ms=DEFAULT_WAIT_MS, timeout_ms=0):
        """Sends raw bytes; returns the server's bytes (or its result's JSON text, encoded)."""
        data = bytes(data)
        out = ffi.new("uint8_t **")
        n = ffi.new("size_t *")
        check(lib.knit_invoke_bytes(self._open(), _c(method), data, len(data), _c(target), wait_ms, timeout_ms, out, n))
        try:
            return bytes(ffi.buffer(out[0], n[0]))
        finally:
            lib.knit_bytes_free(out[0])

    # ----- contexts, bus, streams, events -----------------------------------------------------

    @property
    def contexts(self):
        """Shared contexts: ``client.contexts.get/set/update/update_if/set_path/set_paths/
        destroy/all/subscribe`` (see :class:`knit.pubsub.Contexts`)."""
        return pubsub.Contexts(self)

    @property
    def channels(self):
        """Colour channels: ``client.channels.list/get/set_mode/join/leave/joined/publish/
        publish_fdc3/subscribe/subscribe_for/on_changed`` (see :class:`knit.pubsub.Channels`)."""
        return pubsub.Channels(self)

    def publish(self, topic, data, routing_key=None, target=None):
        """Publishes a JSON-serialisable value on ``topic``. ``routing_key``: only subscribers
        that used it (or none) get it; ``target``: an identity filter dict of subscribers."""
        pubsub.publish(self, topic, data, routing_key, target)

    def publish_batch(self, topic, items, routing_key=None, target=None):
        """Publishes every value of the list ``items`` on ``topic``, in order, each as if
        published on its own, for the cost of one publish; a bad item refuses the whole batch."""
        pubsub.publish_batch(self, topic, items, routing_key, target)

    def subscribe(self, topic, callback, routing_key=None, source=None):
        """Calls ``callback(message)`` (a :class:`knit.Message`: topic, data, source) for each
        message on ``topic`` (or a pattern: ``*`` one segment, ``>`` the rest). ``source``: an
        identity filter dict of publishers. Returns a :class:`knit.Subscription`."""
        return pubsub.subscribe(self, topic, callback, routing_key, source)

    def on_event(self, callback):
        """Calls ``callback(event)`` (a dict with ``type``: serverAdded, serverRemoved,
        methodAdded, methodRemoved, serverMethodAdded, serverMethodRemoved) for what exists now
        and every change. Returns a :class:`knit.Subscription`."""
        return pubsub.on_event(self, callback)

    def create_stream(self, name, on_request=None, *, policy=None, block_ms=None,
                      conflate_key=None, queue=None, definition=None):
        """Serves a stream. ``on_request(request)`` (a :class:`knit.StreamRequest`) decides
        each subscription (None: accept all on the default branch); ``policy``: "block"
        (default), "drop-oldest" or "conflate" (with ``conflate_key``); ``queue``: items per
        subscriber. Returns a :class:`knit.Stream`."""
        return pubsub.create_stream(self, name, on_request, policy, block_ms, conflate_key, queue,
                                    definition)

    def subscribe_stream(self, name, on_data, on_closed=None, *, args=None, target=None,
                         wait_ms=DEFAULT_WAIT_MS, timeout_ms=0):
        """Subscribes to a stream: ``on_data(item)`` (a :class:`knit.StreamItem`) per item,
        ``on_closed(reason, server_initiated)`` when the server side ends it. Returns once a
        server accepted (RemoteError when rejected) a :class:`knit.Subscription`."""
        return pubsub.subscribe_stream(self, name, on_data, on_closed, args, target, wait_ms,
                                       timeout_ms)

    # ----- the rest ---------------------------------------------------------------------------

    def poll(self, timeout_ms=0):
        """Poll mode: runs pending handlers on this thread; returns how many ran."""
        n = ffi.new("uint32_t *")
        check(lib.knit_client_poll(self._open(), timeout_ms, n))
        return n[0]

    def _json(self, f):
        out = ffi.new("char **")
        st = f(self._open(), out)
        text = _take_string(out[0])
        check(st)
        return json.loads(text)

    def methods(self):
        """Every method known, as ``knit methods --json`` prints them."""
        return self._json(lib.knit_methods)

    def servers(self):
        """Every peer known, ourselves first."""
        return self._json(lib.knit_servers)

    @property
    def instance(self):
        """Our identity: ``{application, instance, pid, user, machine, peerId}``."""
        return self._json(lib.knit_client_instance)

    @property
    def connected(self):
        return lib.knit_client_connected(self.handle) == 0

    @property
    def max_payload(self):
        n = ffi.new("uint64_t *")
        check(lib.knit_client_max_payload(self._open(), n))
        return n[0]

    def wait_for_method(self, name, timeout_ms):
        """The method (as in :meth:`methods`) once it has a server, or None after the timeout."""
        out = ffi.new("char **")
        st = lib.knit_wait_for_method(self._open(), _c(name), timeout_ms, out)
        text = _take_string(out[0])
        if st == lib.KNIT_NO_SERVER:
            return None
        check(st)
        return json.loads(text)
