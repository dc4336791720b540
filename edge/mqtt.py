"""The MQTT link: what the box sees goes out, commands and training frames come in.

A thin layer over paho-mqtt 2.x (callback API v2). `connect_async` + `loop_start` run the network
on paho's own thread, so a broker that is down at boot, or restarts later, only delays messages:
paho reconnects with backoff and `on_connect` subscribes again and re-announces the retained
topics. Commands are parsed and checked here, on paho's thread, then handed to the box's queue as
`edge.commands.Request`s; only the box's loop thread changes state. docs/mqtt.md is the contract.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import __version__, commands, rules
from edge.commands import Decision, Outputs
from edge.camera import Camera
from edge.image import ImageError, load_image

log = logging.getLogger(__name__)

COMMAND_MAX_BYTES = commands.MAX_PAYLOAD
FRAME_MAX_BYTES = 5 * 1024 * 1024
PACKET_SLACK = 64 * 1024     # topic, properties and headers on top of the largest payload we take
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


CommandInvalid = commands.CommandInvalid

# Home Assistant: the label it shows for "none of the classes" (its own "unknown" means "no
# value"), and how finely and how often the confidence sensor changes (HA records every change).
HA_NOTHING = "nothing"
HA_CONFIDENCE_STEP = 5          # percent
HA_CONFIDENCE_PERIOD = 10.0     # seconds between two values, unless the label changed


# --- frames over MQTT -----------------------------------------------------------------------------

class MqttCamera(Camera):
    """Frames published to `<prefix>/camera/frame` (JPEG or PNG), as a camera source.

    paho's thread only queues the raw payload (`offer`); decoding happens in `read()` on the
    box's loop thread, so a slow decode never stalls the network. The queue is small and drops the
    oldest frame when full: a sender faster than the box sees the newest pictures, never a backlog.
    """

    name = "mqtt"

    def __init__(self, depth: int = 4, wait: float = 0.2, max_bytes: int = FRAME_MAX_BYTES,
                 min_side: int = 224):
        self.wait = wait
        self.min_side = min_side      # decode reduced to near the model's input (edge.image)
        self.max_bytes = max_bytes
        self.dropped = 0
        self._frames: "queue.Queue[Any]" = queue.Queue(maxsize=depth)

    def offer(self, payload: bytes) -> None:
        """Queue one received payload (any thread). Oversized ones are replaced by their size,
        so they cost no memory here and still become an error for the sender to see."""
        item: Any = len(payload) if len(payload) > self.max_bytes else bytes(payload)
        while True:
            try:
                self._frames.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._frames.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def read(self) -> Optional[np.ndarray]:
        """The next frame as RGB uint8, None if none arrived within `wait` seconds.
        Raises ImageError for an oversized, non-JPEG/PNG or undecodable payload."""
        try:
            item = self._frames.get(timeout=self.wait)
        except queue.Empty:
            return None
        if isinstance(item, int):
            raise ImageError(f"frame of {item} bytes is larger than the limit of {self.max_bytes} bytes")
        if not (item.startswith(JPEG_MAGIC) or item.startswith(PNG_MAGIC)):
            raise ImageError(f"frame of {len(item)} bytes is not a JPEG or PNG image")
        return np.asarray(load_image(io.BytesIO(item), min_side=self.min_side))

    def pending(self) -> int:
        return self._frames.qsize()


# --- command parsing ------------------------------------------------------------------------------

# --- the link -------------------------------------------------------------------------------------

def default_client_factory(client_id: str) -> paho.Client:
    """A paho client with callback API v2 and MQTT 5: only MQTT 5 tells a subscriber whether a
    message was published retained (retain-as-published), and lets the box cap the size of what
    the broker sends it (maximum packet size). Scratch, Node-RED and HA may speak 3.1.1 to the
    same broker."""
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=MQTTProtocolVersion.MQTTv5)


class MqttLink(Outputs):
    """Publishes decisions, state and events; turns `<prefix>/cmd/<action>` messages into Commands.

    Retained topics (status, label, state, discovery) are kept as "latest value" and sent again
    on every connect, at QoS 0: with QoS 1, paho re-sends an unacknowledged old value after the
    fresh one when it reconnects, and the broker would keep the stale value.

    Other messages (predictions, events, command results) go out at once when connected; while
    the broker is away the newest `max_queue` wait in a deque here, older ones are dropped and
    counted in `dropped`. Nothing is handed to paho while disconnected, so paho's own unbounded
    offline queue never grows (it is capped at `max_queue` too, for the moment between a lost
    connection and paho noticing it). A message paho refuses while connected (its capped queue is
    full during a burst of command answers) waits in the same deque and goes out, in order, as
    soon as paho's queue drains (`on_publish`) or before the next message.

    `client_factory(client_id)` makes the paho client (tests may wrap or replace it).
    """

    RECONNECT_DELAY = (1, 30)     # seconds: first retry, longest wait (paho doubles in between)
    CLOSE_TIMEOUT = 2.0           # seconds to get "offline" out on a clean stop

    def __init__(self, cfg, device_id: str, submit: Callable[[commands.Request], None],
                 frame_source: bool = False, client_factory: Optional[Callable[[str], Any]] = None,
                 frame_size: int = 224):
        self.cfg = cfg
        self.device_id = device_id
        self.prefix = cfg.prefix or f"edge/{device_id}"
        self.client_id = cfg.client_id or f"edge-{device_id}"
        self.camera: Optional[MqttCamera] = MqttCamera(min_side=frame_size) if frame_source else None
        self.connected = False
        self.dropped = 0
        self._submit = submit
        self._factory = client_factory or default_client_factory
        self._client: Any = None
        self._lock = threading.Lock()
        self._pending: Deque[Tuple[str, bytes, int, bool]] = deque()
        # Retained "latest values", sent again on every connect; the label is there from the start
        # (an MQTT-camera box may see no picture for a long time).
        self._retained: Dict[str, Tuple[bytes, int]] = {self.topic("label"): (b"unknown", 0)}
        if cfg.homeassistant:    # with it the confidence, or HA shows the last run's beside "unknown"
            self._retained[self.topic("confidence")] = (b"0", 0)
        self._state: Optional[dict] = None
        # The largest message the broker may send us (MQTT 5): bigger ones never reach memory.
        self.max_packet = (FRAME_MAX_BYTES if frame_source else COMMAND_MAX_BYTES) + PACKET_SLACK
        self._interval = 1.0 / cfg.rate
        self._last_prediction = -math.inf
        self._ha_confidence: Optional[int] = 0 if cfg.homeassistant else None   # the last value sent for HA
        self._ha_confidence_at = -math.inf
        self._dropping = False
        self._closed = False
        self._off = False             # MQTT turned off, or the client could not be set up
        self._warned: Optional[str] = None

    def topic(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Configure the client and start connecting in the background; never raises for a
        missing broker (or for TLS files it cannot load: that is logged and MQTT stays off)."""
        if self._client is not None or self._closed:
            return
        if not self.cfg.enabled:
            log.info("MQTT is off (mqtt.enabled is false)")
            self._off = True
            return
        try:
            client = self._factory(self.client_id)
            client.will_set(self.topic("status"), "offline", qos=1, retain=True)
            if self.cfg.username is not None:
                client.username_pw_set(self.cfg.username, self.cfg.password)
            tls = self.cfg.tls
            if tls.enabled:
                client.tls_set(ca_certs=_str(tls.ca), certfile=_str(tls.cert), keyfile=_str(tls.key))
                if tls.insecure:
                    client.tls_insecure_set(True)
            client.reconnect_delay_set(*self.RECONNECT_DELAY)
            # No cap inside paho: nothing is handed to it while disconnected (see the class
            # docstring), and while connected no answer may be dropped.
            client.max_queued_messages_set(0)
            client.on_connect = self._on_connect
            client.on_connect_fail = self._on_connect_fail
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_subscribe = self._on_subscribe
            client.on_publish = self._on_publish
            if getattr(client, "protocol", None) == MQTTProtocolVersion.MQTTv5:
                props = Properties(PacketTypes.CONNECT)
                props.MaximumPacketSize = self.max_packet
                client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                     clean_start=True, properties=props)
            else:
                client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except Exception as exc:  # bad TLS files, say: the box works on without MQTT
            log.error("MQTT is off: cannot set up the connection to %s:%s: %s",
                      self.cfg.host, self.cfg.port, exc)
            self._off = True
            return
        self._client = client
        client.loop_start()
        log.info("MQTT: connecting to %s:%s as %s, topics under %s/", self.cfg.host, self.cfg.port,
                 self.client_id, self.prefix)

    def close(self) -> None:
        """Say "offline" (if connected), disconnect, stop paho's thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, connected = self._client, self.connected
        if client is None:
            return
        try:
            if connected:
                info = client.publish(self.topic("status"), "offline", qos=1, retain=True)
                info.wait_for_publish(timeout=self.CLOSE_TIMEOUT)
            client.disconnect()
        except Exception as exc:  # the broker went away at the same moment: the will says offline
            log.debug("MQTT: clean stop incomplete: %s", exc)
        client.loop_stop()
        self.connected = False

    # --- Outputs (called on the box's loop thread) -------------------------------------------

    def decision(self, d: Decision) -> None:
        try:
            if d.changed:      # "unknown" is retained from the start; the box says when it changes
                self._publish(self.topic("label"), d.label, qos=0, retain=True)
            now = time.monotonic()
            if self.cfg.homeassistant:
                self._confidence_for_ha(d, now)
            if d.again:        # each picture gives exactly one prediction (docs/mqtt.md)
                return
            # 10% slack so frames arriving just under the interval do not halve the rate.
            if self.camera is None and not d.changed and now - self._last_prediction < self._interval * 0.9:
                return
            self._last_prediction = now
            self._publish(self.topic("prediction"), commands.to_json({
                "label": d.label, "index": d.index, "confidence": d.confidence, "scores": d.scores,
                "ts": round(d.ts, 3), "frame": d.frame}), qos=0)
        except Exception:
            log.exception("MQTT: publishing a decision failed")

    def state(self, s: dict) -> None:
        try:
            self._state = dict(s)
            self._publish(self.topic("state"), self._state_payload(), qos=0, retain=True)
        except Exception:
            log.exception("MQTT: publishing the state failed")

    def event(self, e: dict) -> None:
        try:
            self._publish(self.topic("event"), commands.to_json(e), qos=1)
        except Exception:
            log.exception("MQTT: publishing an event failed")

    # --- publishing --------------------------------------------------------------------------

    def _state_dict(self, state: Optional[dict]) -> dict:
        """The box's state as MQTT shows it: with the device id and the link's own counts."""
        extra = {"dropped": self.dropped, "prefix": self.prefix}
        if self.camera is not None:
            extra["frames_dropped"] = self.camera.dropped
        return dict(state or {}, device_id=self.device_id, mqtt=extra)

    def _state_payload(self) -> bytes:
        return commands.to_json(self._state_dict(self._state))

    def _publish(self, topic: str, payload: Any, qos: int, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else str(payload).encode("utf-8")
        with self._lock:
            if self._closed or self._off:
                return
            if retain:
                self._retained[topic] = (data, qos)
            # Messages that paho refused while connected (its queue was full: a burst of command
            # answers) wait in _pending and go out first, in order, as paho's queue drains.
            if self.connected and self._flush() and self._send(topic, data, qos, retain):
                return
            if retain and not self.connected:    # retained topics go out again on connect anyway
                return
            self._enqueue(topic, data, qos, retain)

    def _send(self, topic: str, data: bytes, qos: int, retain: bool) -> bool:
        """Hand one message to paho (lock held). False when paho refuses it (not connected)."""
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _flush(self) -> bool:
        """Hand waiting messages to paho, oldest first (lock held, connected); False when paho
        still refuses some (they keep waiting)."""
        while self._pending:
            topic, data, qos, retain = self._pending[0]
            if not self._send(topic, data, qos, retain):
                return False
            self._pending.popleft()
        return True

    def _enqueue(self, topic: str, data: bytes, qos: int, retain: bool = False) -> None:
        self._pending.append((topic, data, qos, retain))
        while len(self._pending) > self.cfg.max_queue:
            self._pending.popleft()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("MQTT: broker away and %d messages waiting; dropping the oldest",
                            self.cfg.max_queue)

    # --- paho callbacks (paho's thread; an exception here would end paho's loop) -------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                hint = ("the broker does not speak MQTT 5: use mosquitto 1.6 or newer"
                        if "protocol" in str(reason_code).lower() else "check mqtt.username and the password")
                self._warn_once(f"MQTT: broker {self.cfg.host}:{self.cfg.port} refused the connection: "
                                f"{reason_code} ({hint})")
                return
            v5 = getattr(client, "protocol", None) == MQTTProtocolVersion.MQTTv5
            subscriptions = [(self.topic("cmd/#"), 1)]
            if self.camera is not None:
                subscriptions.append((self.topic("camera/frame"), 0))
            if self.cfg.homeassistant:
                subscriptions.append((f"{self.cfg.discovery_prefix}/status", 1))
            if v5:  # keep the publisher's retain flag, so retained commands are seen as such
                subscriptions = [(t, SubscribeOptions(qos=q, retainAsPublished=True)) for t, q in subscriptions]
            client.subscribe(subscriptions)
            with self._lock:
                if self._closed:
                    return
                self.connected = True
                self._send(self.topic("status"), b"online", 0, True)
                if self.cfg.homeassistant:
                    self._send_discovery()
                if self._state is not None:
                    self._retained[self.topic("state")] = (self._state_payload(), 0)
                for topic, (data, qos) in self._retained.items():
                    self._send(topic, data, qos, True)
                # Retained values waiting here are superseded by the ones just sent.
                self._pending = deque(p for p in self._pending if not p[3])
                flushed, dropped = len(self._pending), self.dropped
                self._flush()
                self._dropping = False
            self._warned = None
            log.info("MQTT: connected to %s:%s (%d queued messages sent, %d dropped so far)",
                     self.cfg.host, self.cfg.port, flushed, dropped)
        except Exception:
            log.exception("MQTT: handling the connection failed")

    def _on_connect_fail(self, client, userdata) -> None:
        self._warn_once(f"MQTT: cannot reach broker {self.cfg.host}:{self.cfg.port}; retrying")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            was, self.connected = self.connected, False
        if was and not self._closed:
            log.warning("MQTT: lost the broker (%s); reconnecting", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """paho's queue has room again: send what waits. Never blocks on our lock (the loop thread
        may hold it while it waits for paho's): whoever holds it flushes before it publishes."""
        if not self._pending or not self._lock.acquire(blocking=False):
            return
        try:
            if self.connected and not self._closed:
                self._flush()
        except Exception:
            log.exception("MQTT: sending queued messages failed")
        finally:
            self._lock.release()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("MQTT: the broker refused a subscription (%s): commands or frames "
                          "will not arrive; check the broker's ACL", rc)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            topic = msg.topic
            cmd_root = self.topic("cmd/")
            if topic.startswith(cmd_root):
                action = topic[len(cmd_root):]
                if action == "result":   # our own answers come back through cmd/#
                    return
                if msg.retain:           # stored by the broker: would run again at every connect
                    if msg.payload:      # (an empty one is the clearing of such a message: ignored)
                        self._refuse(action, msg.payload, "retained commands are ignored; publish "
                                     "commands without the retain flag (and clear this one)")
                    return
                self._command(action, msg.payload)
            elif self.camera is not None and topic == self.topic("camera/frame"):
                if msg.retain:
                    log.info("MQTT: ignoring a retained frame on %s (it would be seen again at "
                             "every connect)", topic)
                    return
                self.camera.offer(msg.payload)
            elif topic == f"{self.cfg.discovery_prefix}/status" and msg.payload.strip() == b"online":
                with self._lock:
                    if self.connected:
                        self._send_discovery()
        except Exception:
            log.exception("MQTT: handling a message failed")

    def _warn_once(self, message: str) -> None:
        """Log a connection problem once, repeats only at debug level (a broker away all night
        must not fill the journal)."""
        if message != self._warned:
            self._warned = message
            log.warning("%s", message)
        else:
            log.debug("%s", message)

    # --- commands ----------------------------------------------------------------------------

    def _command(self, action: str, payload: bytes) -> None:
        try:
            command, ident = commands.parse_payload(action, payload)
        except CommandInvalid as exc:
            self._refuse(action, payload, str(exc))
            return
        log.info("MQTT: command %s", command)
        self._submit(commands.Request(command, "mqtt", ident, self._reply))

    def _refuse(self, action: str, payload: bytes, error: str) -> None:
        log.info("MQTT: refused command %s: %s", rules.show(action, 64), error)   # escaped: no RTL or newline in the log
        result = {"action": action[:64], "ok": False, "error": error}
        ident = commands.loose_id(payload)
        if ident is not None:
            result["id"] = ident
        self._reply(result)

    def _reply(self, result: dict) -> None:
        if isinstance(result.get("state"), dict):     # the `state` command: as the `state` topic says it
            result = dict(result, state=self._state_dict(result["state"]))
        self._publish(self.topic("cmd/result"), commands.to_json(result), qos=1)

    # --- Home Assistant ----------------------------------------------------------------------

    def discovery(self) -> Dict[str, dict]:
        """Home Assistant discovery configs: topic -> payload (two sensors of one device)."""
        node = f"{self.cfg.discovery_prefix}/sensor/{self.device_id}"
        uid = f"edge_{self.device_id}".replace("-", "_")
        common = {
            "availability_topic": self.topic("status"),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {"identifiers": [uid], "name": f"edge {self.device_id}",
                       "model": "edge teachable camera", "manufacturer": "edge",
                       "sw_version": __version__},
        }
        return {
            # HA treats the state "unknown" as "no value", so "none of the classes" shows as
            # HA_NOTHING there; the box's own topic keeps "unknown".
            f"{node}/label/config": dict(common, name="Label", unique_id=f"{uid}_label",
                                         state_topic=self.topic("label"), icon="mdi:eye",
                                         value_template=f"{{{{ '{HA_NOTHING}' if value == 'unknown' else value }}}}"),
            f"{node}/confidence/config": dict(common, name="Confidence", unique_id=f"{uid}_confidence",
                                              state_topic=self.topic("confidence"),
                                              unit_of_measurement="%", state_class="measurement",
                                              suggested_display_precision=0, icon="mdi:gauge"),
        }

    def _confidence_for_ha(self, d: Decision, now: float) -> None:
        """`<prefix>/confidence` for Home Assistant, which stores every state it is sent: whole
        percent in steps of HA_CONFIDENCE_STEP, only when that changes, and at most once per
        HA_CONFIDENCE_PERIOD seconds unless the label changed or the frame was answered again after a
        change of classes (retained, so HA has it at once)."""
        value = int(round(max(0.0, min(1.0, d.confidence)) * 100 / HA_CONFIDENCE_STEP)) * HA_CONFIDENCE_STEP
        if value == self._ha_confidence:
            return
        if not (d.changed or d.again) and now - self._ha_confidence_at < HA_CONFIDENCE_PERIOD:
            return
        self._ha_confidence, self._ha_confidence_at = value, now
        self._publish(self.topic("confidence"), str(value), qos=0, retain=True)

    def _send_discovery(self) -> None:
        """(lock held, connected)"""
        for topic, config in self.discovery().items():
            self._send(topic, commands.to_json(config), 0, True)


def _str(path) -> Optional[str]:
    return None if path is None else str(path)
