"""Configuration: the shipped config.yaml, every kind of error (one line, naming the key path),
paths, secrets, and a randomized check that no input gives anything but a ConfigError."""

import copy
import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge import config
from edge.config import (DEFAULT_CONFIG_PATH, CameraConfig, CaptureConfig, ClassConfig, Config, ConfigError,
                         HeadConfig, ModelConfig, MqttConfig, StoreConfig, load_config, normalize_pin,
                         parse_config)

REPO = Path(__file__).resolve().parent.parent
TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(32)
SECRET = "correct-horse-battery"


@pytest.fixture
def tmp_path(tmp_path) -> Path:
    """Resolved, so paths compare equal to the resolved ones load_config returns."""
    return tmp_path.resolve()


@pytest.fixture(autouse=True)
def fake_models(tmp_path_factory, monkeypatch):
    """The bundled model files may not be built yet: point the variants at stand-ins (config only
    checks that the file exists)."""
    folder = tmp_path_factory.mktemp("models")
    for name in config.VARIANTS.values():
        (folder / name).write_bytes(TFLITE)
    monkeypatch.setattr(config, "MODELS_DIR", folder)
    return folder


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.tflite"
    path.write_bytes(TFLITE)
    return path


def write(folder: Path, content, name: str = "config.yaml") -> Path:
    """A config file from a dict (dumped as YAML), text or bytes."""
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def load(folder: Path, content) -> Config:
    return load_config(write(folder, content))


def error(folder: Path, content) -> str:
    """The ConfigError message for a file with this content; checks it is a single line."""
    with pytest.raises(ConfigError) as info:
        load(folder, content)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("config.yaml: "), message
    return message


# --- the shipped file and the defaults ------------------------------------------------------------

def test_shipped_config_loads_and_equals_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    shipped = load_config(DEFAULT_CONFIG_PATH)
    assert DEFAULT_CONFIG_PATH == REPO / "config.yaml"
    assert shipped.source == "config.yaml"
    assert dataclasses.replace(shipped, source="defaults") == load_config(None)


def test_shipped_config_values():
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.classes == (ClassConfig("A", "GPIO17", "GPIO27"), ClassConfig("B", "GPIO22", "GPIO23"),
                           ClassConfig("C", "GPIO5", "GPIO6"))
    assert (cfg.function_button, cfg.status_led, cfg.led_pwm) == ("GPIO26", "GPIO16", False)
    assert cfg.camera == CameraConfig()
    assert cfg.model == ModelConfig()
    assert cfg.model.model_path == config.MODELS_DIR / config.VARIANTS["224"]
    assert cfg.head == HeadConfig() and cfg.head.threshold == "auto" and cfg.head.kind == "centroid"
    assert cfg.capture == CaptureConfig()
    assert cfg.store == StoreConfig(path=REPO / "var" / "store")
    assert cfg.mqtt == MqttConfig(prefix=f"edge/{cfg.device_id}")
    assert not cfg.mqtt.enabled and not cfg.mqtt.tls.enabled
    assert cfg.web == config.WebConfig() and cfg.web.enabled and cfg.web.port == 8080 and cfg.web.pin is None
    assert re.fullmatch(r"[a-z0-9-]{1,63}", cfg.device_id)


def test_shipped_config_shows_every_key_and_docs_name_every_key():
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    docs = (REPO / "docs" / "config.md").read_text()
    sections = {"camera": config.CAMERA, "model": config.MODEL, "head": config.HEAD,
                "capture": config.CAPTURE, "store": config.STORE, "mqtt": config.MQTT,
                "web": config.WEB}
    assert list(raw) == list(config.TOP)
    assert list(raw["classes"][0]) == list(config.CLASS)
    assert list(raw["mqtt"]["tls"]) == list(config.TLS)
    keys = list(config.TOP) + [f"classes[].{k}" for k in config.CLASS] + [f"mqtt.tls.{k}" for k in config.TLS]
    for section, spec in sections.items():
        assert list(raw[section]) == list(spec), section
        keys += [f"{section}.{key}" for key in spec]
    for key in keys:
        assert f"`{key}`" in docs, f"docs/config.md does not describe `{key}`"


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.source == "defaults"
    assert cfg.store.path == tmp_path / "var" / "store"
    assert len(cfg.classes) == 3


def test_device_id_defaults_to_the_sanitised_host_name(tmp_path, monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "Class_Room PI.local")
    cfg = load(tmp_path, {})
    assert cfg.device_id == "class-room-pi"
    assert cfg.mqtt.prefix == "edge/class-room-pi"
    monkeypatch.setattr(config.socket, "gethostname", lambda: "___")
    assert load(tmp_path, {}).device_id == "edge"


