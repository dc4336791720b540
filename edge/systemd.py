"""A tiny systemd notify client (stdlib only): READY, WATCHDOG pings, STATUS and STOPPING.

Does nothing when NOTIFY_SOCKET is unset, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams; pings the watchdog at most twice per WatchdogSec."""

    def __init__(self, address: Optional[str] = None, watchdog_usec: Optional[str] = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock = None
        self._address = None
        if address:
            if address.startswith("@"):  # abstract namespace socket
                address = "\0" + address[1:]
            self._address = address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = watchdog_usec if watchdog_usec is not None else os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            # Never block the frame loop: if systemd is not reading, drop the message.
            self._sock.sendto(message.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal
            log.debug("sd_notify %r failed: %s", message, exc)

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Called from the frame loop: a loop that stops turning stops the pings."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
