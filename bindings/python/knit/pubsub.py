"""Subscriptions, shared contexts, the bus, streams and discovery events.

Callbacks run on knit's dispatcher thread (or inside :meth:`knit.Client.poll` for a poll-mode
client), one at a time. An exception raised in a callback is printed to stderr and goes no
further (nobody waits for a callback's result)."""

import collections
import json
import threading
import traceback

from ._native import ffi, lib
from .errors import UsageError, check

#: One change of a context, as :meth:`Contexts.subscribe` callbacks get it.
ContextUpdate = collections.namedtuple(
    "ContextUpdate", "name data delta removed version updater first conflated"
)
#: One change of a channel: ``data`` (the latest FDC3 context decoded as ``data["fdc3"]``), the
#: whole channel ``context`` ``{name, meta, data}`` and the context ``version``.
ChannelUpdate = collections.namedtuple("ChannelUpdate", "channel data context version")
#: One bus message.
Message = collections.namedtuple("Message", "topic data source")
#: One stream item: ``private`` when pushed to this subscriber alone, ``gap`` = items the
#: stream's slow-consumer policy dropped before it.
StreamItem = collections.namedtuple("StreamItem", "data server private gap")

# Functions that __del__ methods call, looked up now: a first lookup of a cffi `lib` attribute
# takes cffi's (non-reentrant) lock, and a garbage collection can run a __del__ while this
# thread already holds it (inside ffi.callback, say), which would deadlock.
_stream_subscriber_free = lib.knit_stream_subscriber_free
_stream_reject = lib.knit_stream_reject

_tls = threading.local()
# Callbacks closed from inside themselves after their client closed: kept for good (rare).
_orphans = []


def _c(s):
    return ffi.NULL if s is None else s.encode("utf-8")


def _text(p):
    return ffi.string(p).decode("utf-8")


def _json_text(v):
    return json.dumps(v, separators=(",", ":")).encode("utf-8")


def _take_json(p):
    if p == ffi.NULL:
        return None
    try:
        return json.loads(ffi.string(p).decode("utf-8"))
    finally:
        lib.knit_string_free(p)


def _run(owner, f, *args):
    """Runs a user callback for ``owner`` (a Subscription or Stream); exceptions stop here."""
    outer = getattr(_tls, "running", None)
    _tls.running = owner
    try:
        f(*args)
    except Exception:  # nobody to report to but stderr
        traceback.print_exc()
    finally:
        _tls.running = outer


def _retire(client, owner, cbs):
    """Drops the cffi callbacks of a closed subscription or stream — unless it was closed from
    inside its own callback, which is still running on this thread: then they are kept until
    the client closes (freeing a callback while it runs would crash)."""
    if getattr(_tls, "running", None) is owner:
        if client is not None and client._h is not None:
            client._retired.append(cbs)
        else:
            _orphans.append(cbs)


