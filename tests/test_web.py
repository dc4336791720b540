"""The web page: its server's boundary in process (what reaches the loop's queue, what is
refused), then the real daemon (simulated pins, folder camera, real model) driven through
Debian's headless Chromium, and the Scratch extension the box serves loaded into the real
scratch-vm under Node.

Screenshots of the main views go to $EDGE_WEB_SCREENSHOTS when set (docs/ for the README).
"""

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is a runtime dependency: pip install -e .")

from edge import commands  # noqa: E402
from edge.config import WebConfig  # noqa: E402
from edge.web import WebServer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NODE_DIR = REPO / "tests" / "node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=30.0, step=0.1, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# --- the server's boundary, in process ----------------------------------------------------------

class Queue:
    """Where the server puts Requests: the test plays the loop, answering like it would."""

    def __init__(self, answer=None):
        self.requests = []
        self.answer = answer

    def __call__(self, request):
        self.requests.append(request)
        if request.reply is not None and self.answer is not None:
            request.reply(self.answer(request))


@pytest.fixture
def server():
    servers = []

    def make(pin=None, answer=lambda r: {"action": r.command.action, "ok": True, "id": r.id}, **kw):
        queue = Queue(answer)
        srv = WebServer(WebConfig(host="127.0.0.1", port=free_port(), pin=pin), queue, device_id="t", **kw)
        assert srv.start()
        servers.append(srv)
        return srv, queue

    yield make
    for srv in servers:
        srv.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def ws_session(srv, script, origin=None, host=None):
    """Open /ws, run `script(ws, inbox)` where inbox() returns the next JSON message."""
    headers = {}
    if origin:
        headers["Origin"] = origin
    if host:
        headers["Host"] = host
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{srv.port}/ws", headers=headers) as ws:
            async def inbox(kind=None, binary=False):
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        if binary:
                            return msg.data
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"socket ended: {msg.type}")
                    data = json.loads(msg.data)
                    if kind is None or data.get("type") == kind:
                        return data
            return await script(ws, inbox)


