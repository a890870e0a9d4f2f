"""Tests of the Python binding: round trips, exceptions per status family, replies from other
threads, poll mode, raw bytes, misuse through the raw C functions, and a Rust peer in another
process."""

import json
import threading

import pytest

import knit
from knit import ffi, lib


def test_status_codes_and_exception_classes_come_from_the_library_table():
    assert knit.Status.OK == 0 and knit.Status.TIMEOUT == 4 and knit.Status.CLOSED == 14
    assert knit.error_class(knit.Status.TIMEOUT) is knit.KnitTimeoutError
    assert knit.error_class(knit.Status.NO_SERVER) is knit.NotFoundError
    assert knit.error_class(knit.Status.PEER_LEFT) is knit.RemoteError
    assert knit.error_class(knit.Status.BAD_INPUT) is knit.InputError
    assert knit.error_class(9999) is knit.InternalError
    for s in knit.Status:
        if s != 0:
            assert issubclass(knit.error_class(s), knit.KnitError)
    assert knit.__version__


def test_unreachable_gateway_is_a_connection_error(tmp_path):
    with pytest.raises(knit.KnitConnectionError) as e:
        knit.Client("py", str(tmp_path / "nobody.sock"))
    assert e.value.status == knit.Status.GATEWAY_UNREACHABLE
    assert e.value.family == "connection"
    with pytest.raises(knit.UsageError):
        knit.Client("", str(tmp_path / "nobody.sock"))


def test_round_trip_with_results_errors_and_targets(gateway):
    with knit.Client("py-server", gateway) as server, knit.Client("py-client", gateway) as client:
        calls = []

        def echo(args, caller):
            calls.append(caller["application"])
            return args

        server.register("Echo", echo)
        server.register("Boom", lambda a, c: 1 / 0)
        assert client.wait_for_method("Echo", 5000)["name"] == "Echo"

        r = client.invoke("Echo", {"x": [1, 2, {"y": None}], "s": "h\u00e9"})
        assert r["returned"] == {"x": [1, 2, {"y": None}], "s": "h\u00e9"}
        assert r["executed_by"]["application"] == "py-server"
        assert r["status"] == 0
        assert calls == ["py-client"]

        with pytest.raises(knit.RemoteError) as e:
            client.invoke("Boom")
        assert e.value.status == knit.Status.METHOD_FAILED
        assert "division by zero" in e.value.message
        assert e.value.result["status"] == 1

        with pytest.raises(knit.NotFoundError):
            client.invoke("Nobody", wait_ms=0)
        with pytest.raises(knit.InputError) as e:
            server.register("Echo", echo)
        assert e.value.status == knit.Status.ALREADY_EXISTS

        assert client.invoke("Echo", 5, target="PY-SERVER")["returned"] == 5
        assert client.invoke("Echo", 6, target={"application": "py-server"})["returned"] == 6
        r = client.invoke("Echo", 7, target="all")
        assert r["returned"] == 7 and "all_return_values" not in r  # one server: no aggregate
        with pytest.raises(knit.UsageError):
            client.invoke("Echo", target={"colour": "red"})

        names = [m["name"] for m in client.methods()]
        assert "Echo" in names and "Boom" in names
        assert client.servers()[0]["application"] == "py-client"
        assert client.instance["application"] == "py-client"
        assert client.max_payload == 1 << 20
        assert client.connected

        server.unregister("Echo")
        with pytest.raises(knit.NotFoundError) as e:
            server.unregister("Echo")
        assert e.value.status == knit.Status.NOT_FOUND
        with pytest.raises(knit.NotFoundError):  # the server knows at once; others a moment later
            server.invoke("Echo", wait_ms=0)


def test_async_replies_timeouts_and_forgotten_replies(gateway):
    with knit.Client("py-async", gateway) as server, knit.Client("py-async-client", gateway) as client:
        threads, parked = [], []

        def later(args, caller, reply):
            t = threading.Thread(target=reply.ok, args=({"late": args},))
            threads.append(t)
            t.start()

        server.register_async("Later", later)
        server.register_async("Forgets", lambda a, c, r: None)
        server.register_async("Parks", lambda a, c, r: parked.append(r))

        assert client.invoke("Later", 3)["returned"] == {"late": 3}
        for t in threads:
            t.join()

        with pytest.raises(knit.RemoteError, match="method handler did not reply"):
            client.invoke("Forgets")

        with pytest.raises(knit.KnitTimeoutError) as e:
            client.invoke("Parks", timeout_ms=100)
        assert e.value.status == knit.Status.TIMEOUT
        assert e.value.result["status"] == 1
        assert len(parked) == 1
        parked[0].ok("too late")  # harmless: nobody waits any more
        with pytest.raises(knit.UsageError):
            parked[0].ok("twice")

        with pytest.raises(TypeError):
            client.invoke("Later", object())  # not JSON: refused before any call


