"""Fixtures: a private gateway (the ``knit`` CLI binary: ``$KNIT_BIN``, else ``knit`` on PATH)
on a socket in a temporary directory, stopped after the session."""

import os
import shutil
import subprocess
import threading

import pytest


def knit_bin():
    path = os.environ.get("KNIT_BIN") or shutil.which("knit")
    if not path:
        pytest.fail("set KNIT_BIN to the knit CLI binary (cargo build --bin knit)")
    return path


def read_line_with_timeout(stream, want, timeout=30.0):
    """Reads lines until one contains ``want``; fails after ``timeout`` seconds."""
    found = {}

    def reader():
        for line in iter(stream.readline, ""):
            if want in line:
                found["line"] = line
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if "line" not in found:
        pytest.fail(f"no line containing {want!r} within {timeout} s")
    return found["line"]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("knit") / "gw.sock")
    env = dict(os.environ, KNIT_LOG="info")
    p = subprocess.Popen(
        [knit_bin(), "gateway", "--no-ws", "--gateway", sock, "--max-payload", "1048576"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    read_line_with_timeout(p.stderr, "listening")
    yield sock
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture
def serve_cli(gateway):
    """Starts ``knit serve METHOD --echo`` (a Rust peer in another process); yields its ready
    line as a dict."""
    procs = []

    def start(method, app="rust-echo"):
        import json

        p = subprocess.Popen(
            [knit_bin(), "--gateway", gateway, "--app", app, "serve", method, "--echo"],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        return json.loads(read_line_with_timeout(p.stdout, '"ready"'))

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=30)