def http(srv, path, method="GET", data=None, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_page_and_extension_are_served_and_nothing_else(server):
    srv, queue = server()
    for path, kind in [("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css"),
                       ("/scratch/edge-box.js", "javascript")]:
        status, body, headers = http(srv, path)
        assert status == 200 and kind in headers["Content-Type"], path
        assert b"http://" not in body.replace(b"http://www.w3.org", b"") or path == "/", \
            f"{path} must load nothing from outside"
    status, body, _ = http(srv, "/scratch/edge-box.js")
    assert f'"ws://127.0.0.1:{srv.port}/ws"'.encode() in body, "the extension's default address is this box"
    for path in ["/../config.yaml", "/static/app.js", "/%2e%2e/edge/web.py", "/edge/web.py",
                 "/scratch/../app.js", "/index.html?file=/etc/passwd", "/api/export"]:
        status, body, _ = http(srv, path)
        assert status in (404, 405) and b"aiohttp" not in body[:0], path
    assert queue.requests == []


def test_no_get_changes_anything_and_foreign_sites_are_refused(server):
    srv, queue = server()
    assert http(srv, "/api/export")[0] == 405
    assert http(srv, "/api/import")[0] == 405
    assert http(srv, "/", method="PUT", data=b"x")[0] == 405
    status, body, _ = http(srv, "/api/import", "POST", b"PK\x03\x04", {"Origin": "http://evil.example"})
    assert status == 403 and b"other sites" in body
    status, body, _ = http(srv, "/api/export", "POST", b"", {"Origin": "null"})
    assert status == 403
    status, body, _ = http(srv, "/", headers={"Host": "evil.example"})   # DNS rebinding
    assert status == 421
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        run(ws_session(srv, lambda ws, inbox: inbox(), origin="http://evil.example"))
    assert err.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        run(ws_session(srv, lambda ws, inbox: inbox(), host="attacker.example.com"))
    assert err.value.status == 421
    assert queue.requests == [], "nothing refused may reach the loop"


def test_a_refused_path_cannot_forge_a_log_line(server, caplog):
    srv, _ = server()
    with caplog.at_level(logging.WARNING, logger="edge.web"):
        status, _, _ = http(srv, "/api/export%0AERROR%20edge.app:%20FAKE", "POST", b"", {"Origin": "http://evil.example"})
    assert status == 403
    refused = [r.getMessage() for r in caplog.records if "another site" in r.getMessage()]
    assert refused and all("\n" not in m for m in refused), refused


def test_same_origin_page_may_post_and_connect(server):
    srv, queue = server()

    async def script(ws, inbox):
        hello = await inbox("hello")
        await ws.send_json({"action": "undo", "id": 1})
        return hello, await inbox("result")
    hello, result = run(ws_session(srv, script, origin=f"http://127.0.0.1:{srv.port}"))
    assert hello["pin_required"] is False and hello["device_id"] == "t"
    assert result == {"action": "undo", "ok": True, "id": 1, "type": "result"}
    assert [(r.command, r.source, r.id) for r in queue.requests] == [(commands.Undo(), "web", 1)]


def test_commands_are_parsed_by_the_one_command_model(server):
    srv, queue = server()

    async def script(ws, inbox):
        answers = []
        for message in [{"action": "record", "body": {"class": "A", "seconds": 30}, "id": "r"},
                        {"action": "record", "body": {"class": "x/../y"}, "id": 2},
                        {"action": "jump", "id": 3},
                        {"action": "clear", "body": {}, "id": 4},
                        {"action": "threshold", "body": {"value": 2}, "id": 5},
                        {"action": "samples", "body": {"class": "A", "limit": 10}, "id": 6}]:
            await ws.send_json(message)
            answers.append(await inbox("result"))
        await ws.send_str("[" * 50 + "]" * 50)
        answers.append(await inbox("result"))
        await ws.send_str("x" * 9000)                    # over the message limit: the socket closes
        msg = await asyncio.wait_for(ws.receive(), 10)
        return answers, msg.type
    answers, last = run(ws_session(srv, script))
    assert answers[0]["ok"] and answers[0]["id"] == "r"
    assert not answers[1]["ok"] and "class names may use" in answers[1]["error"]
    assert not answers[2]["ok"] and "unknown action" in answers[2]["error"]
    assert not answers[3]["ok"] and '{"all": true}' in answers[3]["error"]
    assert not answers[4]["ok"] and "threshold" in answers[4]["error"]
    assert answers[5]["ok"]
    assert not answers[6]["ok"] and "deeper" in answers[6]["error"]
    assert last in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    wait_until(lambda: len(queue.requests) >= 3, 10, 0.05, "the server to let go of the recording")
    assert [r.command for r in queue.requests] == [commands.Record("A", seconds=30.0),
                                                  commands.ListSamples("A", limit=10),
                                                  commands.StopRecording("A")]   # the socket closed


def test_pin_guards_every_change_and_wrong_pins_are_rate_limited(server):
    srv, queue = server(pin="2468")

    async def script(ws, inbox):
        out = {"hello": await inbox("hello")}
        await ws.send_json({"action": "clear", "body": {"all": True}, "id": 1})
        out["no pin"] = await inbox("result")
        await ws.send_json({"action": "state", "id": 2})            # reading needs no PIN
        out["state"] = await inbox("result")
        await ws.send_json({"action": "undo", "pin": "1111", "id": 3})
        out["wrong"] = await inbox("result")
        logins = []
        for _ in range(5):
            await ws.send_json({"type": "login", "pin": "0000"})
            logins.append(await inbox("login"))
        out["logins"] = logins
        await ws.send_json({"type": "login", "pin": "2468"})           # right, but too late
        out["locked"] = await inbox("login")
        return out
    out = run(ws_session(srv, script))
    assert out["hello"]["pin_required"] is True
    assert out["no pin"]["ok"] is False and out["no pin"]["error"] == "PIN needed"
    assert out["state"]["ok"] is True
    assert out["wrong"]["error"] == "wrong PIN"
    # the change sent without a PIN was no guess: "wrong" and four logins use up the five tries
    assert [m["error"] for m in out["logins"]] == ["wrong PIN"] * 4 + ["too many wrong PINs; try again in 60 s"]
    assert out["locked"]["ok"] is False and "too many wrong PINs" in out["locked"]["error"]
    assert [r.command for r in queue.requests] == [commands.State()], "no change got through"
    status, body, _ = http(srv, "/api/export", "POST", b"", {"X-Edge-Pin": "2468"})
    assert status == 403 and b"too many wrong PINs" in body, "the lock covers the file routes too"


def test_a_lone_surrogate_is_refused_and_the_page_keeps_getting_answers(server):
    """'\\ud800' in a message decoded to text that cannot be sent back: the writer died and the
    page got nothing more, and a PIN like it dropped the connection."""
    srv, queue = server(pin="2468")

    async def script(ws, inbox):
        await inbox("hello")
        await ws.send_str('{"type": "login", "pin": "\\ud800"}')
        bad_login = await inbox("result")
        await ws.send_str('{"action": "state", "id": "\\ud800"}')
        bad_id = await inbox("result")
        await ws.send_json({"action": "state", "id": 3})
        return bad_login, bad_id, await inbox("result")
    bad_login, bad_id, state = run(ws_session(srv, script))
    assert not bad_login["ok"] and "lone surrogate" in bad_login["error"]
    assert not bad_id["ok"] and "lone surrogate" in bad_id["error"]
    assert state["ok"] and state["id"] == 3
    assert [r.command for r in queue.requests] == [commands.State()]


def test_right_pin_unlocks_the_connection(server):
    srv, queue = server(pin="2468")

    async def script(ws, inbox):
        await inbox("hello")
        await ws.send_json({"type": "login", "pin": "2468"})
        login = await inbox("login")
        await ws.send_json({"action": "rename", "body": {"from": "A", "to": "Hats"}, "id": 9})
        return login, await inbox("result")
    login, result = run(ws_session(srv, script))
    assert login["ok"] and result["ok"]
    assert [r.command for r in queue.requests] == [commands.Rename("A", "Hats")]
    status, _, _ = http(srv, "/api/export", "POST", b"")
    assert status == 403, "export needs the PIN too"


def test_leaving_the_page_while_teaching_stops_the_recording(server):
    srv, queue = server()

    async def script(ws, inbox):
        await inbox("hello")
        await ws.send_json({"action": "record", "body": {"class": "A", "seconds": 30}, "id": 1})
        await inbox("result")
    run(ws_session(srv, script))
    wait_until(lambda: len(queue.requests) == 2, 10, what="the stop after the page closed")
    assert [r.command for r in queue.requests] == [commands.Record("A", seconds=30.0), commands.StopRecording("A")]


def test_uploads_are_bounded_and_export_import_travel_as_files(server):
    data = b"PK" + bytes(1000)

    def answer(r):
        if isinstance(r.command, commands.Export):
            return {"action": "export", "ok": True, "data": data}
        if isinstance(r.command, commands.Import):
            return {"action": "import", "ok": False, "error": "not an export file (bad zip)"}
        return {"action": r.command.action, "ok": True}
    srv, queue = server(answer=answer, max_upload=4096)
    status, body, headers = http(srv, "/api/export", "POST", b"")
    assert status == 200 and body == data
    assert headers["Content-Disposition"].startswith('attachment; filename="edge-t-')
    status, body, _ = http(srv, "/api/import", "POST", bytes(5000))
    assert status == 413 and b"larger than" in body
    status, body, _ = http(srv, "/api/import", "POST", b"junk")
    assert status == 400 and json.loads(body) == {"action": "import", "ok": False,
                                                   "error": "not an export file (bad zip)"}
    assert [type(r.command) for r in queue.requests] == [commands.Export, commands.Import]
    assert queue.requests[1].command.data == b"junk"


def test_outputs_reach_watching_pages(server):
    from edge.app import Decision
    srv, _ = server()
    rgb = np.zeros((224, 224, 3), np.uint8)
    rgb[:, :112] = (250, 20, 20)

    async def script(ws, inbox):
        await inbox("hello")
        srv.state({"mode": "classifying", "classes": [{"name": "A", "samples": 3}]})
        state = await inbox("state")
        srv.decision(Decision("A", 0, 0.8, {"A": 0.8}, time.time(), 7, True))
        srv.flush()            # the end of the loop's turn sends what the turn kept
        decision = await inbox("decision")
        srv.event({"event": "sample_added", "class": "A", "samples": 4})
        event = await inbox("event")
        srv.preview(rgb)       # not watching yet: nothing is encoded
        srv.flush()
        await asyncio.sleep(0.3)
        assert srv.frames_sent == 0
        await ws.send_json({"type": "watch", "on": True})
        await asyncio.sleep(0.2)
        srv.preview(rgb)
        srv.flush()
        return state, decision, event, await inbox(binary=True)
    state, decision, event, jpeg = run(ws_session(srv, script))
    assert state["state"]["classes"] == [{"name": "A", "samples": 3}]
    assert decision["label"] == "A" and decision["scores"] == {"A": 0.8}
    assert event["event"] == "sample_added" and event["samples"] == 4
    from PIL import Image
    picture = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert picture.shape == (224, 224, 3) and picture[100, 50, 0] > 200 and picture[100, 200, 0] < 60


def test_a_busy_port_leaves_the_box_running(server):
    srv, _ = server()
    other = WebServer(WebConfig(host="127.0.0.1", port=srv.port), lambda r: None)
    assert other.start() is False
    other.close()
    assert http(srv, "/")[0] == 200


# --- the real daemon in a real browser ----------------------------------------------------------

class Daemon:
    """`edge run` in a subprocess: simulated pins, a folder camera the test fills, the real model."""

    def __init__(self, root: Path, pin=None, name="box", host="127.0.0.1"):
        self.root = root / name
        self.cam = self.root / "camera"
        self.cam.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.config = self.root / "config.yaml"
        web = {"host": host, "port": self.port}
        if pin:
            web["pin"] = pin
        self.config.write_text(json.dumps({
            "device_id": f"test-{name}",
            "classes": [{"name": "A", "button": "GPIO17", "led": "GPIO27"},
                        {"name": "B", "button": "GPIO22", "led": "GPIO23"}],
            "camera": {"source": "folder", "folder": "camera", "fps": 10},
            "capture": {"rate": 8, "min_change": 0.0},
            "model": {"threads": 1},
            "store": {"path": "store", "thumbnails": True},
            "web": web,
        }))
        self.proc = None
        self.log = self.root / "daemon.log"

    def show(self, files):
        for old in self.cam.iterdir():
            old.unlink()
        for f in files:
            shutil.copy(f, self.cam / f.name)

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(self.config),
                                      "--simulate", "--no-keys"], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=env, cwd=self.root)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(up, 60, 0.2, "the daemon's page")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def daemons(tmp_path):
    made = []

    def make(**kw):
        d = Daemon(tmp_path, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()


def _chrome_options(download_dir: Path, mobile=False):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency: pip install -e .[test]")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tempfile.mkdtemp(prefix='edge-chromium-')}", "--window-size=1280,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):   # offline, as in a classroom: no name resolves
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                           "download.prompt_for_download": False})
    if mobile:
        opts.add_experimental_option("mobileEmulation", {
            "deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2, "touch": True},
            "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Mobile Safari/537.36"})
    return opts


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    drivers = []

    def make(mobile=False):
        downloads = tmp_path / f"downloads{len(drivers)}"
        downloads.mkdir()
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_chrome_options(downloads, mobile))
        driver.set_page_load_timeout(30)
        driver.downloads = downloads
        drivers.append(driver)
        return driver
    yield make
    for d in drivers:
        d.quit()