def test_poll_mode_runs_handlers_on_the_polling_thread(gateway):
    with knit.Client("py-poller", gateway, poll=True) as server, knit.Client("py-pc", gateway) as client:
        seen = []
        server.register("Polled", lambda a, c: seen.append(threading.get_ident()) or a)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", client.invoke("Polled", [1])))
        t.start()
        handled = 0
        for _ in range(200):
            if not t.is_alive():
                break
            handled += server.poll(50)
        t.join()
        assert out["r"]["returned"] == [1]
        assert handled == 1
        assert seen == [threading.get_ident()]
        with pytest.raises(knit.UsageError):
            client.poll(0)  # not a poll-mode client


def test_raw_bytes_both_ways(gateway):
    with knit.Client("py-bytes", gateway, wait="spin") as server, knit.Client("py-bc", gateway) as client:
        server.register_bytes("Rev", lambda data, caller: data[::-1])
        data = bytes([0, 1, 2, 255, 0])
        assert client.invoke_bytes("Rev", data) == data[::-1]
        # a JSON caller sees bytes as a list of numbers
        assert client.invoke("Rev", {"a": 1})["returned"] == list(b'{"a":1}'[::-1])


def test_misuse_through_the_c_functions_gives_status_codes(gateway):
    out = ffi.new("char **")
    assert lib.knit_invoke(ffi.NULL, b"m", b"{}", ffi.NULL, 0, out) == knit.Status.INVALID_ARGUMENT
    assert lib.knit_client_close(ffi.NULL) == knit.Status.INVALID_ARGUMENT
    assert lib.knit_reply_ok(ffi.NULL, b"1") == knit.Status.INVALID_ARGUMENT
    c = knit.Client("py-misuse", gateway)
    h = c.handle
    assert lib.knit_invoke(h, b"m", b"{bad json", ffi.NULL, 0, out) == knit.Status.BAD_INPUT
    assert out[0] == ffi.NULL
    assert "not valid JSON" in ffi.string(lib.knit_last_error_message()).decode()
    c.close()
    c.close()  # idempotent in Python
    assert lib.knit_client_close(h) == knit.Status.CLOSED  # double close in C: a status
    assert lib.knit_invoke(h, b"m", b"{}", ffi.NULL, 0, out) == knit.Status.CLOSED
    with pytest.raises(knit.UsageError) as e:
        c.invoke("m")
    assert e.value.status == knit.Status.CLOSED


def test_a_client_used_after_its_with_block_says_closed(gateway):
    with knit.Client("py-after-with", gateway) as c:
        pass
    assert not c.connected
    for use in (
        lambda: c.invoke("m"),
        lambda: c.register("m", lambda args, caller: args),
        lambda: c.contexts.get("n"),
        lambda: c.publish("t", {}),
    ):
        with pytest.raises(knit.UsageError) as e:
            use()
        assert e.value.status == knit.Status.CLOSED
        assert "closed" in e.value.message


def test_a_handler_that_closes_its_client_keeps_its_callback_alive(gateway):
    """Closing the client from inside its own method handler must not free that handler's
    cffi callback while it runs: it is kept for good instead."""
    from knit import pubsub

    server = knit.Client("py-closes-itself", gateway)
    seen = {}
    done = threading.Event()

    def handler(args, caller, reply):
        reply.ok(args)
        seen["callback"] = server._keep.get("Py.CloseMe")
        # Unregistered first (allowed inside the handler it removes), then closed.
        server.unregister("Py.CloseMe")
        server.close()
        done.set()

    server.register_async("Py.CloseMe", handler)
    with knit.Client("py-close-caller", gateway) as caller:
        assert caller.invoke("Py.CloseMe", {"n": 1})["returned"] == {"n": 1}
    assert done.wait(10)
    assert seen["callback"] is not None
    kept = [cb for o in pubsub._orphans for cb in (o.values() if isinstance(o, dict) else o)]
    assert any(cb is seen["callback"] for cb in kept)


def test_a_rust_peer_in_another_process(gateway, serve_cli):
    ready = serve_cli("Rust.Echo")
    with knit.Client("py-caller", gateway) as client:
        r = client.invoke("Rust.Echo", {"from": "python"})
        assert r["returned"] == {"from": "python"}
        assert r["executed_by"]["application"] == "rust-echo"
        assert r["executed_by"]["peerId"] == ready["peerId"]
        info = [m for m in client.methods() if m["name"] == "Rust.Echo"][0]
        assert json.dumps(info["servers"][0]["pid"]) == json.dumps(ready["pid"])
