"""Tests of contexts, the bus, streams and discovery events through the Python binding:
values, versions, filters, branches, private pushes, closes (from outside and from inside a
callback), exceptions in callbacks, and misuse through the raw C functions. Waits are on
conditions with deadlines, never sleeps."""

import threading

import pytest

import knit
from knit import ffi, lib


class Log:
    """What callbacks saw, with waits on conditions."""

    def __init__(self):
        self.items = []
        self.threads = []
        self._cv = threading.Condition()

    def __call__(self, *item):
        with self._cv:
            self.items.append(item[0] if len(item) == 1 else item)
            self.threads.append(threading.get_ident())
            self._cv.notify_all()

    def wait(self, pred, timeout=5.0):
        with self._cv:
            return self._cv.wait_for(lambda: pred(self.items), timeout)

    def wait_count(self, n, timeout=5.0):
        return self.wait(lambda items: len(items) >= n, timeout)

    def __len__(self):
        with self._cv:
            return len(self.items)


def test_contexts_values_versions_and_subscriptions(gateway):
    with knit.Client("py-ctx-w", gateway) as w, knit.Client("py-ctx-f", gateway) as f:
        ctx, fctx = w.contexts, f.contexts
        assert fctx.get_with_version("py.ctx") == ({}, 0)
        v1 = ctx.set("py.ctx", {"a": 1, "b": [1, 2]})
        assert v1 > 0
        assert fctx.get_with_version("py.ctx") == ({"a": 1, "b": [1, 2]}, v1)

        log, barrier = Log(), Log()
        sub = fctx.subscribe("py.ctx", log)
        other = fctx.subscribe("py.ctx", barrier)
        assert log.wait_count(1)
        first = log.items[0]
        assert isinstance(first, knit.ContextUpdate)
        assert first.first and first.version == v1 and first.data == {"a": 1, "b": [1, 2]}

        v2 = ctx.update("py.ctx", {"b": None, "c": "x"})
        assert v2 == v1 + 1
        assert log.wait_count(2)
        u = log.items[1]
        assert u.data == {"a": 1, "c": "x"} and u.delta == {"b": None, "c": "x"} and u.removed == ["b"]
        assert u.version == v2 and not u.first
        assert u.updater["application"] == "py-ctx-w"
        assert log.threads[1] != threading.get_ident()  # the dispatcher thread

        with pytest.raises(knit.InputError) as e:
            ctx.update_if("py.ctx", v1, {"x": 1})
        assert e.value.status == knit.Status.ALREADY_EXISTS
        assert ctx.update_if("py.ctx", v2, {"x": 1}) == v2 + 1
        assert ctx.set_path("py.ctx", "p.q", True) == v2 + 2
        assert ctx.set_paths("py.ctx", {"p.r": 2, "x": None}) == v2 + 3
        assert ctx.set_paths("py.ctx", [("s", 1)]) == v2 + 4
        assert fctx.get("py.ctx") == {"a": 1, "c": "x", "p": {"q": True, "r": 2}, "s": 1}
        assert "py.ctx" in ctx.all()
        with pytest.raises(knit.InputError):
            ctx.set("py.ctx", [1])  # not an object
        with pytest.raises(TypeError):
            ctx.set("py.ctx", {"x": object()})  # not JSON: refused before any call

        # closed: not called again (the other subscription is called in the same delivery)
        sub.close()
        sub.close()
        n = len(log)
        ctx.update("py.ctx", {"after": 1})
        assert barrier.wait(lambda items: any("after" in i.data for i in items))
        assert len(log) == n

        # a callback may close its own subscription; exceptions stay in the callback
        seen = Log()

        def closes_itself(update):
            seen(update.data)
            if "self" in update.data:
                me.close()

        me = fctx.subscribe("py.ctx", closes_itself)
        boom = fctx.subscribe("py.ctx", lambda u: 1 / 0)
        assert seen.wait_count(1)
        ctx.update("py.ctx", {"self": 1})
        assert seen.wait_count(2)
        ctx.update("py.ctx", {"self": 2})
        assert barrier.wait(lambda items: any(i.data.get("self") == 2 for i in items))
        assert len(seen) == 2 and not me.is_open
        boom.close()

        ctx.destroy("py.ctx")
        with pytest.raises(knit.NotFoundError):
            ctx.destroy("py.ctx")
        other.close()