def screenshot(driver, name):
    folder = os.environ.get("EDGE_WEB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def text(driver, css):
    return driver.find_element("css selector", css).text


def count_of(driver, cls):
    counts = driver.execute_script(   # in one go, so a card redrawn meanwhile cannot go stale
        "return Object.fromEntries([...document.querySelectorAll('.class')]"
        ".map((e) => [e.dataset.cls, e.querySelector('.count').textContent]))")
    if cls not in counts:
        raise AssertionError(f"no class card {cls}")
    return int(counts[cls].split()[0])


def hold_teach(driver, cls, seconds):
    from selenium.webdriver import ActionChains
    button = [el for el in driver.find_elements("css selector", ".class")
              if el.get_attribute("data-cls") == cls][0].find_element("css selector", ".hold")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    ActionChains(driver).click_and_hold(button).pause(seconds).release().perform()


def open_page(driver, daemon):
    driver.get(daemon.url)
    wait_until(lambda: text(driver, "#link") == "connected", 20, what="the page's WebSocket")
    wait_until(lambda: driver.find_elements("css selector", ".class"), 20, what="the class cards")


def page_on_hats(daemons, browser, clothing, **options):
    """A running box whose camera shows hats, and a browser on its page: (box, driver)."""
    box = daemons(**options)
    box.show(photos(clothing, "hat"))
    box.start()
    driver = browser()
    open_page(driver, box)
    return box, driver


def teach(driver, cls, seconds, at_least, what=None):
    """Hold the class's teach button; wait for at_least samples and the recording to stop."""
    hold_teach(driver, cls, seconds)
    wait_until(lambda: count_of(driver, cls) >= at_least, 15, what=what or f"samples of {cls}")
    wait_until(lambda: driver.find_element("id", "recording").get_attribute("hidden") is not None, 10,
               what="the recording to stop on release")


def photos(clothing, kind, split="train", n=12):
    return sorted((clothing / split / kind).glob("*.jpg"))[:n]


def test_live_picture_updates(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing)
    frames = lambda: int(driver.find_element("id", "picture").get_attribute("data-frames") or 0)  # noqa: E731
    first = wait_until(frames, 20, what="a first live picture")
    wait_until(lambda: frames() >= first + 5, 20, what="the live picture to keep updating")
    size = driver.execute_script("const i = document.getElementById('picture'); return [i.naturalWidth, i.naturalHeight]")
    assert size[0] == size[1] and size[0] >= 96, "the model's view: a square"


def test_teach_two_classes_and_the_label_follows(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing)
    assert count_of(driver, "A") == 0
    teach(driver, "A", 1.2, 3)
    after_a = count_of(driver, "A")
    time.sleep(1.0)
    assert count_of(driver, "A") == after_a, "releasing the button stops teaching"

    box.show(photos(clothing, "shoes"))
    time.sleep(0.5)
    hold_teach(driver, "B", 1.2)
    wait_until(lambda: count_of(driver, "B") >= 3, 15, what="samples of B")

    box.show(photos(clothing, "hat", "test"))
    wait_until(lambda: text(driver, "#label") == "A", 20, what="label A for unseen hats")
    box.show(photos(clothing, "shoes", "test"))
    wait_until(lambda: text(driver, "#label") == "B", 20, what="label B for unseen shoes")
    lit = driver.execute_script(   # in one go: the LED row is redrawn with every decision
        "return [...document.querySelectorAll('.led.lit')].map((e) => e.dataset.cls).filter(Boolean)")
    assert lit == ["B"]
    wait_until(lambda: driver.find_elements("css selector", "#gallery .thumb img[src^='data:image/jpeg']"), 15,
               what="thumbnails in the gallery")
    screenshot(driver, "web-desktop.png")
    driver.set_window_size(1920, 1080)                     # a classroom projector
    driver.find_element("id", "big-toggle").click()
    picture, label = driver.execute_script(
        "return ['picture', 'label'].map((id) => { const r = document.getElementById(id).getBoundingClientRect();"
        " return [r.left, r.top, r.right, r.bottom]; })")
    height = driver.execute_script("return window.innerHeight")
    assert picture[3] <= height and label[3] <= height, "picture and answer fit on one projected screen"
    assert picture[2] - picture[0] >= 500, "the picture is big on a projector"
    assert label[0] >= picture[2], "the answer is beside the picture"
    screenshot(driver, "web-projector.png")


def test_gallery_delete_is_gone_after_restart(daemons, browser, clothing):
    from selenium.common.exceptions import StaleElementReferenceException
    box, driver = page_on_hats(daemons, browser, clothing)
    teach(driver, "A", 1.2, 3)
    thumb_ids = lambda: driver.execute_script(   # noqa: E731  (in one go: the gallery redraws itself)
        "return [...document.querySelectorAll('#gallery .thumb')].map((t) => Number(t.dataset.id))")
    wait_until(lambda: len(thumb_ids()) == count_of(driver, "A"), 15, what="the gallery to show every sample")
    ids = thumb_ids()
    assert ids == sorted(ids, reverse=True), "newest first"
    victim = ids[1]

    def click_delete():
        try:
            target = driver.find_element("css selector", f"#gallery .thumb[data-id='{victim}'] .del-sample")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
            target.click()
            return True
        except StaleElementReferenceException:   # redrawn between finding and clicking: again
            return False
    wait_until(click_delete, 10, what="a click on the sample's delete button")
    wait_until(lambda: victim not in thumb_ids(), 10, what="the deletion")
    wait_until(lambda: count_of(driver, "A") == len(ids) - 1, 10, what="the count to drop")
    wait_until(lambda: f"A has only {len(ids)} " not in text(driver, "#hints"), 10, what="the hints to follow")
    screenshot(driver, "web-gallery.png")

    box.stop()
    box.start()
    open_page(driver, box)
    wait_until(lambda: len(thumb_ids()) == len(ids) - 1, 20, what="the gallery after the restart")
    assert victim not in thumb_ids()
    assert sorted(thumb_ids()) == sorted(i for i in ids if i != victim)
    assert count_of(driver, "A") == len(ids) - 1


def test_undo_classes_threshold_and_clear_from_the_page(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing)
    by_id = lambda i: driver.find_element("id", i)  # noqa: E731
    names = lambda: driver.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('.class')].map((e) => e.dataset.cls)")
    card_button = lambda cls, css: driver.find_element(  # noqa: E731
        "css selector", f".class[data-cls='{cls}'] {css}")

    teach(driver, "A", 1.0, 2)
    by_id("undo").click()
    wait_until(lambda: count_of(driver, "A") == 0, 10, what="undo to take the teaching back")

    by_id("add-name").send_keys("Cups")
    by_id("add").click()
    wait_until(lambda: names() == ["A", "B", "Cups"], 10, what="the new class")
    card_button("Cups", ".rename").click()
    wait_until(lambda: by_id("rename").is_displayed(), 5, what="the rename dialog")
    by_id("rename-name").clear()
    by_id("rename-name").send_keys("Mugs")
    by_id("rename-yes").click()
    wait_until(lambda: names() == ["A", "B", "Mugs"], 10, what="the renamed class")
    assert not card_button("A", ".remove").is_displayed(), "a class with a button is cleared, not removed"
    card_button("Mugs", ".remove").click()
    wait_until(lambda: by_id("confirm").is_displayed(), 5, what="the confirmation")
    by_id("confirm-yes").click()
    wait_until(lambda: names() == ["A", "B"], 10, what="the class to go")

    card_button("B", ".nothing").click()
    wait_until(lambda: driver.execute_script(
        "return document.querySelector(\".class[data-cls='B'] .nothing\").checked"), 10, what="B to mean nothing")
    wait_until(lambda: driver.execute_script(
        "return [...document.querySelectorAll('.led[data-cls]')].map((e) => e.dataset.cls)") == ["A"], 10,
        what="only A's LED (a nothing class has none)")

    by_id("th-auto").click()                             # off: the slider's value applies
    driver.execute_script("const s = document.getElementById('th-slider'); s.value = '0.8';"
                          "s.dispatchEvent(new Event('change'))")
    wait_until(lambda: text(driver, "#th-value") == "0.80", 10, what="the threshold set by the slider")
    mark = driver.execute_script("return document.querySelector('.score .mark').style.left")
    assert "80%" in mark, mark
    by_id("th-auto").click()
    wait_until(lambda: text(driver, "#th-value").endswith("(automatic)"), 10, what="the automatic threshold")

    teach(driver, "A", 1.0, 2, what="samples of A again")
    by_id("clear-all").click()
    wait_until(lambda: by_id("confirm").is_displayed(), 5, what="the confirmation")
    by_id("confirm-no").click()
    time.sleep(1.0)
    assert count_of(driver, "A") >= 2, "'No, keep it' keeps everything"
    card_button("A", ".clear").click()
    wait_until(lambda: by_id("confirm").is_displayed(), 5, what="the confirmation")
    by_id("confirm-yes").click()
    wait_until(lambda: count_of(driver, "A") == 0, 10, what="A to be cleared")

    box.stop()
    box.start()
    open_page(driver, box)
    assert names() == ["A", "B"] and count_of(driver, "A") == 0
    assert driver.execute_script("return document.querySelector(\".class[data-cls='B'] .nothing\").checked")


