"""The box's own web page: see what the camera sees, teach the box, fix what it learned.

An aiohttp server on its own thread and event loop. Like the MQTT link it never touches the head
or the store: browsers' commands become `edge.commands.Request`s in the loop's one queue
(`submit`), and what the box says comes back through the `Outputs` calls (decision, state, event,
preview), made on the loop thread, which only hand the value over to this thread and return.
The frame's decision and picture are only kept there; `flush`, at the end of the loop's turn,
wakes this thread once for both, so it never takes the interpreter from the loop mid-frame.

One WebSocket (`/ws`) carries everything live both ways, for the page and for the Scratch
extension; export and import are plain POSTs because they move files. Security (docs/web.md):
a PIN for every change, wrong PINs rate-limited, no GET changes anything, the Origin (and the
Host, against DNS rebinding) of WebSocket and POST requests checked, uploads bounded, and no
request ever names a file: the static files are a fixed table read at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Optional, Set

from aiohttp import WSCloseCode, WSMsgType, web

from edge import __version__, commands, rules
from edge.commands import CommandInvalid, Request

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FILES = {  # URL -> (file under edge/static, content type). Nothing else is ever read from disk.
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/scratch/edge-box.js": ("scratch/edge-box.js", "text/javascript; charset=utf-8"),
    "/scratch/editor.html": ("scratch/editor.html", "text/html; charset=utf-8"),
    "/scratch/missing.html": ("scratch/missing.html", "text/html; charset=utf-8"),
}
EDITOR_DIR = Path(__file__).resolve().parent.parent / "var" / "scratch-editor"
"""Where script/scratch-editor puts the Scratch 3 editor the box serves at /scratch/."""
EDITOR_URL = "/scratch/editor/"
MAX_EDITOR_FILES = 5000
EXTENSION_URL = "/scratch/edge-box.js"
WS_PLACEHOLDER = "__EDGE_DEFAULT_WS__"
MAX_WS_MESSAGE = 8192          # a command is a few dozen bytes
MAX_CLIENTS = 32
MAX_CLIENTS_PER_ADDRESS = 8    # one device cannot take every page's place
BUSY = "another file is being loaded into or saved from the box; try again in a moment"
MAX_BACKLOG = 256              # JSON messages waiting for one slow browser before it is dropped
DECISION_INTERVAL = 0.1        # at most 10 decisions a second per browser (label changes always)
ANSWER_TIMEOUT = 60.0          # export/import wait this long for the loop
PIN_TRIES = 5                  # wrong PINs per address per PIN_WINDOW before it must wait
PIN_WINDOW = 60.0
PIN_TRIES_ALL = 30             # wrong PINs from all addresses together per PIN_WINDOW
PREVIEW_QUALITY = 70


class WebServer:
    """The page's server; implements `Outputs`. `start()` binds and serves on its own thread;
    a port that cannot be bound is logged and the box runs on without the page."""

    def __init__(self, cfg, submit: Callable[[Request], None], device_id: str = "edge",
                 max_upload: int = 16 << 20, editor_dir: Optional[Path] = EDITOR_DIR):
        self.cfg = cfg
        self.device_id = device_id
        self.max_upload = max_upload
        self.port: Optional[int] = None          # the bound port (cfg.port, or the free one for 0)
        self._submit = submit
        self._pin = cfg.pin
        self._files = {url: ((STATIC / name).read_bytes(), kind) for url, (name, kind) in FILES.items()}
        self._editor = _editor_files(editor_dir)
        self._started = time.time()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._clients: Set["_Client"] = set()
        self._watching = 0                        # clients that want the live picture
        self._moving = False                      # one file loaded or saved at a time: each is held whole
        self._state: Optional[dict] = None
        self._decision: Optional[dict] = None
        self._preview = None
        self._preview_pending = False
        self._due: Optional[dict] = None          # the turn's decision, sent at flush
        self._picture_due = False                 # a picture was kept this turn
        self._failures: Dict[str, Deque[float]] = {}
        self._failures_all: Deque[float] = deque()
        self.frames_sent = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> bool:
        """Start serving; True when listening. Never raises for a busy port (logged instead)."""
        if self._thread is not None:
            return self.port is not None
        self._thread = threading.Thread(target=self._run, name="edge-web", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        return self.port is not None

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and self._stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop ended meanwhile
                pass
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            log.exception("web: the page's server stopped")
        finally:
            self._ready.set()
            self._loop = None
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=self.max_upload, middlewares=[self._guard])
        for url in self._files:
            app.router.add_get(url, self._static)
        app.router.add_get("/scratch/", self._scratch)
        app.router.add_get(EDITOR_URL, self._scratch)
        app.router.add_get(EDITOR_URL + "{name:.+}", self._editor_file)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/api/export", self._export)
        app.router.add_post("/api/import", self._import)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True)
            await site.start()
        except OSError as exc:
            log.error("web: cannot listen on %s:%s (%s); the box runs on without its page",
                      self.cfg.host, self.cfg.port, exc.strerror or exc)
            await runner.cleanup()
            return
        sockets = getattr(site._server, "sockets", None) or []   # aiohttp has no public getter
        self.port = sockets[0].getsockname()[1] if sockets else self.cfg.port
        log.info("web: page on http://%s:%s/ (%s)", self.cfg.host, self.port,
                 "PIN needed for changes" if self._pin else "no PIN: anyone on the network can teach")
        self._ready.set()
        await self._stop.wait()
        for client in list(self._clients):
            await client.ws.close()
        await runner.cleanup()

    # --- Outputs (loop thread: hand over and return at once) ---------------------------------

    def decision(self, d) -> None:
        self._decision = {"type": "decision", "label": d.label, "index": d.index, "confidence": d.confidence,
                          "scores": d.scores, "ts": round(d.ts, 3), "frame": d.frame, "changed": d.changed}
        if self._clients:
            self._due = self._decision

    def state(self, s: dict) -> None:
        self._state = {"type": "state", "state": dict(s)}
        if self._clients:
            self._call(self._broadcast, self._state)

    def event(self, e: dict) -> None:
        if self._clients:
            self._call(self._broadcast, dict(e, type="event"))

    def preview(self, rgb) -> None:
        if self._watching and not self._preview_pending:
            self._preview, self._preview_pending = rgb, True
            self._picture_due = True

    def flush(self) -> None:
        """End of the loop's turn: one wake-up of this thread for the decision and the picture
        kept since the last turn (a wake-up mid-frame let this thread take the interpreter from
        the loop: 0.47 ms a frame with two Chromium pages, benchmarks/README.md)."""
        due, self._due = self._due, None
        picture, self._picture_due = self._picture_due, False
        if due is not None or picture:
            self._call(self._send_turn, due, picture)

    def _call(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # closing
                pass

    # --- fan-out (web thread) ----------------------------------------------------------------

    def _broadcast(self, message: dict) -> None:
        text = _json(message)
        for client in list(self._clients):
            client.send_text(text)

    def _send_turn(self, decision: Optional[dict], picture: bool) -> None:
        if decision is not None:
            self._send_decision(decision)
        if picture:
            self._send_preview()

    def _send_decision(self, message: dict) -> None:
        now = time.monotonic()
        text = None
        for client in list(self._clients):
            if message["changed"] or now - client.last_decision >= DECISION_INTERVAL:
                client.last_decision = now
                text = text or _json(message)
                client.send_text(text)

    def _send_preview(self) -> None:
        rgb, self._preview = self._preview, None
        try:
            if rgb is None or not self._watching:
                return
            from PIL import Image
            out = io.BytesIO()
            Image.fromarray(rgb).save(out, "JPEG", quality=PREVIEW_QUALITY)
            data = out.getvalue()
            for client in list(self._clients):
                if client.watching:
                    client.send_frame(data)
            self.frames_sent += 1
        except Exception:
            log.exception("web: encoding the live picture failed")
        finally:
            self._preview_pending = False

    # --- security ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Refuse requests whose Host is not this box (DNS rebinding) or, for POST and the
        WebSocket, whose Origin is another site; set headers that keep the page to itself."""
        if not _host_ok(request.host):
            return _refuse(421, f"this box does not answer to the name {request.host[:80]!r}; "
                                "open it by its IP address or its .local name")
        if request.method == "POST" or request.path == "/ws":
            origin = request.headers.get("Origin")
            if origin is not None and not _same_origin(origin, request):
                # escaped: a path's %0A decodes to a newline, which would forge a log line
                log.warning("web: refused a %s from another site (%s)", rules.show(request.path, 80),
                            rules.show(origin, 80))
                return _refuse(403, "requests from other sites are refused")
        elif request.method not in ("GET", "HEAD"):
            return _refuse(405, "method not allowed")
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path != EXTENSION_URL:   # other editors fetch the extension; the page stays ours
            response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    def _pin_ok(self, address: str, pin: Any) -> Optional[str]:
        """None when `pin` is right (or none is set), else the error to send back."""
        if self._pin is None:
            return None
        now = time.monotonic()
        tries = self._failures.get(address, deque())
        for queue in (tries, self._failures_all):
            while queue and now - queue[0] > PIN_WINDOW:
                queue.popleft()
        if len(tries) >= PIN_TRIES or len(self._failures_all) >= PIN_TRIES_ALL:
            oldest = tries[0] if len(tries) >= PIN_TRIES else self._failures_all[0]
            return f"too many wrong PINs; try again in {max(1, round(PIN_WINDOW - (now - oldest)))} s"
        if isinstance(pin, str) and hmac.compare_digest(pin.encode("utf-8", "surrogatepass"), self._pin.encode()):
            if not tries:
                self._failures.pop(address, None)
            return None
        if pin in (None, ""):    # no guess: a child pressing "Hold to teach" must not lock the teacher out
            return "PIN needed"
        self._failures[address] = tries
        tries.append(now)
        self._failures_all.append(now)
        if len(self._failures) > 1000:   # bounded: forget the quietest addresses
            for key in [k for k, v in self._failures.items() if not v][:500]:
                del self._failures[key]
        log.warning("web: wrong PIN from %s", address)
        return "wrong PIN"

    # --- static files ------------------------------------------------------------------------

    async def _static(self, request: web.Request) -> web.Response:
        body, kind = self._files[request.path]
        if request.path == EXTENSION_URL:
            body = body.replace(WS_PLACEHOLDER.encode(), json.dumps(_ws_url(request)).encode())
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})

    async def _scratch(self, request: web.Request) -> web.Response:
        """The Scratch editor with the box's blocks, or how to get it when it is not installed.
        Served at /scratch/editor/ because the editor loads its pictures relative to the page."""
        if request.path != EDITOR_URL:
            raise web.HTTPFound(EDITOR_URL)
        body, kind = self._files["/scratch/editor.html" if self._editor else "/scratch/missing.html"]
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})

    async def _editor_file(self, request: web.Request) -> web.StreamResponse:
        """One file of the editor, looked up in the table made at start (the request names no path)."""
        found = self._editor.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        path, kind = found
        return web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "max-age=86400"})

    # --- the WebSocket -----------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        address = request.remote or "?"
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=MAX_WS_MESSAGE)
        await ws.prepare(request)
        # counted after the handshake and the client added with no await between: connections
        # made at once from one device all passed a count made before it
        full = None
        if len(self._clients) >= MAX_CLIENTS:
            full = f"the box has {MAX_CLIENTS} pages open, the most: close one"
        elif sum(1 for c in self._clients if c.address == address) >= MAX_CLIENTS_PER_ADDRESS:
            full = f"this device has {MAX_CLIENTS_PER_ADDRESS} pages of the box open, the most: close one"
        if full is not None:    # closed with the reason, which the page shows (an HTTP error it cannot read)
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=full.encode("utf-8"))
            return ws
        client = _Client(self, ws, address)
        self._clients.add(client)
        writer = asyncio.ensure_future(client.write())
        client.send_json({"type": "hello", "device_id": self.device_id, "version": __version__,
                          "pin_required": self._pin is not None, "uptime": round(time.time() - self._started),
                          "extension": EXTENSION_URL})
        for message in (self._state, self._decision):
            if message is not None:
                client.send_json(message)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._receive(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    client.send_json({"type": "result", "ok": False, "error": "send commands as JSON text"})
        finally:
            self._clients.discard(client)
            client.set_watching(False)
            if client.recording is not None:   # hold to teach: leaving the page lets go
                self._submit(Request(commands.StopRecording(client.recording), source="web"))
            writer.cancel()
        return ws

    def _receive(self, client: "_Client", text: str) -> None:
        """One message from a browser: {"action", "body"?, "id"?, "pin"?}, or a page setting."""
        try:
            message, _ = commands.decode(text.encode("utf-8"), MAX_WS_MESSAGE)
        except CommandInvalid as exc:
            client.send_json({"type": "result", "ok": False, "error": str(exc)})
            return
        if not isinstance(message, dict):
            client.send_json({"type": "result", "ok": False, "error": "send a JSON object"})
            return
        ident = commands.request_id(message.get("id"))
        if message.get("type") == "watch":       # the live picture on or off (not a change)
            client.set_watching(bool(message.get("on")))
            return
        if message.get("type") == "login":
            error = self._pin_ok(client.address, message.get("pin"))
            client.authorized = error is None
            client.send_json({"type": "login", "ok": error is None, "error": error, "id": ident})
            return
        action = message.get("action")
        result: Dict[str, Any] = {"type": "result", "action": str(action)[:64], "ok": False}
        if ident is not None:
            result["id"] = ident
        if not isinstance(action, str):
            client.send_json(dict(result, error="'action' is missing"))
            return
        try:
            command = commands.parse(action, message.get("body", {}))
        except CommandInvalid as exc:
            client.send_json(dict(result, error=str(exc)))
            return
        if command.changes and not client.authorized:
            error = self._pin_ok(client.address, message.get("pin"))
            if error is not None:
                client.send_json(dict(result, error=error))
                return
            client.authorized = True
        if command.changes:
            log.info("web: %s %s from %s", action, message.get("body", {}), client.address)
        if isinstance(command, commands.StopRecording):
            client.recording = None

        def answered(answer: dict) -> None:   # web thread
            if isinstance(command, commands.Record) and answer.get("ok"):
                client.recording = command.cls
            client.send_json(dict(answer, type="result"))

        def reply(answer: dict) -> None:   # loop thread
            self._call(answered, answer)

        self._submit(Request(command, source="web", id=ident, reply=reply))

    # --- export and import -------------------------------------------------------------------

    async def _ask(self, command) -> dict:
        """Submit a command and wait for the loop's answer (for the file routes)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def reply(result: dict) -> None:   # loop thread
            loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(result))

        self._submit(Request(command, source="web", reply=reply))
        try:
            return await asyncio.wait_for(answer, ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            return {"ok": False, "error": "the box did not answer in time"}

    @contextlib.contextmanager
    def _moving_one(self):
        """The one file being loaded or saved (`_moving`), for the request's while."""
        self._moving = True
        try:
            yield
        finally:
            self._moving = False

    async def _export(self, request: web.Request) -> web.Response:
        error = self._pin_ok(request.remote or "?", request.headers.get("X-Edge-Pin"))
        if error is not None:
            return _refuse(403, error)
        if self._moving:
            return _refuse(503, BUSY)
        with self._moving_one():
            result = await self._ask(commands.Export(thumbnails=True))    # the gallery moves with the box
        data = result.get("data")
        if not result.get("ok") or not isinstance(data, (bytes, bytearray)):
            return _refuse(500, result.get("error") or "export failed")
        name = f"edge-{self.device_id}-{time.strftime('%Y%m%d-%H%M')}.edge"
        log.info("web: export of %d bytes to %s", len(data), request.remote)
        return web.Response(body=bytes(data), headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    async def _import(self, request: web.Request) -> web.Response:
        error = self._pin_ok(request.remote or "?", request.headers.get("X-Edge-Pin"))
        if error is not None:
            return _refuse(403, error)
        if request.content_length is not None and request.content_length > self.max_upload:
            return _refuse(413, f"the file is larger than {self.max_upload >> 20} MB; is it an export file?")
        if self._moving:        # 16 uploads at once took 36 MB each (a Pi Zero 2 has 512 MB in all)
            return _refuse(503, BUSY)
        with self._moving_one():
            try:
                data = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _refuse(413, f"the file is larger than {self.max_upload >> 20} MB; is it an export file?")
            if not data:
                return _refuse(400, "no file was sent")
            log.info("web: import of %d bytes from %s", len(data), request.remote)
            result = await self._ask(commands.Import(bytes(data)))
        result.pop("data", None)
        return web.json_response(result, status=200 if result.get("ok") else 400, dumps=_json_text)


class _Client:
    """One open page (or Scratch project): what it may do and what waits to be sent to it."""

    def __init__(self, server: WebServer, ws: web.WebSocketResponse, address: str):
        self.server = server
        self.ws = ws
        self.address = address
        self.authorized = server._pin is None
        self.watching = False
        self.recording: Optional[str] = None
        self.last_decision = 0.0
        self._texts: Deque[str] = deque()
        self._frame: Optional[bytes] = None
        self._wake = asyncio.Event()

    def set_watching(self, on: bool) -> None:
        if on != self.watching:
            self.watching = on
            self.server._watching += 1 if on else -1

    def send_json(self, message: dict) -> None:
        self.send_text(_json(message))

    def send_text(self, text: str) -> None:
        if len(self._texts) >= MAX_BACKLOG:       # a page that stopped reading: let it go
            asyncio.ensure_future(self.ws.close())
            return
        self._texts.append(text)
        self._wake.set()

    def send_frame(self, data: bytes) -> None:
        self._frame = data                        # only the newest picture waits
        self._wake.set()

    async def write(self) -> None:
        try:
            while not self.ws.closed:
                await self._wake.wait()
                self._wake.clear()
                while self._texts:
                    await self.ws.send_str(self._texts.popleft())
                if self._frame is not None:
                    frame, self._frame = self._frame, None
                    await self.ws.send_bytes(frame)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception:       # never a page left open but silent: it reconnects
            log.exception("web: sending to a page failed; closing its connection")
            await self.ws.close()


def _editor_files(folder: Optional[Path]) -> Dict[str, tuple]:
    """Relative URL -> (file, content type) of every regular file under the editor's folder,
    listed once at start; symbolic links and hidden files are left out."""
    import mimetypes
    table: Dict[str, tuple] = {}
    if folder is None or not folder.is_dir():
        return table
    root = folder.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file() \
                or root not in path.resolve().parents:
            continue
        if len(table) >= MAX_EDITOR_FILES:
            log.warning("web: more than %d files in %s; the rest are not served", MAX_EDITOR_FILES, folder)
            break
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json", "image/svg+xml"):
            kind = ("text/javascript" if kind == "application/javascript" else kind) + "; charset=utf-8"
        table[rel.as_posix()] = (path, kind)
    if "scratch-gui.js" not in table:
        log.warning("web: %s has no scratch-gui.js; run script/scratch-editor again", folder)
        return {}
    log.info("web: Scratch editor from %s (%d files)", folder, len(table))
    return table


# --- helpers -------------------------------------------------------------------------------------

def _json_text(value: Any) -> str:
    """JSON text a WebSocket can send (commands.to_json)."""
    return commands.to_json(value).decode("utf-8")


_json = _json_text

_NAME = re.compile(r"[A-Za-z0-9-]{1,63}")
LOCAL_SUFFIXES = (".local", ".lan", ".home", ".home.arpa", ".internal", ".localdomain")


def _split_host(host: str) -> str:
    """The name part of a Host header (without the port; IPv6 without brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host_ok(host: Optional[str]) -> bool:
    """A Host a browser uses for a box on the local network: an IP address, localhost, a bare
    host name, a local-network name (.local, .lan, ...) or this machine's own full name. A page
    of another site that re-points its DNS name at the box (DNS rebinding) arrives with its own
    name and is refused."""
    if not host:
        return True      # HTTP/1.0 tools; browsers always send it
    name = _split_host(host)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not all(_NAME.fullmatch(label) for label in labels):
        return False
    name = ".".join(labels)
    if len(labels) == 1 or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        return name in (socket.getfqdn().lower(), socket.gethostname().lower())
    except OSError:
        return False


def _same_origin(origin: str, request: web.Request) -> bool:
    """The Origin header names this very box (scheme, host and port as the browser sees it)."""
    return origin.lower() in (f"http://{request.host}".lower(), f"https://{request.host}".lower())


def _ws_url(request: web.Request) -> str:
    """The box's WebSocket as the client reached it: the Scratch extension's default address."""
    host = request.host if request.host and _host_ok(request.host) else "raspberrypi.local:8080"
    return f"ws://{host}/ws"


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)