def test_bus_topics_routing_keys_and_filters(gateway):
    with knit.Client("py-bus-sub", gateway) as s:
        everything, eu, from_pub = Log(), Log(), Log()
        s.subscribe("py.prices.*", everything)
        s.subscribe("py.prices.>", eu, routing_key="eu")
        s.subscribe("py.prices.*", from_pub, source={"application": "py-bus-pub"})
        with knit.Client("py-bus-pub", gateway) as pub:  # knows the subscriptions already
            pub.publish("py.prices.VOD", {"bid": 1})
            pub.publish("py.prices.VOD", {"k": "us"}, routing_key="us")
            pub.publish("py.prices.VOD", {"k": "eu"}, routing_key="eu")
            pub.publish("py.prices.VOD", {"k": "nobody"}, target={"application": "nobody"})
            pub.publish("py.prices.VOD", {"k": "last"})
            assert everything.wait(lambda items: any(m.data == {"k": "last"} for m in items))
            assert eu.wait(lambda items: any(m.data == {"k": "last"} for m in items))
            m = everything.items[0]
            assert isinstance(m, knit.Message)
            assert m.topic == "py.prices.VOD" and m.data == {"bid": 1}
            assert m.source["application"] == "py-bus-pub"
            data = [m.data for m in everything.items]
            assert {"k": "us"} in data and {"k": "nobody"} not in data
            assert {"k": "us"} not in [m.data for m in eu.items]
            assert from_pub.wait(lambda items: any(m.data == {"k": "last"} for m in items))
            assert len(from_pub) == 4
            with pytest.raises(knit.UsageError):
                pub.publish("", 1)
            own = Log()
            with pub.subscribe("py.self", own):
                pub.publish("py.self", [1, "two", None])
                assert own.wait_count(1)
                assert own.items[0].data == [1, "two", None]
            batch = [{"b": i} for i in range(5)]
            pub.publish_batch("py.prices.B", batch)
            assert everything.wait(lambda items: any(m.data == {"b": 4} for m in items))
            assert [m.data for m in everything.items if "b" in m.data] == batch
            pub.publish_batch("py.prices.B", [{"k": "eu-batch"}], routing_key="eu")
            assert eu.wait(lambda items: any(m.data == {"k": "eu-batch"} for m in items))
            with pytest.raises(knit.InputError):
                pub.publish_batch("py.x", {"not": "a list"})


def test_streams_requests_branches_and_closes(gateway):
    with knit.Client("py-stream-server", gateway) as server, knit.Client("py-stream-client", gateway) as client:
        kept = {}
        cv = threading.Condition()

        def decide(req):
            if "reject" in req.args:
                return req.reject("not you")
            if "boom" in req.args:
                raise ValueError("bad request")
            if "park" in req.args:
                with cv:
                    kept["parked"] = req
                    cv.notify_all()
                return
            branch = req.args.get("branch", "")
            sub = req.accept(branch)
            assert req.caller["application"] == "py-stream-client"
            with cv:
                kept[branch] = sub
                cv.notify_all()

        with pytest.raises(knit.UsageError):
            server.create_stream("Py.Bad", policy="lossy")
        ticks = server.create_stream("Py.Ticks", decide, policy="drop-oldest", queue=64)
        with pytest.raises(knit.InputError):
            server.create_stream("Py.Ticks")  # already exists

        plain, ends, branch = Log(), Log(), Log()
        s1 = client.subscribe_stream("Py.Ticks", plain, ends.__call__, wait_ms=5000, timeout_ms=5000)
        s2 = client.subscribe_stream("Py.Ticks", branch, args={"branch": "eu"}, timeout_ms=5000)
        for bad, why in (({"reject": 1}, "not you"), ({"boom": 1}, "bad request")):
            with pytest.raises(knit.RemoteError, match=why) as e:
                client.subscribe_stream("Py.Ticks", plain, args=bad, timeout_ms=5000)
            assert e.value.status == knit.Status.METHOD_FAILED
        with pytest.raises(knit.NotFoundError):
            client.subscribe_stream("Py.Nobody", plain, wait_ms=0)

        ticks.push({"n": 1})
        ticks.push_to_branches(["eu"], {"only": "eu"})
        with cv:
            assert cv.wait_for(lambda: "eu" in kept, 5)
        kept["eu"].push({"just": "you"})
        ticks.push({"n": 2})
        assert plain.wait(lambda items: any(i.data == {"n": 2} for i in items))
        assert branch.wait(lambda items: any(i.data == {"n": 2} for i in items))
        assert [i.data for i in plain.items] == [{"n": 1}, {"n": 2}]
        item = plain.items[0]
        assert isinstance(item, knit.StreamItem) and not item.private and item.gap == 0
        assert item.server["application"] == "py-stream-server"
        assert [(i.data, i.private) for i in branch.items] == [
            ({"n": 1}, False), ({"only": "eu"}, False), ({"just": "you"}, True), ({"n": 2}, False)]
        assert ticks.branches() == ["", "eu"]
        assert {"branch": "eu"} in [s["arguments"] for s in ticks.subscriptions()]
        with pytest.raises(knit.InputError):
            ticks.push([1])
        ticks.push_batch([{"m": 1}, {"m": 2}])
        assert plain.wait(lambda items: any(i.data == {"m": 2} for i in items))
        assert [i.data for i in plain.items][-2:] == [{"m": 1}, {"m": 2}]
        with pytest.raises(knit.InputError):
            ticks.push_batch([{"m": 3}, 1])  # refused whole

        # decided later, from another thread
        def accept_later():
            with cv:
                if cv.wait_for(lambda: "parked" in kept, 5):
                    kept["late"] = kept.pop("parked").accept()

        t = threading.Thread(target=accept_later)
        t.start()
        late = Log()
        s3 = client.subscribe_stream("Py.Ticks", late, args={"park": 1}, timeout_ms=5000)
        t.join()
        kept["late"].push({"late": True})
        assert late.wait_count(1) and late.items[0].private

        ticks.close_branch("eu")
        s3.close()
        ticks.push({"n": 3})
        assert plain.wait(lambda items: any(i.data == {"n": 3} for i in items))
        assert len(late) == 1
        ticks.close()
        assert ends.wait(lambda items: ("Stream closed", True) in items)
        with pytest.raises(knit.UsageError):
            ticks.push({})
        with pytest.raises(knit.UsageError) as e:
            kept["eu"].push({})  # its stream is closed
        assert e.value.status == knit.Status.CLOSED
        for s in (s1, s2):
            s.close()