def test_a_custom_file(tmp_path, model_file):
    cfg = load(tmp_path, {
        "device_id": "box-7",
        "classes": [{"name": "Apple", "button": 17, "led": "bcm27"}, {"name": "Pear 2"},
                    {"name": "no_button", "button": None, "led": "J8:29"}],
        "function_button": None, "status_led": "BOARD36", "led_pwm": True,
        "camera": {"source": "webcam", "device": 1, "fps": 15, "mirror": True},
        "model": {"path": str(model_file), "threads": 2, "kernels": "reference"},
        "head": {"kind": "knn", "k": 5, "threshold": 0, "smoothing": 1, "hysteresis": 0},
        "capture": {"rate": 30, "max_per_class": 1, "min_change": 1},
        "mqtt": {"enabled": True, "host": "broker.lan", "port": 8883, "homeassistant": True},
    })
    assert cfg.classes == (ClassConfig("Apple", "GPIO17", "BCM27"), ClassConfig("Pear 2", None, None),
                           ClassConfig("no_button", None, "J8:29"))
    assert cfg.function_button is None and cfg.status_led == "BOARD36" and cfg.led_pwm is True
    assert cfg.camera == CameraConfig(source="webcam", device=1, fps=15.0, mirror=True)
    assert isinstance(cfg.camera.fps, float)
    assert cfg.model.model_path == model_file.resolve()
    assert cfg.head == HeadConfig("knn", 5, 0.0, 1, 0.0) and isinstance(cfg.head.threshold, float)
    assert cfg.capture == CaptureConfig(30.0, 1, 1.0)
    assert cfg.mqtt.prefix == "edge/box-7" and cfg.mqtt.port == 8883


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.camera.fps = 1  # type: ignore[misc]


@pytest.mark.parametrize("variant", [224, "224", 160, "128"])
def test_model_variant(tmp_path, variant):
    cfg = load(tmp_path, {"model": {"variant": variant}})
    assert cfg.model.variant == str(variant)
    assert cfg.model.model_path == config.MODELS_DIR / config.VARIANTS[str(variant)]


# --- pins -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, bcm", [
    ("GPIO17", 17), ("BCM17", 17), ("17", 17), (17, 17), ("BOARD11", 17), ("J8:11", 17),
    ("gpio4", 4), (" GPIO4 ", 4), ("BCM0", 0), (27, 27), ("BOARD3", 2), ("BOARD40", 21),
    ("J8:27", 0), ("BOARD37", 26), ("BOARD36", 16), ("J8:13", 27),
])
def test_normalize_pin(name, bcm):
    assert normalize_pin(name) == bcm


def test_board_table_matches_the_header():
    table = {3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10,
             21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19,
             36: 16, 37: 26, 38: 20, 40: 21}
    for physical in range(1, 41):
        if physical in table:
            assert normalize_pin(f"BOARD{physical}") == table[physical] == normalize_pin(f"J8:{physical}")
        else:
            with pytest.raises(ValueError, match="power|ground"):
                normalize_pin(f"BOARD{physical}")
    assert sorted(table.values()) == list(range(28))


@pytest.mark.parametrize("name, message", [
    ("GPIO28", "out of range"), (28, "out of range"), (-1, "out of range"), ("BOARD41", "out of range"),
    ("BOARD6", "ground"), ("BOARD1", "3.3V"), ("J8:2", "5V"), ("GPIO", "not a pin name"),
    ("pin17", "not a pin name"), ("GPIO017", "not a pin name"), ("", "not a pin name"),
    ("WPI0", "not a pin name"), (True, "expected a pin name"), (17.0, "expected a pin name"),
    (None, "expected a pin name"), ([17], "expected a pin name"),
])
def test_normalize_pin_rejects(name, message):
    with pytest.raises(ValueError, match=message) as info:
        normalize_pin(name)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("data, message", [
    ({"classes": [{"name": "A", "button": "GPIO17"}, {"name": "B", "button": "GPIO17"}]},
     "config.yaml: classes[1].button: pin 'GPIO17' is already used by classes[0].button"),
    ({"classes": [{"name": "A", "button": "GPIO17"}, {"name": "B", "led": "BOARD11"}]},
     "config.yaml: classes[1].led: pin 'BOARD11' (GPIO17) is already used by classes[0].button"),
    ({"classes": [{"name": "A", "button": 5, "led": "bcm5"}]},
     "config.yaml: classes[0].led: pin 'BCM5' (GPIO5) is already used by classes[0].button"),
    ({"classes": [{"name": "A", "led": "J8:37"}]},
     "config.yaml: function_button: pin 'GPIO26' is already used by classes[0].led"),
    ({"function_button": "GPIO16"},
     "config.yaml: status_led: pin 'GPIO16' is already used by function_button"),
    ({"status_led": 17},
     "config.yaml: status_led: pin 'GPIO17' is already used by classes[0].button"),
])
def test_a_pin_used_twice(tmp_path, data, message):
    assert error(tmp_path, data) == message