def test_export_downloads_a_file_another_box_imports(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing)
    teach(driver, "A", 1.0, 2)
    taught = count_of(driver, "A")
    driver.find_element("id", "export").click()
    files = wait_until(lambda: [p for p in driver.downloads.iterdir() if p.suffix == ".edge"], 20,
                       what="the downloaded export file")
    assert zipfile.is_zipfile(files[0])
    with zipfile.ZipFile(files[0]) as zf:    # the gallery moves too (the page's export left it out)
        assert "thumbnails.bin" in zf.namelist() and zf.getinfo("thumbnails.bin").file_size > 0
    second = daemons(name="second")
    done = subprocess.run([sys.executable, "-m", "edge", "import", str(files[0]), "--config", str(second.config)],
                          capture_output=True, text=True, timeout=120, cwd=second.root)
    assert done.returncode == 0, done.stderr
    assert f"imported {taught} samples" in done.stdout


def test_a_wrong_pin_is_refused_and_changes_nothing(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing, pin="2468")
    wait_until(lambda: driver.find_element("id", "pin-bar").is_displayed(), 10, what="the PIN field")
    driver.find_element("id", "pin").send_keys("1357")
    driver.find_element("id", "pin-go").click()
    wait_until(lambda: text(driver, "#pin-msg") == "wrong PIN", 10, what="the refusal")
    hold_teach(driver, "A", 1.0)
    wait_until(lambda: "PIN" in text(driver, "#teach-msg"), 10, what="teaching refused for want of a PIN")
    time.sleep(1.0)
    assert count_of(driver, "A") == 0
    driver.refresh()
    open_page(driver, box)
    assert count_of(driver, "A") == 0, "nothing was learned"


