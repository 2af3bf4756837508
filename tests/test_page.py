"""The status page (``GET /`` on the status port) and the history it plots (``GET /history``):
the page is opened in a real headless Chromium, driven over the DevTools protocol, so its own
script runs against a real lock with real clients waiting."""

import base64
import itertools
import json
import os
import signal
import sys
import time

import gevent
import pytest
from gevent import subprocess
from gevent.event import AsyncResult
from gevent.os import make_nonblocking, nb_read, nb_write

from conftest import LOOPBACK, connect, http, recv_all, require_command, wait_until
from tcplock import TCPLock
from tcplock.status import StatusServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def status_server():
    servers = []

    def start(lock, **kw):
        server = StatusServer((LOOPBACK, 0), lock, **kw)
        server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop(timeout=0)


def get(port, path, token=None):
    s = connect(port)
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode())
        raw = recv_all(s)
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pair of pipes
    (--remote-debugging-pipe: JSON messages ended by a NUL byte, commands on its descriptor 3,
    answers and events on its descriptor 4), with one page open."""

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,900",
        "--remote-debugging-pipe",
    ]

    def __init__(self, chromium, profile):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        make_nonblocking(self._to_browser)
        make_nonblocking(self._from_browser)
        # The browser reads its commands on 3 and writes on 4: a small program puts the pipes
        # there, then becomes the browser.
        script = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(to_browser_r),
                str(from_browser_w),
                chromium,
                *self.FLAGS,
                f"--user-data-dir={profile}",
            ],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes are in its group, ended with it
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._ids = itertools.count(1)
        self._pending = {}
        self.events = []  # (method, params) of every event, in order
        self._reader = gevent.spawn(self._read)
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")

    def _read(self):
        buffer = b""
        while True:
            data = nb_read(self._from_browser, 1 << 16)
            if not data:
                break
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    self._pending.pop(message["id"]).set(message)
                else:
                    self.events.append((message["method"], message.get("params", {})))
        for waiting in self._pending.values():
            waiting.set({"error": {"message": "the browser closed its pipe"}})

    def send(self, method, session=None, **params):
        number = next(self._ids)
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._pending[number] = answer = AsyncResult()
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[nb_write(self._to_browser, data) :]
        reply = answer.get(timeout=20)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']['message']}")
        return reply["result"]

    def call(self, method, **params):
        """A command to the page."""
        return self.send(method, self.session, **params)

    def js(self, expression):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=15):
        """Until a JavaScript expression is true in the page (checked every 50 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.js(expression):
                    return
            except AssertionError:  # the document is not there yet (the page still loading)
                pass
            if time.monotonic() > deadline:
                shows = self.js("document.body && document.body.innerText")
                raise AssertionError(f"the page never had {expression}; it shows:\n{shows}")
            gevent.sleep(0.05)

    def open(self, url):
        self.call("Page.navigate", url=url)

    def type(self, text):
        """Type into the focused field, then press Enter."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )

    def requested(self):
        """Every URL the page asked for, in order."""
        return [p["request"]["url"] for m, p in self.events if m == "Network.requestWillBeSent"]

    def errors(self):
        """Script exceptions and console errors (a refused Content-Security-Policy among them),
        but not the failed requests a 401 makes the browser log."""
        found = []
        for method, params in self.events:
            if method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                if params["entry"].get("source") != "network":
                    found.append(params["entry"]["text"])
        return found

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self):
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._reader.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path):
    chromium = require_command("chromium", "chromium")
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


def busy_lock(make_backend, make_lock, waiting=3):
    """A lock of one slot before a holding backend: one client active, ``waiting`` queued."""
    backend = make_backend("hold")
    lock = make_lock(backend, slots=1)
    active = connect(lock.server_port)
    active.sendall(b"hello")
    held = backend.next_conn()
    wait_until(lambda: len(held.received) == 5)
    queued = [connect(lock.server_port) for _ in range(waiting)]
    wait_until(lambda: lock.queued == waiting)
    return lock, backend, [active, *queued]


def test_the_page_shows_backends_queue_and_plots_while_clients_wait(
    make_backend, make_lock, status_server, browser, tmp_path
):
    lock, backend, clients = busy_lock(make_backend, make_lock)
    server = status_server(lock)
    port = server.server_port
    url = f"http://{LOOPBACK}:{port}/"
    browser.open(url)
    # Its own script fetched /status and /history, and a sample of the queue was taken.
    browser.wait_for("document.body.dataset.loaded === 'yes'")
    browser.wait_for("document.getElementById('now-queued').textContent === '3'")
    assert browser.js("document.getElementById('queued').textContent") == "3"
    assert browser.js("document.getElementById('oldest').textContent").startswith("oldest waits")
    assert browser.js("document.getElementById('in-use').textContent") == "1 / 1"
    rows = browser.js(
        "[...document.querySelectorAll('#backends tr')].map(r => [...r.cells].map(c => "
        "c.textContent))"
    )
    label = f"{LOOPBACK}:{backend.server_port}"
    # address, state, slots in use, activations, restarts, memory, pid, last end
    assert rows == [[label, "up", "1 / 1", "1", "0", "\u2013", "\u2013", "\u2013"]]
    client = "{}:{}".format(*clients[0].getsockname())
    active = browser.js(
        "[...document.querySelectorAll('#active tr')].map(r => r.cells[0].textContent)"
    )
    assert active == [client]
    # Both plots are drawn, and the queue's reaches its top line at 3 waiting.
    assert browser.js("document.querySelectorAll('#plot-queue polyline').length") == 2
    assert browser.js("document.querySelectorAll('#plot-rate polyline').length") == 1
    assert "waiting up to 5" in browser.js(
        "document.getElementById('plot-queue').getAttribute('aria-label')"
    )
    shot = browser.screenshot(tmp_path / "status-page.png")
    print(f"\nscreenshot of the status page: {shot}")
    assert shot.stat().st_size > 10_000
    # The page changes as the lock does, without being reloaded.
    clients[1].close()
    browser.wait_for("document.getElementById('queued').textContent === '2'")
    # Nothing was loaded from anywhere but the status port, and nothing went wrong in it.
    assert all(u.startswith(url) for u in browser.requested()), browser.requested()
    assert {u[len(url) :] for u in browser.requested()} == {"", "status", "history"}
    assert browser.errors() == []
    # When tcplock no longer answers, the page says so (and keeps what it showed last).
    server.stop(timeout=0)
    browser.wait_for("!document.getElementById('error').hidden")
    assert "Cannot reach tcplock" in browser.js("document.getElementById('error').textContent")
    assert browser.js("document.getElementById('state').textContent") == "no answer"
    assert browser.js("document.getElementById('queued').textContent") == "2"


def test_with_a_token_the_page_asks_for_it_and_sends_it(
    make_backend, make_lock, status_server, browser, tmp_path
):
    lock, backend, clients = busy_lock(make_backend, make_lock, waiting=2)
    token = "p4ge-t0ken"
    port = status_server(lock, token=token).server_port
    url = f"http://{LOOPBACK}:{port}/"
    # The page itself needs no token and holds no data: the same bytes idle or busy.
    code, page = get(port, "/")
    assert code == 200 and token.encode() not in page
    assert str(backend.server_port).encode() not in page
    browser.open(url)
    browser.wait_for("document.body.dataset.loaded === 'token'")
    assert browser.js("document.getElementById('view').hidden") is True
    assert browser.js("document.getElementById('login-error').hidden") is True
    # What cannot be a token is not sent.
    browser.type("two words")
    browser.wait_for("!document.getElementById('login-error').hidden")
    assert "printable ASCII" in browser.js("document.getElementById('login-error').textContent")
    # A wrong token is refused: the page says so and asks again.
    browser.type("not-the-t0ken")
    # (the error of the last try is still shown: wait for this one's)
    browser.wait_for("document.getElementById('login-error').textContent.includes('refused')")
    assert browser.js("document.getElementById('login-error').hidden") is False
    assert browser.js("document.body.dataset.loaded") == "token"
    assert browser.js("document.getElementById('view').hidden") is True
    shot = browser.screenshot(tmp_path / "status-page-token.png")
    print(f"\nscreenshot of the page refusing a token: {shot}")
    # The right one shows the status, and is kept for the tab: a reload does not ask again.
    browser.type(token)
    browser.wait_for("document.body.dataset.loaded === 'yes'")
    assert browser.js("document.getElementById('queued').textContent") == "2"
    browser.call("Page.reload")
    browser.wait_for("document.body.dataset.loaded === 'yes'")
    assert browser.js("document.getElementById('login').hidden") is True
    clients[1].close()
    browser.wait_for("document.getElementById('queued').textContent === '1'")
    assert browser.errors() == []


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_script_and_origin(
    make_backend, make_lock, status_server
):
    lock = make_lock(make_backend("echo"))
    port = status_server(lock, token="t0ken").server_port
    code, headers, body = http(port, "GET", "/")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert b"<script src" not in body and b'href="http' not in body
    assert http(port, "HEAD", "/")[2] == b""
    code, headers, _ = http(port, "POST", "/")
    assert code == 405 and headers["allow"] == "GET, HEAD"
    # The page needs no token; what it shows does.
    assert get(port, "/history")[0] == 401 and get(port, "/status")[0] == 401
    assert get(port, "/history", token="t0ken")[0] == 200
    paths = json.loads(get(port, "/nope", token="t0ken")[1])["paths"]
    assert "/" in paths and "/history" in paths


class QuickLock(TCPLock):
    sweep_interval = 0.05
    history_length = 5


def test_history_keeps_the_last_samples_of_queue_active_and_arrivals(make_backend, status_server):
    backend = make_backend("hold")
    lock = QuickLock((LOOPBACK, 0), backend=(LOOPBACK, backend.server_port), slots=1)
    lock.start()
    try:
        # (this test asks for /history every few milliseconds, beyond the port's usual budget)
        port = status_server(lock, max_rate=100_000).server_port
        clients = [connect(lock.server_port) for _ in range(3)]
        wait_until(lambda: lock.queued == 2)

        def history():
            code, body = get(port, "/history")
            assert code == 200
            return json.loads(body)

        # Five samples at most, oldest first, each with the queue and slots in use then.
        wait_until(lambda: history()["queued"][:1] == [2] and len(history()["queued"]) == 5)
        h = history()
        assert set(h) == {"age_seconds", "queued", "active", "connections_per_second"}
        assert all(len(v) == 5 for v in h.values())
        assert h["age_seconds"] == sorted(h["age_seconds"], reverse=True)
        assert h["queued"] == [2] * 5 and h["active"] == [1] * 5
        assert 0 <= h["age_seconds"][-1] < h["age_seconds"][0] < 5
        # Arrivals per second: a burst of ten shows in one sample, then the rate falls back.
        more = [connect(lock.server_port) for _ in range(10)]
        wait_until(lambda: lock.queued == 12)
        wait_until(lambda: max(history()["connections_per_second"]) > 5)
        wait_until(lambda: history()["connections_per_second"] == [0] * 5)
        assert history()["queued"] == [12] * 5
        for c in clients + more:
            c.close()
    finally:
        lock.stop(timeout=0)


def test_cli_serves_the_page_on_its_status_port(cli, make_backend):
    p = cli.to(make_backend("echo"), "--status", "127.0.0.1:0")
    p.wait_ready()
    line = p.wait_for(r"status on http://")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    code, headers, body = http(port, "GET", "/")
    assert code == 200 and body.startswith(b"<!DOCTYPE html>")
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