def test_pins_are_kept_as_written_in_gpiozero_spelling(tmp_path):
    cfg = load(tmp_path, {"classes": [{"name": "A", "button": "gpio4", "led": 18}],
                          "function_button": "board13", "status_led": "j8:18"})
    assert cfg.classes[0] == ClassConfig("A", "GPIO4", "GPIO18")
    assert (cfg.function_button, cfg.status_led) == ("BOARD13", "J8:18")


# --- every kind of error: one line, naming the key path -------------------------------------------

@pytest.mark.parametrize("data, message", [
    # wrong types (bool is not a number)
    ({"camera": {"fps": "fast"}}, "config.yaml: camera.fps: expected a number between 1 and 120, got 'fast'"),
    ({"camera": {"width": True}}, "camera.width: expected an integer between 16 and 4096, got true"),
    ({"camera": {"width": 640.0}}, "camera.width: expected an integer between 16 and 4096, got 640.0"),
    ({"camera": {"mirror": 1}}, "camera.mirror: expected true or false, got 1"),
    ({"camera": {"mirror": "yes"}}, "camera.mirror: expected true or false, got 'yes'"),
    ({"camera": {"source": "usb"}}, "camera.source: expected one of auto, picamera2, webcam, folder, mqtt, got 'usb'"),
    ({"camera": 5}, "config.yaml: camera: expected a mapping of settings, got 5"),
    ({"camera": ["fps"]}, "camera: expected a mapping of settings, got a list"),
    ({"mqtt": {"port": True}}, "mqtt.port: expected an integer between 1 and 65535, got true"),
    ({"mqtt": {"host": 5}}, "mqtt.host: expected text, got 5 (put it in quotes"),
    ({"mqtt": {"enabled": "false"}}, "mqtt.enabled: expected true or false, got 'false'"),
    ({"head": {"k": 2.5}}, "head.k: expected an integer between 1 and 100, got 2.5"),
    ({"head": {"threshold": "high"}}, "head.threshold: expected 'auto' or a number between -1 and 1, got 'high'"),
    ({"head": {"threshold": True}}, "head.threshold: expected 'auto' or a number between -1 and 1, got true"),
    ({"model": {"variant": 100}}, "model.variant: expected one of 224, 160, 128, got 100"),
    ({"model": {"variant": True}}, "model.variant: expected one of 224, 160, 128, got true"),
    ({"model": {"kernels": "fast"}}, "model.kernels: expected one of auto, builtin, reference, got 'fast'"),
    ({"model": {"threads": 0}}, "model.threads: expected an integer between 1 and 64, got 0"),
    ({"led_pwm": None}, "config.yaml: led_pwm: expected true or false, got null"),
    ({"store": {"path": None}}, "store.path: expected text, got null"),
    ({"device_id": "My Pi"}, "device_id: expected lowercase letters, digits and '-' (1 to 63 of them), got 'My Pi'"),
    # out of range
    ({"camera": {"fps": 0}}, "camera.fps: expected a number between 1 and 120, got 0"),
    ({"camera": {"fps": float("inf")}}, "camera.fps: expected a number between 1 and 120, got inf"),
    ({"camera": {"fps": float("nan")}}, "camera.fps: expected a number between 1 and 120, got nan"),
    ({"camera": {"device": -1}}, "camera.device: expected an integer between 0 and 63, got -1"),
    ({"head": {"k": 0}}, "head.k: expected an integer between 1 and 100, got 0"),
    ({"head": {"smoothing": 0}}, "head.smoothing: expected an integer between 1 and 300, got 0"),
    ({"head": {"hysteresis": -0.1}}, "head.hysteresis: expected a number >= 0, got -0.1"),
    ({"head": {"hysteresis": 10 ** 400}}, "head.hysteresis: expected a number >= 0, got <a very large number>"),
    ({"head": {"threshold": 1.5}}, "head.threshold: expected 'auto' or a number between -1 and 1, got 1.5"),
    ({"capture": {"rate": 31}}, "capture.rate: expected a number between 0.1 and 30, got 31"),
    ({"capture": {"rate": 0}}, "capture.rate: expected a number between 0.1 and 30, got 0"),
    ({"capture": {"max_per_class": 0}}, "capture.max_per_class: expected an integer between 1 and 1000, got 0"),
    ({"capture": {"min_change": 1.01}}, "capture.min_change: expected a number between 0 and 1, got 1.01"),
    ({"mqtt": {"port": 0}}, "mqtt.port: expected an integer between 1 and 65535, got 0"),
    ({"mqtt": {"port": 65536}}, "mqtt.port: expected an integer between 1 and 65535, got 65536"),
    ({"mqtt": {"keepalive": 4}}, "mqtt.keepalive: expected an integer between 5 and 3600, got 4"),
    ({"mqtt": {"rate": 0}}, "mqtt.rate: expected a number between 0.01 and 1000, got 0"),
    ({"mqtt": {"max_queue": 0}}, "mqtt.max_queue: expected an integer between 1 and 100000, got 0"),
    ({"mqtt": {"prefix": "edge/+/x"}}, "mqtt.prefix: expected an MQTT topic without +, # or a leading or trailing /"),
    ({"mqtt": {"prefix": "/edge"}}, "mqtt.prefix: expected an MQTT topic"),
    ({"mqtt": {"prefix": "edge/"}}, "mqtt.prefix: expected an MQTT topic"),
    ({"mqtt": {"discovery_prefix": "ha/#"}}, "mqtt.discovery_prefix: expected an MQTT topic"),
    ({"mqtt": {"host": ""}}, "mqtt.host: must not be empty"),
    # unknown keys, at every level
    ({"head": {"kindd": "knn"}},
     "config.yaml: head: unknown key 'kindd' (known: kind, k, threshold, smoothing, hysteresis)"),
    ({"cammera": {}}, "config.yaml: unknown key 'cammera' (known: device_id, classes,"),
    ({"classes": [{"name": "A", "colour": "red"}]}, "classes[0]: unknown key 'colour' (known: name, button, led, nothing)"),
    ({"mqtt": {"tls": {"ca_file": "x"}}}, "mqtt.tls: unknown key 'ca_file' (known: ca, cert, key, insecure)"),
    ({1: 2}, "config.yaml: unknown key 1 (known:"),
    ({"web": {"pin": 2468}}, 'config.yaml: web.pin: put the PIN in quotes, e.g. pin: "1234"'),
    ({"web": {"pin": "24 68"}}, "config.yaml: web.pin: expected 4 to 32 digits or letters, in quotes"),
    ({"web": {"port": 70000}}, "config.yaml: web.port: expected an integer between 1 and 65535, got 70000"),
    ({"web": {"enabled": "yes please"}}, "config.yaml: web.enabled: expected true or false, got 'yes please'"),
    # classes
    ({"classes": []}, "classes: expected 1 to 8 classes, got 0"),
    ({"classes": [{"name": f"c{i}"} for i in range(9)]}, "classes: expected 1 to 8 classes, got 9"),
    ({"classes": {"A": {}}}, "classes: expected a list of 1 to 8 classes, got a mapping"),
    ({"classes": ["A"]}, "classes[0]: expected a mapping with name, button and led, got 'A'"),
    ({"classes": [{"button": "GPIO4"}]}, "classes[0]: missing key 'name'"),
    ({"classes": [{"name": 1}]}, "classes[0].name: expected text, got 1 (put it in quotes"),
    ({"classes": [{"name": True}]}, "classes[0].name: expected text, got true (put it in quotes"),
    ({"classes": [{"name": ""}]}, "classes[0].name: must not be empty"),
    ({"classes": [{"name": "x" * 33}]}, "classes[0].name: class names are at most 32 characters"),
    ({"classes": [{"name": "A/B"}]}, "classes[0].name: class names may use letters, digits, space, _ and -"),
    ({"classes": [{"name": " A"}]}, "classes[0].name: class names must not start or end with a space"),
    ({"classes": [{"name": "Unknown"}]}, "classes[0].name: 'unknown' is reserved"),
    ({"classes": [{"name": "Cat"}, {"name": "cat"}]},
     "classes[1].name: class name 'cat' is already used by classes[0].name"),
    ({"classes": [{"name": "A", "button": "GPIO99"}]},
     "classes[0].button: 'GPIO99' is out of range (BCM GPIO numbers are 0..27)"),
    ({"classes": [{"name": "A", "led": "BOARD9"}]}, "classes[0].led: 'BOARD9' is a ground pin, not a GPIO"),
    ({"function_button": "pin 3"}, "function_button: 'pin 3' is not a pin name"),
    # files
    ({"model": {"path": "missing.tflite"}}, "model.path: file not found: "),
    ({"camera": {"folder": "no-such-folder"}}, "camera.folder: folder not found: "),
    ({"mqtt": {"tls": {"ca": "ca.pem"}}}, "mqtt.tls.ca: file not found: "),
    ({"mqtt": {"password_file": "nope.txt", "username": "u"}}, "mqtt.password_file: file not found: "),
    # mqtt combinations
    ({"mqtt": {"tls": {"insecure": True}}}, "mqtt.tls.insecure: TLS is off"),
    ({"mqtt": {"password": "x", "password_env": "HOME", "username": "u"}},
     "mqtt.password_env: give only one of password, password_env and password_file"),
    ({"mqtt": {"password": "x"}}, "mqtt.password: a password needs mqtt.username too"),
    ({"mqtt": {"password_env": "EDGE_TEST_UNSET_VARIABLE", "username": "u"}},
     "mqtt.password_env: environment variable 'EDGE_TEST_UNSET_VARIABLE' is not set"),
])
def test_errors_name_the_key_and_the_value(tmp_path, monkeypatch, data, message):
    monkeypatch.delenv("EDGE_TEST_UNSET_VARIABLE", raising=False)
    got = error(tmp_path, data)
    assert message in got
    assert isinstance(ConfigError("x"), ValueError)