def other_client(box, *messages, pin=None):
    """Send commands to the box from a second connection (another page, Scratch): their results."""
    async def script(ws, inbox):
        out = []
        for i, (action, body) in enumerate(messages):
            await ws.send_json(dict({"action": action, "body": body, "id": 1000 + i}, **({"pin": pin} if pin else {})))
            while (m := await inbox("result")).get("id") != 1000 + i:
                pass
            out.append(m)
        return out
    return run(ws_session(box, script, origin=box.url.rstrip("/")))


def test_pressing_teach_without_the_pin_does_not_lock_the_teacher_out(daemons, browser, clothing):
    """Each press without the PIN counted as two wrong PINs (record and its stop): the third press
    locked the page for a minute, the right PIN included (30 such from a class: every address)."""
    box, driver = page_on_hats(daemons, browser, clothing, pin="2468")
    for _ in range(6):
        hold_teach(driver, "A", 0.3)
        wait_until(lambda: text(driver, "#teach-msg") == "PIN needed", 10, what="PIN needed")
        driver.execute_script("document.getElementById('teach-msg').textContent = ''")
    driver.find_element("id", "pin").send_keys("2468")
    driver.find_element("id", "pin-go").click()
    wait_until(lambda: text(driver, "#pin-msg") == "unlocked", 10, what="the right PIN to unlock")
    teach(driver, "A", 1.0, 2)


