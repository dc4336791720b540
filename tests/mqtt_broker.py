"""Test helpers for MQTT: a real mosquitto on a free local port, and a watching client.

`Broker` writes its own config into a temporary folder (plain, password or TLS listener), can be
killed and started again on the same port (a broker restart), and is always killed at teardown.
`Watcher` is an ordinary paho client that records every message it sees; each wait has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def mosquitto_available() -> bool:
    return os.access(MOSQUITTO, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition"):
    """Poll until predicate() is truthy; returns its value or raises AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def make_certs(folder: Path) -> dict:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 (EC keys: fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
        "-subj", "/CN=edge test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return {"ca": ca_crt, "cert": crt, "key": key, "ca_key": ca_key}


class Broker:
    """One mosquitto process with a generated config; `stop()` kills it, `start()` brings it back."""

    def __init__(self, folder: Path, users: Optional[dict] = None, tls: Optional[dict] = None,
                 port: Optional[int] = None, websockets: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users
        self.tls = tls
        # A second listener speaking MQTT over WebSockets (what browsers and Scratch use), with
        # the same logins: mosquitto's settings are global unless per_listener_settings is on.
        self.ws_port: Optional[int] = free_port() if websockets else None
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.folder / "mosquitto.log"
        self.conf = self.folder / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            lines.append("user root")   # keep access to the files in the temporary folder
        if self.users:
            passwd = self.folder / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password],
                               check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}",
                      f"keyfile {self.tls['key']}"]
        if self.ws_port:
            lines += [f"listener {self.ws_port} 127.0.0.1", "protocol websockets"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> "Broker":
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.log.read_text()[-2000:]}")
            try:
                for port in (self.port, self.ws_port):
                    if port:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Kill the broker abruptly (SIGKILL): what a crash or a power cut looks like."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Watcher:
    """A plain MQTT client that subscribes to some topics and remembers every message."""

    def __init__(self, broker: Broker, topics=("#",), username=None, password=None, tls_ca=None):
        self.messages: List[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"watcher-{time.monotonic_ns()}")
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.topics = list(topics)
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "watcher did not subscribe"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def on(self, topic: str) -> List[paho.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def payloads(self, topic: str) -> List[str]:
        return [m.payload.decode() for m in self.on(topic)]

    def json(self, topic: str) -> List[dict]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait(self, topic: str, predicate: Callable[[paho.MQTTMessage], bool] = lambda m: True,
             timeout: float = 10.0, after: int = 0) -> paho.MQTTMessage:
        """The first message on `topic` (counting from index `after` of all messages) that matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[after:]:
                    if m.topic == topic and predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages[after:]][-10:]
                    raise AssertionError(f"no matching message on {topic} within {timeout}s; last seen: {seen}")
                self._cond.wait(left)

    def mark(self) -> int:
        """The index of the next message, for `wait(..., after=mark)`."""
        with self._cond:
            return len(self.messages)

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