def test_missing_model_file_of_a_variant(tmp_path, fake_models):
    (fake_models / config.VARIANTS["160"]).unlink()
    message = error(tmp_path, {"model": {"variant": 160}})
    assert message.startswith("config.yaml: model.variant: model file not found: ")
    assert "mobilenet_v2_1.0_160_int8.tflite" in message


def test_files_and_folders_are_told_apart(tmp_path, model_file):
    (tmp_path / "pics").mkdir()
    assert "model.path: expected a file, but" in error(tmp_path, {"model": {"path": "pics"}})
    assert "camera.folder: expected a folder, but" in error(tmp_path, {"camera": {"folder": "model.tflite"}})


@pytest.mark.parametrize("text, message", [
    ("camera:\n  fps: 10\n mirror: true\n", "config.yaml: YAML error: line 3, column 2: "),
    ("classes:\n  - name: A\n    button: [GPIO17\n", "config.yaml: YAML error: line 4"),
    ("head: {kind: knn\n", "config.yaml: YAML error: line 2"),
    ("camera:\n  fps: 10\n  fps: 20\n", "config.yaml: YAML error: line 3, column 3: duplicate key 'fps'"),
    ("camera: {}\nhead: {}\ncamera: {}\n", "config.yaml: YAML error: line 3, column 1: duplicate key 'camera'"),
    ("\tcamera: {}\n", "config.yaml: YAML error: line 1"),
    ("device_id: !!python/object/apply:os.system [ls]\n", "line 1, column 12: could not determine a constructor"),
    ("device_id: 2024-13-45\n", "config.yaml: YAML error: line 1, column 12: cannot read '2024-13-45'"),
    ("device_id: !!int abc\n", "line 1, column 12: cannot read 'abc'"),
    ("x: !!timestamp nope\n", "line 1, column 4: cannot read 'nope'"),
    ("x: " + "9" * 5000 + "\n", "line 1, column 4: cannot read"),
    ("a: \x07\n", "config.yaml: YAML error: line 1: unacceptable character #x0007"),
    ("", "config.yaml: the file is empty"),
    ("\n\n   \n", "config.yaml: the file is empty"),
    ("# only comments\n# here\n", "config.yaml: the file is empty"),
    ("- camera\n- head\n", "config.yaml: expected a mapping of settings at the top level, got a list"),
    ("just text\n", "config.yaml: expected a mapping of settings at the top level, got 'just text'"),
    ("42\n", "config.yaml: expected a mapping of settings at the top level, got 42"),
    ("[" * 600 + "]" * 600, "config.yaml: YAML error: nesting is too deep"),
    ("camera: &a {fps: *a}\n", "camera.fps: expected a number between 1 and 120, got"),
])
def test_yaml_errors_are_one_line_with_the_line_number(tmp_path, text, message):
    assert message in error(tmp_path, text)