def test_the_teach_button_lets_go_when_the_box_ends_the_teaching(daemons, browser, clothing):
    """Another page's "Forget everything" (or the 30 s limit) ended the recording, but the held
    button went on saying "Teaching… let go to stop"."""
    from selenium.webdriver import ActionChains
    box, driver = page_on_hats(daemons, browser, clothing)
    button = driver.find_element("css selector", ".class[data-cls='A'] .hold")
    hold = ActionChains(driver).click_and_hold(button)
    hold.perform()
    wait_until(lambda: count_of(driver, "A") >= 2, 15, what="teaching A")
    assert other_client(box, ("clear", {"all": True}))[0]["ok"]
    wait_until(lambda: button.text == "Hold to teach", 10, what="the button to let go")
    assert "stopped learning “A”" in text(driver, "#teach-msg")
    ActionChains(driver).release().perform()
    time.sleep(1.0)
    assert count_of(driver, "A") == 0, "nothing more was learned"


def test_teaching_with_the_keyboard_survives_another_page_adding_a_class(daemons, browser, clothing):
    """The card was rebuilt under the held key: its keyup listener went with it, A recorded on,
    and the next press of B stopped A instead of teaching B."""
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.keys import Keys
    box, driver = page_on_hats(daemons, browser, clothing)
    driver.execute_script("document.querySelector(\".class[data-cls='A'] .hold\").focus()")
    ActionChains(driver).key_down(Keys.SPACE).perform()
    wait_until(lambda: count_of(driver, "A") >= 2, 15, what="teaching A with the space bar")
    assert other_client(box, ("classes", {"add": "C"}))[0]["ok"]
    wait_until(lambda: driver.find_elements("css selector", ".class[data-cls='C']"), 10, what="the new card")
    assert "Teaching" in text(driver, ".class[data-cls='A'] .hold"), "the rebuilt card shows the hold"
    ActionChains(driver).key_up(Keys.SPACE).perform()
    wait_until(lambda: driver.find_element("id", "recording").get_attribute("hidden") is not None, 10,
               what="the recording to stop when the key is let go")
    teach(driver, "B", 1.0, 2)


def test_a_refused_change_shows_the_box_value_again_and_a_stopped_box_no_answer(daemons, browser, clothing):
    box, driver = page_on_hats(daemons, browser, clothing, pin="2468")
    nothing = driver.find_element("css selector", ".class[data-cls='B'] .nothing")
    nothing.click()
    wait_until(lambda: text(driver, "#teach-msg") == "PIN needed", 10, what="the refusal")
    wait_until(lambda: not nothing.is_selected(), 5, what="the checkbox to show the box's value")
    auto = driver.find_element("id", "th-auto")
    auto.click()
    wait_until(lambda: auto.is_selected(), 5, what="automatic to stay ticked")
    wait_until(lambda: text(driver, "#label") not in ("…", "not connected"), 20, what="an answer")
    box.stop()
    wait_until(lambda: text(driver, "#label") == "not connected", 20, what="the page to stop showing an answer")
    assert "offline" in driver.find_element("tag name", "body").get_attribute("class")
    screenshot(driver, "web-stopped.png")
    assert not driver.find_elements("css selector", "#leds .led.lit")