def test_discovery_events(gateway):
    with knit.Client("py-events", gateway) as watcher:
        events = Log()
        with watcher.on_event(events):
            assert events.wait(lambda items: any(e["type"] == "serverAdded" for e in items))
            with knit.Client("py-events-peer", gateway) as peer:
                peer.register("Py.Ev", lambda a, c: a)
                assert events.wait(lambda items: any(
                    e["type"] == "methodAdded" and e["method"]["name"] == "Py.Ev" for e in items))
            assert events.wait(lambda items: any(
                e["type"] == "serverRemoved" and e["server"]["application"] == "py-events-peer"
                for e in items))


def test_poll_mode_subscriptions_run_in_poll(gateway):
    with knit.Client("py-sub-poller", gateway, poll=True) as p:
        got = Log()
        with p.subscribe("py.polled", got):
            p.publish("py.polled", {"x": 1})
            assert len(got) == 0  # nothing runs until we poll
            for _ in range(100):
                if len(got):
                    break
                p.poll(50)
            assert got.items[0].data == {"x": 1}
            assert got.threads == [threading.get_ident()]


def test_subscription_misuse_through_the_c_functions(gateway):
    assert lib.knit_subscription_close(ffi.NULL) == knit.Status.INVALID_ARGUMENT
    out = ffi.new("knit_subscription_t **")
    assert lib.knit_subscribe(ffi.NULL, b"t", ffi.NULL, ffi.NULL, out) == knit.Status.INVALID_ARGUMENT
    assert lib.knit_context_set(ffi.NULL, b"n", b"{bad") == knit.Status.INVALID_ARGUMENT
    c = knit.Client("py-sub-misuse", gateway)
    assert lib.knit_context_set(c.handle, b"n", b"{bad") == knit.Status.BAD_INPUT
    assert lib.knit_subscribe(c.handle, b"t", ffi.NULL, ffi.NULL, out) == knit.Status.INVALID_ARGUMENT
    sub = c.subscribe("py.misuse", lambda m: None)
    h = sub._h
    c.close()  # ends the subscription: its handle is closed
    assert lib.knit_subscription_close(h) == knit.Status.CLOSED
    sub.close()  # harmless
    with pytest.raises(knit.UsageError):
        c.contexts.get("n")


def test_channels_membership_publishing_and_following(gateway):
    with knit.Client("py-chan-w", gateway) as w, knit.Client("py-chan-r", gateway) as r:
        names = [c["name"] for c in r.channels.list()]
        assert "Purple" in names and len(names) == 8
        assert r.channels.get("Purple")["meta"]["color"] == "#9C27B0"
        with pytest.raises(knit.NotFoundError):
            r.channels.get("Nope")
        changed, follow = Log(), Log()
        r.channels.on_changed(changed)
        sub = r.channels.subscribe(follow)
        assert changed.wait(lambda items: [] in items)
        r.channels.join("Purple")
        assert changed.wait(lambda items: ["Purple"] in items)
        assert r.channels.joined() == ["Purple"]
        assert w.channels.publish({"instrument": "VOD.L"}, "Purple") > 0
        assert follow.wait(lambda items: any(u.data == {"instrument": "VOD.L"} for u in items))
        u = [u for u in follow.items if u.data == {"instrument": "VOD.L"}][0]
        assert isinstance(u, knit.ChannelUpdate) and u.channel == "Purple"
        assert u.context["name"] == "Purple" and u.version > 0
        w.channels.publish_fdc3({"type": "fdc3.instrument", "id": {"ticker": "VOD"}}, "Purple")
        assert follow.wait(lambda items: any(
            i.data.get("fdc3") == {"type": "fdc3.instrument", "id": {"ticker": "VOD"}} for i in items))
        with pytest.raises(knit.InputError):
            w.channels.publish({"a": 1})  # not joined to any channel
        r.channels.set_mode(knit.Channels.MULTI)
        r.channels.join("Magenta")
        assert changed.wait(lambda items: ["Purple", "Magenta"] in items)
        one = Log()
        w.channels.subscribe_for("Magenta", one)
        r.channels.publish({"both": 1})
        assert one.wait(lambda items: any(i.data.get("both") == 1 for i in items))
        r.channels.leave()
        assert r.channels.joined() == []
        sub.close()
        n = len(follow)
        w.channels.publish({"after": 1}, "Magenta")
        assert one.wait(lambda items: any(i.data.get("after") == 1 for i in items))
        assert len(follow) == n