@pytest.mark.parametrize("text, message", [
    # YAML 1.1 read these as 8 (octal: an SPI pin), 17, 17 and 17
    ("classes:\n  - {name: A, button: 010}\n", "classes[0].button: '010' is not a pin name"),
    ("classes:\n  - {name: A, button: 0x11}\n", "classes[0].button: '0x11' is not a pin name"),
    ("classes:\n  - {name: A, button: 1_7}\n", "classes[0].button: '1_7' is not a pin name"),
    ("capture:\n  max_per_class: 0200\n", "capture.max_per_class: expected an integer between 1 and 1000, got '0200'"),
    # check-config said ok, then the store could not hold the number (a traceback at start)
    ("capture:\n  max_per_class: 100000000000000000000\n", "capture.max_per_class: expected an integer between 1"),
    ("mqtt:\n  host: localhost:1883\n", "mqtt.host: expected a host name or IP address, without a port (put the port in mqtt.port)"),
    ("mqtt:\n  host: mqtt://broker\n", "without a scheme such as mqtt://"),
    ("web:\n  host: '[::1]:8080'\n", "(put the port in web.port)"),
    ("camera:\n  fps: 0.05\n", "camera.fps: expected a number between 1 and 120, got 0.05"),
    # as written, not as Python shows it (was: got datetime.date(2001, 12, 14))
    ("device_id: 2001-12-14\n", "device_id: expected text, got '2001-12-14' (a date) (put it in quotes"),
])
def test_numbers_and_hosts_as_people_write_them_are_read_or_refused_clearly(tmp_path, text, message):
    assert message in error(tmp_path, text)