class Subscription:
    """A subscription (context, topic, stream or discovery events). It lives until
    :meth:`close` (or the end of a ``with`` block) or until its client closes — dropping the
    object does not end it (its client keeps it). After :meth:`close` its callback is not
    running and is not called again. Closing it from inside its own callback is fine."""

    __slots__ = ("_h", "_cbs", "_client", "__weakref__")

    def __init__(self, client):
        self._client = client
        self._h = None
        self._cbs = None

    @property
    def is_open(self):
        return self._h is not None

    def close(self):
        """Ends the subscription (idempotent; harmless after its client closed)."""
        h, self._h = self._h, None
        if h is None:
            return
        lib.knit_subscription_close(h)  # KNIT_CLOSED once the client closed: fine
        cbs, self._cbs = self._cbs, None
        self._client._live.discard(self)
        _retire(self._client, self, cbs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Contexts:
    """Shared contexts of a client (``client.contexts``): named JSON objects every app sees,
    with versions."""

    def __init__(self, client):
        self._client = client

    def get(self, name):
        """The context's data (``{}`` when it does not exist)."""
        return self.get_with_version(name)[0]

    def get_with_version(self, name):
        """``(data, version)``; version 0 when the context does not exist."""
        out = ffi.new("char **")
        v = ffi.new("uint64_t *")
        st = lib.knit_context_get_ex(self._client._open(), _c(name), out, v)
        data = _take_json(out[0])
        check(st)
        return data, v[0]

    def _write(self, f, *args):
        v = ffi.new("uint64_t *")
        check(f(self._client._open(), *args, v))
        return v[0]

    def set(self, name, data):
        """Replaces the whole value (a dict); returns the version after."""
        return self._write(lib.knit_context_set_ex, _c(name), _json_text(data))

    def update(self, name, delta):
        """Merges top-level keys (``None`` removes one); returns the version after."""
        return self._write(lib.knit_context_update_ex, _c(name), _json_text(delta))

    def update_if(self, name, version, delta):
        """:meth:`update` only while the context is at ``version``; else raises InputError
        (``Status.ALREADY_EXISTS``)."""
        v = ffi.new("uint64_t *")
        check(lib.knit_context_update_if(self._client._open(), _c(name), version, _json_text(delta), v))
        return v[0]

    def set_path(self, name, path, value):
        """Sets one dotted path (``"a.b.c"``); ``None`` removes the leaf."""
        v = ffi.new("uint64_t *")
        check(lib.knit_context_set_path(self._client._open(), _c(name), _c(path), _json_text(value), v))
        return v[0]

    def set_paths(self, name, paths):
        """Sets several paths in one version: a dict ``{path: value}`` or ``[(path, value)]``."""
        if not isinstance(paths, dict):
            paths = [list(p) for p in paths]
        return self._write(lib.knit_context_set_paths, _c(name), _json_text(paths))

    def destroy(self, name):
        check(lib.knit_context_destroy(self._client._open(), _c(name)))

    def all(self):
        """Every context name."""
        out = ffi.new("char **")
        st = lib.knit_context_list(self._client._open(), out)
        names = _take_json(out[0])
        check(st)
        return names

    def subscribe(self, name, callback):
        """Calls ``callback(update)`` (a :class:`ContextUpdate`) with the current value first
        (if the context exists), then with every change. Returns a :class:`Subscription`."""
        sub = Subscription(self._client)

        @ffi.callback("knit_context_update_fn")
        def trampoline(_ud, text):
            u = json.loads(_text(text))
            _run(sub, callback, ContextUpdate(**u))

        out = ffi.new("knit_subscription_t **")
        sub._cbs = trampoline
        check(lib.knit_context_subscribe_ex(self._client._open(), _c(name), trampoline, ffi.NULL, out))
        sub._h = out[0]
        self._client._live.add(sub)
        return sub


class StreamSubscriber:
    """One accepted subscriber of a stream we serve: :meth:`push` to it alone, or
    :meth:`close` its subscription. Dropping the object frees the handle only."""

    __slots__ = ("_h",)

    def __init__(self, h):
        self._h = h

    def push(self, data):
        """Sends a dict to this subscriber only (it sees ``private=True``)."""
        if self._h is None:
            raise UsageError(lib.KNIT_CLOSED, "this subscriber handle was closed")
        check(lib.knit_stream_subscriber_push(self._h, _json_text(data)))

    def close(self):
        """Ends this subscription."""
        h, self._h = self._h, None
        if h is not None:
            check(lib.knit_stream_subscriber_close(h))

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None:
            self._h = None
            _stream_subscriber_free(h)


class StreamRequest:
    """A subscription request: decide once, now or later (keep it), from any thread.
    ``args`` are the subscriber's arguments, ``caller`` its identity. Dropped undecided, it is
    rejected ("request was not decided")."""

    __slots__ = ("_h", "_lock", "args", "caller")

    def __init__(self, h, args, caller):
        self._h = h
        self._lock = threading.Lock()
        self.args = args
        self.caller = caller

    @property
    def decided(self):
        return self._h is None

    def _take(self):
        with self._lock:
            h, self._h = self._h, None
        if h is None:
            raise UsageError(lib.KNIT_CLOSED, "this request was already decided")
        return h

    def accept(self, branch=""):
        """Accepts on ``branch``; returns a :class:`StreamSubscriber`."""
        out = ffi.new("knit_stream_subscriber_t **")
        check(lib.knit_stream_accept(self._take(), _c(branch), out))
        return StreamSubscriber(out[0])

    def reject(self, reason=""):
        """Rejects; the subscriber's ``subscribe_stream`` raises RemoteError with the reason."""
        check(lib.knit_stream_reject(self._take(), _c(str(reason))))

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None:
            self._h = None
            _stream_reject(h, b"request was not decided")


class Stream:
    """A stream we serve (:meth:`knit.Client.create_stream`). :meth:`close` (or leaving a
    ``with`` block), or closing its client, ends every subscription and unregisters it;
    dropping the object does not (its client keeps it)."""

    def __init__(self, client):
        self._client = client
        self._h = None
        self._cbs = None

    @property
    def is_open(self):
        return self._h is not None

    def _handle(self):
        return self._h if self._h is not None else ffi.NULL

    def push(self, data):
        """Sends a dict to every subscriber."""
        check(lib.knit_stream_push(self._handle(), _json_text(data)))

    def push_batch(self, items):
        """Sends every dict of the list ``items`` to every subscriber, in order, for the cost of
        one push; a bad item refuses the whole batch."""
        check(lib.knit_stream_push_batch(self._handle(), _json_text(items)))

    def push_to_branches(self, branches, data):
        """Sends a dict to the subscribers of these branches."""
        check(lib.knit_stream_push_branches(self._handle(), _json_text(list(branches)), _json_text(data)))

    def close_branch(self, branch):
        """Ends every subscription on ``branch``."""
        check(lib.knit_stream_close_branch(self._handle(), _c(branch)))

    def _json(self, f):
        out = ffi.new("char **")
        st = f(self._handle(), out)
        v = _take_json(out[0])
        check(st)
        return v

    def branches(self):
        """Branches that have subscribers."""
        return self._json(lib.knit_stream_branches)

    def subscriptions(self):
        """Current subscriptions: ``[{branch, instance, arguments}]``."""
        return self._json(lib.knit_stream_subscriptions)

    def close(self):
        """Closes (idempotent). Afterwards its request callback is not running."""
        h, self._h = self._h, None
        if h is None:
            return
        lib.knit_stream_close(h)
        cbs, self._cbs = self._cbs, None
        self._client._live.discard(self)
        _retire(self._client, self, cbs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create_stream(client, name, on_request=None, policy=None, block_ms=None, conflate_key=None,
                  queue=None, definition=None):
    options = {}
    for k, v in (("policy", policy), ("blockMs", block_ms), ("conflateKey", conflate_key),
                 ("queue", queue), ("definition", definition)):
        if v is not None:
            options[k] = v
    stream = Stream(client)
    fn = ffi.NULL
    if on_request is not None:

        @ffi.callback("knit_stream_request_fn")
        def fn(_ud, req_h, args, caller):
            req = StreamRequest(req_h, json.loads(_text(args)), json.loads(_text(caller)))

            def decide():
                try:
                    on_request(req)
                except Exception as e:  # rejects the request, if still undecided
                    if req.decided:
                        raise
                    req.reject(str(e) or type(e).__name__)

            _run(stream, decide)

        stream._cbs = fn
    out = ffi.new("knit_stream_t **")
    check(lib.knit_stream_create(client._open(), _c(name), _json_text(options), fn, ffi.NULL, out))
    stream._h = out[0]
    client._live.add(stream)
    return stream


def subscribe_stream(client, name, on_data, on_closed=None, args=None, target=None,
                     wait_ms=None, timeout_ms=0):
    if isinstance(target, (dict, list)):
        target = json.dumps(target)
    sub = Subscription(client)

    @ffi.callback("knit_stream_data_fn")
    def data_fn(_ud, data, server, flags, gap):
        item = StreamItem(json.loads(_text(data)), json.loads(_text(server)),
                          bool(flags & lib.KNIT_STREAM_PRIVATE), gap)
        _run(sub, on_data, item)

    closed_fn = ffi.NULL
    if on_closed is not None:

        @ffi.callback("knit_stream_closed_fn")
        def closed_fn(_ud, reason, flags):
            _run(sub, on_closed, _text(reason), bool(flags & lib.KNIT_STREAM_SERVER_INITIATED))

    sub._cbs = (data_fn, closed_fn)
    out = ffi.new("knit_subscription_t **")
    check(lib.knit_stream_subscribe(
        client._open(), _c(name), _json_text({} if args is None else args), _c(target),
        lib.KNIT_DEFAULT_WAIT_MS if wait_ms is None else wait_ms, timeout_ms,
        data_fn, closed_fn, ffi.NULL, out))
    sub._h = out[0]
    client._live.add(sub)
    return sub


def subscribe(client, topic, callback, routing_key=None, source=None):
    options = {}
    if routing_key is not None:
        options["routingKey"] = routing_key
    if source is not None:
        options["source"] = source
    sub = Subscription(client)

    @ffi.callback("knit_message_fn")
    def trampoline(_ud, t, data, src):
        _run(sub, callback, Message(_text(t), json.loads(_text(data)), json.loads(_text(src))))

    sub._cbs = trampoline
    out = ffi.new("knit_subscription_t **")
    check(lib.knit_subscribe_ex(client._open(), _c(topic), _json_text(options), trampoline, ffi.NULL, out))
    sub._h = out[0]
    client._live.add(sub)
    return sub


def _publish_options(routing_key, target):
    options = {}
    if routing_key is not None:
        options["routingKey"] = routing_key
    if target is not None:
        options["target"] = target
    return _json_text(options)


def publish(client, topic, data, routing_key=None, target=None):
    options = _publish_options(routing_key, target)
    check(lib.knit_publish_ex(client._open(), _c(topic), _json_text(data), options))


def publish_batch(client, topic, items, routing_key=None, target=None):
    options = _publish_options(routing_key, target)
    check(lib.knit_publish_batch(client._open(), _c(topic), _json_text(items), options))


def on_event(client, callback):
    sub = Subscription(client)

    @ffi.callback("knit_event_fn")
    def trampoline(_ud, text):
        _run(sub, callback, json.loads(_text(text)))

    sub._cbs = trampoline
    out = ffi.new("knit_subscription_t **")
    check(lib.knit_events_subscribe(client._open(), trampoline, ffi.NULL, out))
    sub._h = out[0]
    client._live.add(sub)
    return sub


class Channels:
    """Colour channels of a client (``client.channels``)."""

    SINGLE = lib.KNIT_CHANNEL_SINGLE
    MULTI = lib.KNIT_CHANNEL_MULTI

    def __init__(self, client):
        self._client = client

    def _json(self, f, *args):
        out = ffi.new("char **")
        st = f(self._client._open(), *args, out)
        v = _take_json(out[0])
        check(st)
        return v

    def list(self):
        """Every channel: ``[{name, meta, data}]``."""
        return self._json(lib.knit_channel_list)

    def get(self, name):
        """One channel ``{name, meta, data}`` (NotFoundError when there is none)."""
        return self._json(lib.knit_channel_get, _c(name))

    def set_mode(self, mode):
        """``Channels.SINGLE`` (joining replaces) or ``Channels.MULTI`` (joining adds)."""
        check(lib.knit_channel_set_mode(self._client._open(), mode))

    def join(self, name):
        check(lib.knit_channel_join(self._client._open(), _c(name)))

    def leave(self, name=None):
        """Leaves one channel, or every joined channel (None)."""
        check(lib.knit_channel_leave(self._client._open(), _c(name)))

    def joined(self):
        """The channels joined, the current one first."""
        return self._json(lib.knit_channel_joined)

    def publish(self, data, name=None):
        """Replaces top-level keys of a channel's data (None: every joined channel); returns
        the context version."""
        v = ffi.new("uint64_t *")
        check(lib.knit_channel_publish(self._client._open(), _json_text(data), _c(name), v))
        return v[0]

    def publish_fdc3(self, context, name=None):
        """Stores an FDC3 context (a dict with ``type``) as the latest of its type."""
        v = ffi.new("uint64_t *")
        check(lib.knit_channel_publish_fdc3(self._client._open(), _json_text(context), _c(name), v))
        return v[0]

    def _subscribe(self, callback, name):
        sub = Subscription(self._client)

        @ffi.callback("knit_channel_fn")
        def trampoline(_ud, ch, data, context, version):
            u = ChannelUpdate(_text(ch), json.loads(_text(data)), json.loads(_text(context)), version)
            _run(sub, callback, u)

        sub._cbs = trampoline
        out = ffi.new("knit_subscription_t **")
        if name is None:
            st = lib.knit_channel_subscribe(self._client._open(), trampoline, ffi.NULL, out)
        else:
            st = lib.knit_channel_subscribe_for(self._client._open(), _c(name), trampoline, ffi.NULL, out)
        check(st)
        sub._h = out[0]
        self._client._live.add(sub)
        return sub

    def subscribe(self, callback):
        """Follows the channels this client is on: ``callback(update)`` (a
        :class:`ChannelUpdate`). Returns a :class:`Subscription`."""
        return self._subscribe(callback, None)

    def subscribe_for(self, name, callback):
        """Follows one channel without joining it."""
        return self._subscribe(callback, name)

    def on_changed(self, callback):
        """Calls ``callback(names)`` with the joined channels now and after every change."""
        sub = Subscription(self._client)

        @ffi.callback("knit_channels_changed_fn")
        def trampoline(_ud, names):
            _run(sub, callback, json.loads(_text(names)))

        sub._cbs = trampoline
        out = ffi.new("knit_subscription_t **")
        check(lib.knit_channel_on_changed(self._client._open(), trampoline, ffi.NULL, out))
        sub._h = out[0]
        self._client._live.add(sub)
        return sub