def test_eight_long_class_names_fit_a_phone(daemons, browser, clothing):
    """Names of 32 letters without a space widened the page to 488 px on a 375 px phone."""
    box = daemons()
    box.show(photos(clothing, "hat"))
    box.start()
    driver = browser(mobile=True)
    open_page(driver, box)
    names = [letter * 32 for letter in "WMQOGH"]
    assert all(r["ok"] for r in other_client(box, *[("classes", {"add": n}) for n in names]))
    wait_until(lambda: len(driver.find_elements("css selector", ".class")) == 8, 10, what="eight cards")
    driver.execute_script("document.getElementById('gallery-class').value = arguments[0]; "
                          "document.getElementById('gallery-class').dispatchEvent(new Event('change'))", names[0])
    wait_until(lambda: names[0] in text(driver, "#hints"), 10, what="the hints naming the classes")
    width = driver.execute_script("return window.innerWidth")
    widest = driver.execute_script("return Math.max(...[...document.querySelectorAll('body *')]"
                                   ".filter((e) => e.offsetParent !== null).map((e) => e.getBoundingClientRect().right))")
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot(driver, "web-phone-long-names.png")
    assert widest <= width + 1 and driver.execute_script("return document.documentElement.scrollWidth") <= width + 1, \
        (widest, width)


def test_a_phone_sized_screen_shows_every_control(daemons, browser, clothing):
    box = daemons(pin="2468")
    box.show(photos(clothing, "hat"))
    box.start()
    driver = browser(mobile=True)
    open_page(driver, box)
    width = driver.execute_script("return window.innerWidth")
    assert width <= 420
    controls = ["#pin", "#pin-go", "#big-toggle", "#undo", "#clear-all", "#add-name", "#add", "#th-auto",
                "#th-slider", "#gallery-class", "#export", "#import-file", "#import", "#picture, #no-picture",
                "#label", "#about-editor"]
    controls += [f".class[data-cls='{c}'] {b}" for c in "AB" for b in (".hold", ".rename", ".clear", ".nothing")]
    for css in controls:
        el = driver.find_element("css selector", css)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                     "return [r.left, r.right, r.width, r.height]", el)
        assert el.is_displayed(), css
        assert rect[2] > 0 and rect[3] > 0 and rect[0] >= -1 and rect[1] <= width + 1, (css, rect, width)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width + 1, "no sideways scrolling"
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot(driver, "web-phone.png")
    driver.execute_script("document.getElementById('teach').scrollIntoView()")
    screenshot(driver, "web-phone-teach.png")


# --- Scratch -------------------------------------------------------------------------------------

def _node_ready():
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "scratch-vm").is_dir():
        message = "node and tests/node/node_modules are needed (cd tests/node && npm install)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return node