@pytest.mark.parametrize("where", ["store", "store/inside"])
def test_a_file_where_the_store_folder_goes_is_refused(tmp_path, where):
    """check-config said ok; the box then started into a storage fault, without page or MQTT."""
    (tmp_path / "store").write_text("not a folder")
    assert error(tmp_path, f"store:\n  path: {where}\n") == \
        f"config.yaml: store.path: expected a folder, but {tmp_path / 'store'} is a file"
    assert load(tmp_path, "store:\n  path: new/deep/store\n").store.path == tmp_path / "new/deep/store"


def test_exponents_are_numbers_and_ipv6_hosts_are_hosts(tmp_path):
    """YAML 1.1 read 1e-2 as text ("expected a number between 0 and 1, got '1e-2'")."""
    cfg = load(tmp_path, "capture:\n  min_change: 1e-2\nhead:\n  hysteresis: 5E-2\nmqtt:\n  host: 'fe80::1'\n")
    assert cfg.capture.min_change == 0.01 and cfg.head.hysteresis == 0.05 and cfg.mqtt.host == "fe80::1"


def test_a_billion_laughs_is_refused_at_once(tmp_path):
    """Nine levels of aliases of nine: check-config ran on past 20 s and 2 GB, ranking every key
    path of every expansion after the first error."""
    levels = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    done = subprocess.run([sys.executable, "-m", "edge", "check-config", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)    # a hang guard, not a speed bound
    assert done.returncode == 2 and "unknown key" in done.stderr and len(done.stderr.splitlines()) <= 12, done.stderr


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)), "config.yaml: not a text file (invalid UTF-8 at byte 128)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "config.yaml: not a text file"),
    (b"camera:\n  fps: 10\x00\n", "unacceptable character #x0000"),
    (b"\xff\xfe\x00\x00", "config.yaml: not a text file"),
    (b"\xef\xbb\xbfcamera: {fps: fast}\n", "config.yaml: camera.fps: expected a number between 1 and 120, got 'fast'"),
])
def test_binary_garbage(tmp_path, content, message):
    assert message in error(tmp_path, content)


def test_unreadable_paths(tmp_path):
    for path, message in [(tmp_path / "missing.yaml", "missing.yaml: file not found: "),
                          (tmp_path, "cannot read"),
                          (tmp_path / ("x" * 300 + ".yaml"), "x.yaml: ")]:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_huge_file_is_refused(tmp_path):
    assert "larger than" in error(tmp_path, "# " + "x" * (1 << 20) + "\n")


def test_parse_config_directly(tmp_path, model_file):
    cfg = parse_config({"model": {"path": "model.tflite"}, "store": {"path": "s"}}, base=tmp_path)
    assert cfg.model.model_path == tmp_path / "model.tflite"
    assert cfg.store.path == tmp_path / "s"
    assert cfg.source == "config"
    with pytest.raises(ConfigError, match=r"^settings\.yaml: head\.k: expected an integer between 1 and 100, got 0$"):
        parse_config({"head": {"k": 0}}, source="settings.yaml")
    for bad in (None, [], "x", 3):
        with pytest.raises(ConfigError, match="^config: "):
            parse_config(bad)  # type: ignore[arg-type]


# --- paths ----------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_files_folder(tmp_path, monkeypatch):
    box = tmp_path / "box"
    (box / "pics").mkdir(parents=True)
    (box / "models").mkdir()
    (box / "models" / "mine.tflite").write_bytes(TFLITE)
    for name in ("ca.pem", "client.pem", "client.key", "password"):
        (box / name).write_text("x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(box, {
        "camera": {"source": "folder", "folder": "pics"},
        "model": {"path": "models/mine.tflite"},
        "store": {"path": "data/store"},
        "mqtt": {"username": "u", "password_file": "password",
                 "tls": {"ca": "ca.pem", "cert": "client.pem", "key": "client.key"}},
    })
    box = box.resolve()
    assert cfg.camera.folder == box / "pics"
    assert cfg.model.path == cfg.model.model_path == box / "models" / "mine.tflite"
    assert cfg.store.path == box / "data" / "store"
    assert (cfg.mqtt.tls.ca, cfg.mqtt.tls.cert, cfg.mqtt.tls.key) == (box / "ca.pem", box / "client.pem",
                                                                       box / "client.key")
    assert cfg.mqtt.tls.enabled and cfg.mqtt.password == "x"
    assert load(box, {}).store.path == box / "var" / "store"


def test_absolute_paths_stay(tmp_path, model_file):
    (tmp_path / "sub").mkdir()
    cfg = load(tmp_path / "sub", {"model": {"path": str(model_file)}, "store": {"path": str(tmp_path / "s")}})
    assert cfg.model.model_path == model_file
    assert cfg.store.path == tmp_path / "s"


def test_tls_key_needs_a_cert(tmp_path):
    (tmp_path / "client.key").write_text("k")
    assert "mqtt.tls.key: a key needs mqtt.tls.cert" in error(tmp_path, {"mqtt": {"tls": {"key": "client.key"}}})


# --- secrets --------------------------------------------------------------------------------------

def test_password_from_an_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", SECRET)
    cfg = load(tmp_path, {"mqtt": {"enabled": True, "username": "box", "password_env": "EDGE_TEST_MQTT_PASSWORD"}})
    assert cfg.mqtt.password == SECRET
    assert cfg.mqtt.password_env == "EDGE_TEST_MQTT_PASSWORD"


def test_password_from_a_file(tmp_path):
    (tmp_path / "mqtt-password").write_text(SECRET + "\n")
    cfg = load(tmp_path, {"mqtt": {"username": "box", "password_file": "mqtt-password"}})
    assert cfg.mqtt.password == SECRET
    (tmp_path / "mqtt-password").write_text(" spaced pass \r\n")
    assert load(tmp_path, {"mqtt": {"username": "box", "password_file": str(tmp_path / "mqtt-password")}}
                ).mqtt.password == " spaced pass "
    (tmp_path / "mqtt-password").write_bytes(b"\xff\xfe")
    message = error(tmp_path, {"mqtt": {"username": "box", "password_file": "mqtt-password"}})
    assert "mqtt.password_file: " in message and "not UTF-8 text" in message
    (tmp_path / "folder").mkdir()
    assert "mqtt.password_file: cannot read" in error(tmp_path, {"mqtt": {"username": "b", "password_file": "folder"}})


def test_password_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", SECRET)
    for mqtt in ({"username": "box", "password": SECRET},
                 {"username": "box", "password_env": "EDGE_TEST_MQTT_PASSWORD"}):
        cfg = load(tmp_path, {"mqtt": mqtt})
        assert cfg.mqtt.password == SECRET
        public = cfg.public_dict()
        text = json.dumps(public)
        assert SECRET not in repr(cfg) and SECRET not in str(cfg) and SECRET not in repr(cfg.mqtt)
        assert SECRET not in text and "password" not in public["mqtt"]
        assert public["mqtt"]["username"] == "box"
    message = error(tmp_path, {"mqtt": {"username": "box", "password": 918273645}})
    assert "918273645" not in message and "mqtt.password: expected text, got a number" in message


def test_public_dict_is_json(tmp_path, model_file):
    cfg = load(tmp_path, {"model": {"path": str(model_file)}})
    public = cfg.public_dict()
    assert json.loads(json.dumps(public)) == public
    assert public["model"]["path"] == str(model_file)
    assert public["classes"][0] == {"name": "A", "button": "GPIO17", "led": "GPIO27", "nothing": False}
    assert public["store"]["path"] == str(tmp_path / "var" / "store")
    assert public["mqtt"]["tls"] == {"ca": None, "cert": None, "key": None, "insecure": False}


# --- randomized: nothing but a one-line ConfigError, whatever the file holds ----------------------

JUNK = [None, True, False, 0, -1, 1, 7, 10 ** 30, -(10 ** 30), 0.5, -2.5, float("nan"), float("inf"), "",
        " ", "x", "auto", "GPIO17", "BOARD6", "J8:99", "GPIO", "\x00", "é" * 40, "a\nb", "%d/p", "~nobody/x",
        [], [1, 2], ["GPIO4"], {}, {"a": 1}, {"name": "A"}, {"fps": "x"}]


def _slots(node, path=()):
    """Every (path, value) in a nested dict/list tree."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _slots(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _slots(value, path + (i,))


def _set(tree, path, value):
    for step in path[:-1]:
        tree = tree[step]
    tree[path[-1]] = value


def _nested(rng, depth):
    value = rng.choice(JUNK)
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {rng.choice(["fps", "a", "name"]): value}
    return value


def _mutant(rng, valid: dict):
    """A mutated copy of a valid config: a wrong value, an unknown key, a reused pin or a deep tree."""
    data = copy.deepcopy(valid)
    slots = [(path, value) for path, value in _slots(data) if path]
    kind = rng.randrange(5)
    path, value = rng.choice(slots)
    if kind == 0:
        _set(data, path, rng.choice(JUNK))
    elif kind == 1:
        dicts = [v for _, v in _slots(data) if isinstance(v, dict)]
        rng.choice(dicts)[rng.choice(["kindd", "Fps", "passwd", "tls", "x" * 50, 3, None, True])] = rng.choice(JUNK)
    elif kind == 2:
        pins = [p for p, _ in slots if p[-1] in ("button", "led", "function_button", "status_led")]
        first, second = rng.sample(pins, 2)
        bcm = rng.randrange(28)
        spellings = [f"GPIO{bcm}", f"BCM{bcm}", bcm, str(bcm), f"gpio{bcm}"]
        spellings += [f"BOARD{b}" for b, g in config.BOARD_TO_BCM.items() if g == bcm]
        _set(data, first, rng.choice(spellings))
        _set(data, second, rng.choice(spellings))
    elif kind == 3:
        _set(data, path, _nested(rng, rng.randrange(1, 60)))
    else:
        parent = path[:-1]
        container = data
        for step in parent:
            container = container[step]
        if isinstance(container, dict):
            del container[path[-1]]
            _set(data, rng.choice([p for p, _ in _slots(data) if p] or [("x",)]), rng.choice(JUNK))
        else:
            container.append(rng.choice(JUNK))
    return data


def _garbage(rng, text: str) -> bytes:
    """The valid file's bytes, truncated, flipped, spliced or replaced by random bytes."""
    raw = bytearray(text.encode())
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(raw[:rng.randrange(len(raw))])
    if kind == 1:
        for _ in range(rng.randrange(1, 20)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 2:
        at = rng.randrange(len(raw))
        return bytes(raw[:at]) + rng.choice([b":", b"- ", b"{", b"[", b"&a ", b"*a", b"!!", b"\t", b"'", b"? "]) \
            + bytes(raw[at:])
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))