def test_scratch_extension_in_the_real_scratch_vm(daemons, clothing):
    node = _node_ready()
    box = daemons(pin="2468")
    box.show(photos(clothing, "hat"))
    box.start()
    done = subprocess.run([node, str(NODE_DIR / "edge_box_extension.js"), box.url, "2468"],
                          capture_output=True, text=True, timeout=120, cwd=NODE_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["default_url"] == f"ws://127.0.0.1:{box.port}/ws", "the default address is the box itself"
    assert report["wrong_address"].startswith("box not found at ws://127.0.0.1:1/")
    assert report["wrong_pin"] == "wrong PIN"
    assert report["connected"] is True and report["problem"] == ""
    assert report["label"] in ("unknown", "A", "B")
    assert report["teach_result"] == "ok"
    assert report["examples_after"] >= report["examples_before"] + 3
    assert report["label_after"] == "A"


def test_the_box_serves_a_scratch_editor_with_its_blocks(daemons, browser, clothing):
    from edge.web import EDITOR_DIR
    if not (EDITOR_DIR / "scratch-gui.js").is_file():
        message = f"no Scratch editor in {EDITOR_DIR} (run script/scratch-editor)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    box = daemons(pin="2468")
    box.show(photos(clothing, "hat"))
    box.start()
    driver = browser()
    driver.get(box.url + "scratch/")
    assert driver.current_url == box.url + "scratch/editor/"
    categories = lambda: [e.text for e in driver.find_elements("css selector", ".scratchCategoryMenuItem")]  # noqa: E731
    wait_until(lambda: "edge box" in categories(), 60, 0.5, "the edge box blocks in the editor")
    item = [e for e in driver.find_elements("css selector", ".scratchCategoryMenuItem") if e.text == "edge box"][0]
    item.click()
    time.sleep(1.0)
    screenshot(driver, "web-scratch.png")
    driver.set_script_timeout(60)
    report = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        (async () => {
          const p = vm.runtime._primitives;           // the blocks as the VM runs them
          const url = edgeBox.getInfo().blocks.find((b) => b.opcode === "connect").arguments.URL.defaultValue;
          await p.edgebox_connect({URL: url, PIN: "2468"});
          const out = {url, connected: p.edgebox_isConnected(), problem: p.edgebox_getProblem()};
          await new Promise((r) => setTimeout(r, 1000));
          out.before = p.edgebox_samples({CLASS: "A"});
          await p.edgebox_teach({CLASS: "A", COUNT: 4});
          out.answer = p.edgebox_getResult();
          await new Promise((r) => setTimeout(r, 3000));
          out.after = p.edgebox_samples({CLASS: "A"});
          out.label = p.edgebox_getLabel();
          return out;
        })().then(done, (e) => done({error: String(e)}));
    """)
    outside = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
        ".filter((u) => !u.startsWith(location.origin) && !u.startsWith('data:') && !u.startsWith('blob:'))")
    assert outside == [], f"the editor asked for files from outside the box: {outside[:5]}"
    assert report.get("url") == f"ws://127.0.0.1:{box.port}/ws", report
    assert report["connected"] is True and report["problem"] == "", report
    assert report["answer"] == "ok", report
    assert report["after"] >= report["before"] + 3, report


def _lan_address():
    """This machine's address on its network (what a classroom laptop would use for the box)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))      # picks the outgoing interface; sends nothing
            return s.getsockname()[0]
        except OSError:
            return None


def test_an_https_editor_cannot_reach_the_box(daemons, browser, clothing, tmp_path):
    """Why docs/web.md sends teachers to the box's own editor: a page loaded over https (like
    turbowarp.org or scratch.mit.edu) may not open ws:// to a box on the network, nor fetch its
    extension over http (mixed content), in a real Chromium."""
    import http.server
    import ssl
    import threading
    lan = _lan_address()
    if lan is None or lan.startswith("127."):
        pytest.skip("this machine has no network address besides loopback to play the box's")
    box = daemons(host="0.0.0.0")
    box.show(photos(clothing, "hat"))
    box.start()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    page = b"<!doctype html><title>an https editor</title>"

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        opts = _chrome_options(tmp_path)
        opts.add_argument("--ignore-certificate-errors")     # our own certificate, as a real site has one
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            driver.get(f"https://127.0.0.1:{httpd.server_address[1]}/")
            assert driver.execute_script("return window.isSecureContext") is True
            driver.set_script_timeout(30)
            report = driver.execute_async_script("""
                const [ws, js, done] = arguments;
                const out = {};
                const socket = new Promise((resolve) => {
                  try {
                    const s = new WebSocket(ws);
                    s.onopen = () => { resolve("opened"); s.close(); };
                    s.onerror = () => resolve("refused");
                  } catch (e) { resolve(e.name); }
                });
                const file = fetch(js).then((r) => "fetched " + r.status, (e) => e.name);
                Promise.all([socket, file]).then(([a, b]) => done({socket: a, extension: b}));
            """, f"ws://{lan}:{box.port}/ws", f"http://{lan}:{box.port}/scratch/edge-box.js")
        finally:
            driver.quit()
    finally:
        httpd.shutdown()
    assert report["socket"] == "SecurityError", report          # "An insecure WebSocket connection
    #                                                             may not be initiated from a page loaded over HTTPS"
    assert report["extension"] == "TypeError", report          # blocked: "Failed to fetch"
    with urllib.request.urlopen(f"http://{lan}:{box.port}/scratch/edge-box.js", timeout=10) as r:
        assert r.status == 200, "the box itself answers on that address (only the browser refused)"


def test_one_device_cannot_take_every_page_place_and_is_told_why(server):
    """Pages are limited per address as well as in all (one device kept all 32 places and every
    other page showed only "not connected"); a refused page is closed with the reason, which the
    page shows (code 1013, try again later)."""
    from edge.web import MAX_CLIENTS_PER_ADDRESS
    srv, _ = server()

    async def script():
        async with aiohttp.ClientSession() as session:
            held = [await session.ws_connect(f"http://127.0.0.1:{srv.port}/ws")
                    for _ in range(MAX_CLIENTS_PER_ADDRESS)]
            for ws in held:
                assert json.loads((await ws.receive()).data)["type"] == "hello"
            extra = await session.ws_connect(f"http://127.0.0.1:{srv.port}/ws")
            msg = await asyncio.wait_for(extra.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013, msg
            assert "this device has 8 pages" in msg.extra, msg
            await held[0].close()
            await asyncio.sleep(0.3)
            again = await session.ws_connect(f"http://127.0.0.1:{srv.port}/ws")
            assert json.loads((await asyncio.wait_for(again.receive(), 10)).data)["type"] == "hello"
            for ws in held[1:] + [again]:
                await ws.close()
    run(script())


def test_files_are_loaded_one_at_a_time(server):
    """Each upload holds its whole file in memory: 16 at once took 36 MB each. A second one
    while the first is read or loaded is refused at once, in one line, and the first goes on."""
    import threading
    srv, queue = server(answer=None)            # the box answers when the test says so
    done = {"action": "import", "ok": True, "message": "imported 1 samples in 1 classes"}
    first = {}
    t = threading.Thread(target=lambda: first.update(r=http(srv, "/api/import", "POST", b"PK first")))
    t.start()
    wait_until(lambda: queue.requests, what="the first upload reaching the box")
    status, body, _ = http(srv, "/api/import", "POST", b"PK second")      # the box is busy loading it
    assert status == 503 and "another file is being loaded" in json.loads(body)["error"]
    queue.requests[0].reply(done)
    t.join(10)
    assert first["r"][0] == 200 and len(queue.requests) == 1
    third = {}
    t = threading.Thread(target=lambda: third.update(r=http(srv, "/api/import", "POST", b"PK third")))
    t.start()                                   # the place is free again
    wait_until(lambda: len(queue.requests) == 2, what="the third upload reaching the box")
    queue.requests[1].reply(done)
    t.join(10)
    assert third["r"][0] == 200