def test_random_invalid_configs_give_only_one_line_config_errors(tmp_path, model_file, monkeypatch):
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", SECRET)
    (tmp_path / "pics").mkdir()
    valid = {
        "device_id": "box",
        "classes": [{"name": "A", "button": "GPIO17", "led": "GPIO27"},
                    {"name": "B", "button": "BOARD15", "led": 23}, {"name": "C", "button": None, "led": None}],
        "function_button": "GPIO26", "status_led": "J8:36", "led_pwm": False,
        "camera": {"source": "folder", "folder": "pics", "fps": 10, "width": 640, "mirror": False},
        "model": {"path": "model.tflite", "threads": 2, "kernels": "auto"},
        "head": {"kind": "knn", "k": 3, "threshold": "auto", "smoothing": 5, "hysteresis": 0.1},
        "capture": {"rate": 6, "max_per_class": 200, "min_change": 0.02},
        "store": {"path": "var/store", "thumbnails": False},
        "mqtt": {"enabled": True, "host": "localhost", "port": 1883, "username": "box",
                 "password_env": "EDGE_TEST_MQTT_PASSWORD", "prefix": "edge/box", "tls": {"insecure": False}},
    }
    assert load(tmp_path, valid).mqtt.password == SECRET
    text = yaml.safe_dump(valid, sort_keys=False)
    rng = random.Random(20240611)
    failures = 0
    for i in range(300):
        content = _mutant(rng, valid) if i % 2 == 0 else _garbage(rng, text)
        path = write(tmp_path, content)
        try:
            load_config(path)
        except ConfigError as exc:
            failures += 1
            message = str(exc)
            assert len(message.splitlines()) == 1 and message.startswith("config.yaml: "), message
            assert SECRET not in message
        # any other exception fails the test with its traceback
    assert failures > 220  # the generator really produces broken files


def test_commands_that_do_not_connect_need_no_mqtt_secret(tmp_path, model_file):
    """`edge export` runs while the service (and its credential file) is stopped."""
    path = tmp_path / "config.yaml"
    path.write_text("mqtt:\n  username: box\n  password_file: /run/credentials/edge.service/none\n"
                    "model:\n  path: model.tflite\n")
    with pytest.raises(ConfigError, match="password_file"):
        load_config(path)
    assert load_config(path, secrets=False).mqtt.password is None


def test_mqtt_camera_needs_mqtt(tmp_path, model_file):
    path = tmp_path / "config.yaml"
    path.write_text("camera:\n  source: mqtt\nmodel:\n  path: model.tflite\n")
    with pytest.raises(ConfigError, match="camera.source: 'mqtt' needs mqtt.enabled"):
        load_config(path)


def test_web_pin_is_kept_and_never_shown(tmp_path):
    cfg = parse_config({"web": {"pin": "0123"}}, base=tmp_path)
    assert cfg.web.pin == "0123"
    assert "0123" not in repr(cfg) and "pin" not in cfg.public_dict()["web"]


def test_class_names_are_kept_composed_as_the_store_keeps_them(tmp_path):
    """An accent typed as its own character (macOS) names the same class: the config keeps the
    composed form the store keeps, so the button finds its class; the two spellings clash."""
    cfg = load(tmp_path, {"classes": [{"name": "cafe\u0301"}, {"name": "टोपी"}]})
    assert [c.name for c in cfg.classes] == ["caf\u00e9", "टोपी"]
    assert "is already used by classes[0].name" in error(tmp_path, {"classes": [{"name": "caf\u00e9"},
                                                                                  {"name": "CAFE\u0301"}]})
